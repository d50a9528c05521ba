import pytest

from dpl_edit import PromptError
from dpl_edit.prompts import parse_marked_prompt
from dpl_edit.tokenizer import clip_tokenizer

TOKENIZER = clip_tokenizer()


def test_braces_mark_words_at_their_word_final_tokens():
    marked = parse_marked_prompt("a {cat} and a {dog}", TOKENIZER)
    assert marked.text == "a cat and a dog"
    assert [(w.word, w.positions) for w in marked.words] == [("cat", (2,)), ("dog", (5,))]
    assert marked.token_ids[:7] == (49406, 320, 2368, 537, 320, 1929, 49407)
    assert marked.end_position == 6 and len(marked.token_ids) == 77


def test_words_option_and_multi_token_words():
    marked = parse_marked_prompt("A Sunflowerpot near a dog", TOKENIZER, words=["sunflowerpot", "Dog"])
    assert [w.word for w in marked.words] == ["Sunflowerpot", "dog"]
    assert TOKENIZER.convert_ids_to_tokens([marked.token_ids[p] for p in marked.words[0].positions]) == [
        "sun", "flower", "pot</w>"
    ]
    assert parse_marked_prompt("a {cat}", TOKENIZER, words=["cat"]).words == parse_marked_prompt("a {cat}", TOKENIZER).words


@pytest.mark.parametrize(
    "prompt, words, message",
    [
        ("a cat", (), "No dynamic word"),
        ("a cat", ("dog",), "not in the prompt"),
        ("a {cat", (), "Unbalanced"),
        ("a {} cat", (), "Empty braces"),
        ("a {cat} " + "and more " * 40, (), "tokens long"),
        ("a catalogue", ("cat",), "not in the prompt"),
    ],
)
def test_bad_marks_give_clear_errors(prompt, words, message):
    with pytest.raises(PromptError, match=message):
        parse_marked_prompt(prompt, TOKENIZER, words)


def test_one_listed_word_may_be_a_string():
    """``words="cat"`` is the word, not the letters c, a, t (nor is EditConfig's blend="cat")."""
    from dpl_edit import EditConfig

    assert parse_marked_prompt("a cat and a dog", TOKENIZER, "cat") == parse_marked_prompt("a cat and a dog", TOKENIZER,
                                                                                         ["cat"])
    assert EditConfig(blend="cat", subtract=["dog"]).blend == ("cat",)
    assert EditConfig(blend="cat", subtract=["dog"]).subtract == ("dog",)


def test_braces_are_stripped_from_the_text():
    assert parse_marked_prompt("a {cat} and a {dog}", TOKENIZER).text == "a cat and a dog"
