"""The compiled path (``StableDiffusion.compile``) against eager on the tiny model: a forward, the
gradient the null-text step takes, hooked forwards, a DDIM inversion and guided sampling, and DPL's
token step (one captured graph, checked against eager).

Tolerances come from the arithmetic: compiled fp32 code reorders reductions and fuses ops, which
moved one forward by 1.4e-6 (relative L2) here, and that error can grow by a step's worth each DDIM
step; compile() itself checks the backward (``COMPILE_TOLERANCE``) and falls back to eager for
gradient steps where the compiler gets it wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from dpl_edit import edit, invert
from dpl_edit.attention import AttentionStore, attention_hook, attention_layers, select_layers
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.editing import EditConfig
from dpl_edit.inversion import DynamicPromptConfig, ddim_inversion
from dpl_edit.inversion.dynamic_prompt import TokenLosses
from dpl_edit.models import COMPILE_TOLERANCE
from dpl_edit.prompts import parse_marked_prompt
from dpl_edit.random_models import tiny_model
from dpl_edit.sampling import sample

pytestmark = pytest.mark.slow  # compiling the tiny UNet: up to 9 minutes on one thread, inductor's cache empty

FORWARD = 1e-5  # one fp32 forward, reordered: ~7x the measured 1.4e-6
STEPS = 5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def pair():
    return tiny_model(seed=0), tiny_model(seed=0).compile()


@pytest.fixture(scope="module")
def inputs(pair):
    eager, _ = pair
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, eager.latent_size, eager.latent_size, generator=g)
    return z, eager.encode_prompt("a cat and a dog"), eager.encode_prompt("")


def test_compiled_forward_matches_eager(pair, inputs):
    eager, compiled = pair
    z, cond, _ = inputs
    assert compiled.compiled == "default" and eager.compiled is None
    with torch.no_grad():
        assert relative(compiled.predict(z, 501, cond), eager.predict(z, 501, cond)) < FORWARD


def test_gradient_steps_use_a_checked_backward(pair, inputs):
    eager, compiled = pair
    z, _, null = inputs
    error = compiled.compiled_gradient_error()
    assert compiled.compiled_backward == (error <= COMPILE_TOLERANCE[torch.float32])
    grads = []
    for m in (eager, compiled):
        param = null.clone().requires_grad_(True)
        (m.predict(z, 501, param) ** 2).mean().backward()
        grads.append(param.grad)
    if compiled.compiled_backward:
        assert relative(grads[1], grads[0]) <= COMPILE_TOLERANCE[torch.float32]
    else:  # the compiler's backward was wrong here: the null-text step must have run eager
        assert torch.equal(grads[1], grads[0])


def test_hooked_forwards_match_eager(pair, inputs):
    """Forwards under an attention hook are compiled too: the processors and the store are traced."""
    eager, compiled = pair
    z, cond, _ = inputs
    layers = select_layers(attention_layers(eager.unet), kinds=["cross"])
    outputs, maps = [], []
    for m in (eager, compiled):
        store = AttentionStore()
        with attention_hook(m.unet, layers, store), torch.no_grad():
            outputs.append(m.predict(z, 501, cond))
        store.end_step()
        maps.append(store.average_maps("cross", eager.latent_size // 2))
    assert relative(outputs[1], outputs[0]) < FORWARD and relative(maps[1], maps[0]) < FORWARD


def test_hooked_forwards_with_a_gradient_run_eager(pair, inputs):
    """The eager reference (and fallback) of DPL's token step: a hooked forward carrying a gradient."""
    z, cond, _ = inputs
    layers = select_layers(attention_layers(pair[0].unet), kinds=["cross"])
    grads = []
    for m in pair:
        param = cond.clone().requires_grad_(True)
        with attention_hook(m.unet, layers, AttentionStore(keep_grad=True)):
            (m.predict(z, 501, param) ** 2).mean().backward()
        grads.append(param.grad)
    assert torch.equal(grads[1], grads[0])


def test_edit_is_one_graph_for_every_step_and_matches_eager(pair):
    """A Prompt-to-Prompt edit (refinement, re-weighting, self-attention injection for 2 of 5 steps,
    cross-attention replacement for 4) compiles once: the window and the switch are tensors, and
    later edits, of any length, reuse the graph."""
    eager, compiled = pair
    pixels = np.random.default_rng(0).integers(0, 256, (eager.image_size, eager.image_size, 3), dtype=np.uint8)
    inversion = invert(eager, Image.fromarray(pixels), "a cat and a dog", method="ddim", num_steps=STEPS,
                       progress=False)
    config = EditConfig(mode="refine", reweight={"tiger": 2.0})
    cache = UNet2DConditionModel.forward.__code__
    results = []
    for m in (eager, compiled):
        before = len(_debug_get_cache_entry_list(cache))
        results.append(edit(m, inversion, ["a cat and a big tiger"], config, progress=False))
        graphs = len(_debug_get_cache_entry_list(cache)) - before
    assert graphs == 1
    assert relative(results[1].latents, results[0].latents) < 7.5 * STEPS * FORWARD
    assert relative(results[1].maps, results[0].maps) < STEPS * FORWARD
    # invert once, edit many: another edit, and an edit of a shorter inversion (other windows and
    # self-injection steps), reuse that graph
    shorter = invert(eager, Image.fromarray(pixels), "a cat and a dog", method="ddim", num_steps=3, progress=False)
    for source in (inversion, shorter):
        before = len(_debug_get_cache_entry_list(cache))
        edit(compiled, source, ["a cat and a big tiger"], config, progress=False)
        assert len(_debug_get_cache_entry_list(cache)) == before


def test_ddim_inversion_and_sampling_match(pair, inputs):
    eager, _ = pair
    z, cond, null = inputs
    schedule = DDIMSchedule.from_scheduler(eager.scheduler, STEPS)
    trajectories = [ddim_inversion(m, z, cond, schedule, progress=False).trajectory[-1] for m in pair]
    assert relative(trajectories[1], trajectories[0]) < STEPS * FORWARD
    samples = [sample(m, trajectories[0], schedule, cond, null, 7.5, progress=False) for m in pair]
    assert relative(samples[1], samples[0]) < 7.5 * STEPS * FORWARD  # guidance scales the difference of two forwards


def _token_losses(model, prompt="a {cat} and a {dog}", span="padded"):
    marked = parse_marked_prompt(prompt, model.tokenizer)
    layers = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    background = torch.zeros(16, 16)
    background[:, :8] = 1
    return TokenLosses(model, marked, layers, background, DynamicPromptConfig(balancing_span=span))


def _token_gradient(losses_at, step, z, t, vectors):
    param = vectors.clone().requires_grad_(True)
    with losses_at.hook:
        values = step(z, torch.tensor(t), param)
    losses_at.weighted(values).backward()
    return values.detach(), param.grad


def test_token_step_is_one_graph(pair, inputs):
    """Dynamo traces the whole token step, early exit (an exception) and map store included."""
    eager, _ = pair
    losses_at = _token_losses(eager)
    vectors = eager.token_embedding(losses_at.token_ids[0, losses_at.prompt.positions]).float().requires_grad_(True)
    with losses_at.hook:
        explained = torch._dynamo.explain(losses_at.stacked_losses)(inputs[0], torch.tensor(501), vectors)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("span", ["padded", "prompt"])
def test_captured_token_step_matches_eager_without_recompiling(pair, inputs, span):
    """The captured graph (dynamo + AOTAutograd, no code generation) against eager at two timesteps
    and two sets of vectors, and from a second TokenLosses of another prompt (its words and end
    token at other positions, as many words): one compilation serves them all."""
    eager, _ = pair
    z = inputs[0]
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    for run, prompt in enumerate(["a {cat} and a {dog}", "one small {horse} beside a tall {tree} at dusk"]):
        losses_at = _token_losses(eager, prompt, span)
        captured = torch.compile(losses_at.stacked_losses, backend=counting, dynamic=False)
        start = eager.token_embedding(losses_at.token_ids[0, losses_at.prompt.positions]).float()
        for t, vectors in ((501, start), (301, start + 0.01 * run + 0.02)):
            want = _token_gradient(losses_at, losses_at.stacked_losses, z, t, vectors)
            got = _token_gradient(losses_at, captured, z, t, vectors)
            assert relative(got[0], want[0]) < FORWARD and relative(got[1], want[1]) < FORWARD
    assert len(graphs) == 1


def test_compiled_token_step_is_checked(pair, inputs):
    """The compiled token step is used only where its gradient matches eager's (torch 2.13's
    inductor on CPU gets the tiny UNet's UpBlock2D backward wrong: there it must run eager)."""
    eager, compiled = pair
    z = inputs[0]
    grads = []
    for m in (eager, compiled):
        losses_at = _token_losses(m)
        vectors = m.token_embedding(losses_at.token_ids[0, losses_at.prompt.positions]).float()
        with losses_at.hook:
            losses_at.values(z, torch.tensor(501), vectors.clone().requires_grad_(True))  # the check
        grads.append(_token_gradient(losses_at, losses_at.values, z, 501, vectors)[1])
    assert losses_at.checked
    if losses_at.fast_step is not None:
        assert relative(grads[1], grads[0]) <= COMPILE_TOLERANCE[torch.float32]
    else:
        assert torch.equal(grads[1], grads[0])
