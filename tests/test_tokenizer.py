from dpl_edit.tokenizer import clip_tokenizer


def test_real_clip_tokenization():
    assert clip_tokenizer()("a cat and a dog").input_ids == [49406, 320, 2368, 537, 320, 1929, 49407]


def test_vocabulary_size_and_specials():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.convert_ids_to_tokens([49406, 49407]) == ["<|startoftext|>", "<|endoftext|>"]
