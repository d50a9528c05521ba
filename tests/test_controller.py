"""The Prompt-to-Prompt controller step by step, against a port of Prompt-to-Prompt's own
AttentionStore + AttentionReplace + AttentionRefine + AttentionReweight + LocalBlend and of its
seq_aligner written here from its description (random full-size maps: 16x16 queries, 77 tokens,
64x64 latents, 50 steps)."""

import random

import pytest
import torch
import torch.nn.functional as F

from dpl_edit.attention import AttentionLayer
from dpl_edit.editing import EditConfig, make_plan
from dpl_edit.editing.controller import PromptToPrompt
from dpl_edit.prompts import MarkedPrompt, align_tokens, parse_marked_prompt
from dpl_edit.tokenizer import clip_tokenizer

TOKENIZER = clip_tokenizer()
STEPS, HEADS = 50, 2
CROSS = [AttentionLayer(f"cross{k}", "down", 2, k, 0, "cross", 16) for k in range(5)]
SELF_16 = AttentionLayer("self16", "up", 1, 0, 0, "self", 16)
SELF_32 = AttentionLayer("self32", "up", 2, 0, 0, "self", 32)


def _plan(config: EditConfig):
    source = parse_marked_prompt("a red {circle} and a blue {square} on grass", TOKENIZER)
    targets = [parse_marked_prompt(t, TOKENIZER, require_words=False)
               for t in ("a red circle and a blue square on sand", "a red oval and a blue square on grass")]
    return make_plan(source, targets, [3, 7], config, STEPS, TOKENIZER)


def _probs(g, branches, queries, keys):
    """Random attention with a fixed coarse layout per token, so that maps summed over steps keep regions."""
    side = int(queries**0.5)
    layout = torch.randn(keys, 4, 4, generator=torch.Generator().manual_seed(keys))
    layout = F.interpolate(layout[None], size=(side, side), mode="bilinear")[0].flatten(1).T  # (queries, keys)
    return torch.softmax(torch.randn(2 * branches, HEADS, queries, keys, generator=g) + 3 * layout, dim=-1)


def p2p_local_blend(x_t, stored, alpha, subtract, th, step, start_blend):
    """P2P's LocalBlend.__call__ (counter = step + 1) on the attention store (layers of (B, heads, 256, 77))."""
    if step + 1 <= start_blend:
        return x_t
    batch = x_t.shape[0]
    maps = torch.cat([m.reshape(batch, -1, 1, 16, 16, 77) for m in stored], dim=1)

    def get_mask(words, use_pool):
        m = (maps * words[:, None, None, None, None, :]).sum(-1).mean(1)
        if use_pool:
            m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=x_t.shape[2:])
        m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        m = m.gt(th[1 - int(use_pool)])
        return m[:1] + m

    mask = get_mask(alpha, True)
    if subtract is not None:
        mask = mask * ~get_mask(subtract, False)
    return x_t[:1] + mask.float() * (x_t - x_t[:1])


def _word_alpha(positions):
    alpha = torch.zeros(len(positions), 77)
    for b, p in enumerate(positions):
        alpha[b, p] = 1.0
    return alpha


@pytest.mark.parametrize("source_uncond", [True, False])
def test_local_blend_and_stored_maps_equal_prompt_to_prompt(source_uncond):
    """Without ``source_uncond`` the batch has no unconditional source row (sampling keeps the source on
    the inversion's trajectory: its latent is already the trajectory's when the step ends)."""
    config = EditConfig(mode="replace", blend=("grass", "circle"), subtract=("square",))
    plan = _plan(config)
    branches = 3
    uncond = branches if source_uncond else branches - 1
    g = torch.Generator().manual_seed(0)
    controller = PromptToPrompt(plan, 16, 16, (0.3, 0.3), source_uncond=source_uncond, map_layers=CROSS)
    alpha, subtract = _word_alpha(plan.blend_positions), _word_alpha(plan.subtract_positions)
    assert plan.blend_positions == [[3, 9], [3, 9], [3, 9]] and plan.subtract_positions == [[7]] * 3 and plan.blend_start == 10
    stored = [torch.zeros(branches, HEADS, 256, 77) for _ in CROSS]  # P2P's attention_store (sums over steps)
    for i in range(STEPS):
        for k, layer in enumerate(CROSS):
            probs = _probs(g, branches, 256, 77)[branches - uncond :]  # without the source's row, where it has none
            edited = controller(layer, probs)
            cond = probs[uncond:].clone()
            if i < round(0.8 * STEPS):  # AttentionReplace: the targets take the source's map
                cond[1:] = cond[:1]
            torch.testing.assert_close(edited[uncond:], cond, rtol=0, atol=0)
            assert torch.equal(edited[:uncond], probs[:uncond])  # unconditional rows untouched
            stored[k] += cond  # P2P stores the tensor it then edits in place: the edited maps
        latents = torch.randn(branches, 4, 64, 64, generator=g)
        ours = controller.step_end(i, latents.clone())
        theirs = p2p_local_blend(latents, stored, alpha, subtract, (0.3, 0.3), i, int(0.2 * STEPS))
        torch.testing.assert_close(ours, theirs)
        if i < 10:
            assert torch.equal(ours[1:], latents[1:])  # no blending before start_blend
    assert controller.blend_masks is not None and 0 < controller.blend_masks.mean() < 1


def test_self_attention_is_injected_only_at_16x16_and_below_inside_its_window():
    plan = _plan(EditConfig(self_replace_steps=0.4))
    controller = PromptToPrompt(plan, 16, 16)
    g = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        probs = _probs(g, 3, 256, 256)
        edited = controller(SELF_16, probs)
        if i < 20:
            expected = probs.clone()
            expected[4:] = probs[3]
            assert torch.equal(edited, expected)
        else:  # the same probabilities (a compiled forward traces one graph for every step)
            assert torch.equal(edited, probs)
        assert controller(SELF_32, _probs(g, 3, 1024, 1024)) is None
        controller.step_end(i, torch.zeros(3, 4, 8, 8))


def test_word_windows_replace_only_their_columns_inside_their_steps():
    plan = _plan(EditConfig(cross_replace_steps=0.8, word_cross_replace_steps={"sand": 0.2}))
    controller = PromptToPrompt(plan, 16, 16, map_layers=CROSS)
    g = torch.Generator().manual_seed(2)
    for i in range(STEPS):
        probs = _probs(g, 3, 256, 77)
        edited = controller(CROSS[0], probs)
        target = edited[4]  # the "sand" target, conditional row
        source, own = probs[3], probs[4]
        assert torch.equal(target[..., 9], source[..., 9] if i < 10 else own[..., 9])  # "sand" (position 9)
        assert torch.equal(target[..., 2], source[..., 2] if i < 40 else own[..., 2])
        controller.step_end(i, torch.zeros(3, 4, 8, 8))


def p2p_get_mapper(x: list[int], y: list[int], max_len: int = 77) -> list[int]:
    """A port of Prompt-to-Prompt's ``seq_aligner.get_mapper`` (global_align, get_aligned_sequences)
    on two encoded prompts (start and end tokens included): its score matrix (gap 0, match 1,
    mismatch -1) and trace-back matrix filled together (1 left, 2 up, 3 diagonal, 4 the corner), the
    walk back from the corner, and the padding positions mapped to themselves."""
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    trace = [[1] * (len(y) + 1)] + [[2] + [0] * len(y) for _ in range(len(x))]
    trace[0][0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            trace[i][j] = 1 if score[i][j] == left else 2 if score[i][j] == up else 3
    i, j, mapper_y_to_x = len(x), len(y), []
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace[i][j] == 1:
            j -= 1
            mapper_y_to_x.append((j, -1))
        elif trace[i][j] == 2:
            i -= 1
        else:
            break
    mapper_y_to_x.reverse()
    return [x_position for _, x_position in mapper_y_to_x] + [len(y) + k for k in range(max_len - len(y))]


def _padded(ids: list[int]) -> MarkedPrompt:
    return MarkedPrompt(text="", token_ids=tuple(ids + [ids[-1]] * (77 - len(ids))), words=(), end_position=len(ids) - 1)


def test_refinement_alignment_equals_prompt_to_prompts_on_random_token_sequences():
    # few distinct ids, so that many alignments tie and the trace back's order decides
    rng = random.Random(0)
    for _ in range(500):
        x = [49406] + [rng.randint(1, 4) for _ in range(rng.randint(1, 20))] + [49407]
        y = [49406] + [rng.randint(1, 4) for _ in range(rng.randint(1, 20))] + [49407]
        assert align_tokens(_padded(x), _padded(y)) == p2p_get_mapper(x, y), (x, y)


@pytest.mark.parametrize("source, target", [
    ("a cat and a dog", "a fluffy cat and a big dog"),
    ("a red square and a red rectangle on water", "old a red and and a red rectangle on water"),
    ("a red rectangle and a red rectangle on sand", "a a red rectangle and red a red rectangle on sand"),
    ("a red circle and a red oval on grass", "a red circle and and a red oval on"),
    ("a dog and a cat", "a dog"),  # two tokens shorter: its first padding takes the source's "a" and "cat"
])
def test_refinement_alignment_equals_prompt_to_prompts_on_prompts(source, target):
    source, target = (parse_marked_prompt(text, TOKENIZER, require_words=False) for text in (source, target))
    assert align_tokens(source, target) == p2p_get_mapper(list(source.token_ids[: source.end_position + 1]),
                                                          list(target.token_ids[: target.end_position + 1]))


def p2p_time_words_alpha(num_steps: int, targets: int, default: float,
                         words: list[tuple[float, int, list[int]]]) -> torch.Tensor:
    """P2P's get_time_words_attention_alpha (with update_alpha_time_word): (num_steps + 1, n, 77),
    the first int(share * (num_steps + 1)) rows on, for every column, then for each word's
    (share, target, columns)."""
    alpha = torch.zeros(num_steps + 1, targets, 77)
    for j in range(targets):
        alpha[: int(default * alpha.shape[0]), j] = 1
    for share, j, columns in words:
        alpha[:, j, columns] = 0
        alpha[: int(share * alpha.shape[0]), j, columns] = 1
    return alpha


def p2p_refine_reweight_cross(attn_base, attn_replace, mapper, alphas, equalizer, alpha_words):
    """AttentionControlEdit.forward's cross-attention branch with AttentionRefine's
    replace_cross_attention, under AttentionReweight's when an equalizer is given."""
    attn_base_replace = attn_base[:, :, mapper].permute(2, 0, 1, 3)
    replaced = attn_base_replace * alphas[:, None, None, :] + attn_replace * (1 - alphas[:, None, None, :])
    if equalizer is not None:
        replaced = replaced * equalizer[:, None, None, :]
    alpha_words = alpha_words[:, None, None, :]
    return replaced * alpha_words + (1 - alpha_words) * attn_replace


@pytest.mark.parametrize("steps, cross, words, self_share", [
    (50, 0.4, {"fluffy": 0.2}, 0.6),  # PIE-Bench's P2P settings
    (30, 0.75, {"fluffy": 0.35}, 0.45),  # shares x steps that are not whole: P2P truncates
])
def test_refinement_and_reweighting_equal_prompt_to_prompt(steps, cross, words, self_share):
    targets = ["a red fluffy circle and a blue square on grass", "a circle on grass"]  # a word in; four out
    source = parse_marked_prompt("a red {circle} and a blue {square} on grass", TOKENIZER)
    prompts = [parse_marked_prompt(text, TOKENIZER, require_words=False) for text in targets]
    config = EditConfig(mode="refine", cross_replace_steps=cross, word_cross_replace_steps=words,
                        self_replace_steps=self_share, reweight={"fluffy": 2.0})
    plan = make_plan(source, prompts, [3, 7], config, steps, TOKENIZER)
    assert plan.self_steps == int(steps * self_share)  # P2P's num_self_replace
    controller = PromptToPrompt(plan, 16, 16, map_layers=CROSS)
    mapper = torch.tensor([p2p_get_mapper(list(source.token_ids[: source.end_position + 1]),
                                          list(p.token_ids[: p.end_position + 1])) for p in prompts])
    alphas = (mapper >= 0).float()  # get_mapper's alphas: 1 where mapped and after the prompt
    assert TOKENIZER.convert_ids_to_tokens(prompts[0].token_ids[3]) == "fluffy</w>"
    equalizer = torch.ones(2, 77)
    equalizer[0, 3] = 2.0  # get_equalizer for "fluffy" in the first target
    alpha_words = p2p_time_words_alpha(steps, 2, cross, [(words["fluffy"], 0, [3])])
    g = torch.Generator().manual_seed(3)
    for i in range(steps):
        probs = _probs(g, 3, 256, 77)
        edited = controller(CROSS[0], probs)
        theirs = p2p_refine_reweight_cross(probs[3], probs[4:], mapper, alphas, equalizer, alpha_words[i])
        torch.testing.assert_close(edited[4:], theirs, rtol=0, atol=0)
        assert torch.equal(edited[:4], probs[:4])  # the unconditional rows and the source untouched
        controller.step_end(i, torch.zeros(3, 4, 8, 8))
