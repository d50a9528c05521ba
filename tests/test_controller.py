"""The Prompt-to-Prompt controller step by step, against a port of Prompt-to-Prompt's own
AttentionStore + AttentionReplace + LocalBlend written here from its description (random
full-size maps: 16x16 queries, 77 tokens, 64x64 latents, 50 steps)."""

import pytest
import torch
import torch.nn.functional as F

from dpl_edit.attention import AttentionLayer
from dpl_edit.editing import EditConfig, make_plan
from dpl_edit.editing.controller import PromptToPrompt
from dpl_edit.prompts import parse_marked_prompt
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


@pytest.mark.parametrize("direct", [False, True])
def test_local_blend_and_stored_maps_equal_prompt_to_prompt(direct):
    config = EditConfig(mode="replace", blend=("grass", "circle"), subtract=("square",))
    plan = _plan(config)
    branches = 3
    g = torch.Generator().manual_seed(0)
    trajectory = torch.randn(STEPS + 1, 4, 64, 64, generator=g) if direct else None
    controller = PromptToPrompt(plan, 16, 16, (0.3, 0.3), trajectory, map_layers=CROSS)
    alpha, subtract = _word_alpha(plan.blend_positions), _word_alpha(plan.subtract_positions)
    assert plan.blend_positions == [[3, 9], [3, 9], [3, 9]] and plan.subtract_positions == [[7]] * 3 and plan.blend_start == 10
    stored = [torch.zeros(branches, HEADS, 256, 77) for _ in CROSS]  # P2P's attention_store (sums over steps)
    for i in range(STEPS):
        for k, layer in enumerate(CROSS):
            probs = _probs(g, branches, 256, 77)
            edited = controller(layer, probs)
            cond = probs[branches:].clone()
            if i < round(0.8 * STEPS):  # AttentionReplace: the targets take the source's map
                cond[1:] = cond[:1]
            torch.testing.assert_close(edited[branches:], cond, rtol=0, atol=0)
            assert torch.equal(edited[:branches], probs[:branches])  # unconditional rows untouched
            stored[k] += cond  # P2P stores the tensor it then edits in place: the edited maps
        latents = torch.randn(branches, 4, 64, 64, generator=g)
        ours = controller.step_end(i, latents.clone())
        if direct:
            latents[0] = trajectory[i + 1]
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
