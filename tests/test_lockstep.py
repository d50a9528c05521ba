"""Several images inverted in lockstep (``invert_many``): each gets exactly its own inversion.

A batched UNet call computes each image with other kernels than a call for one image (a batched
convolution blocks its loops differently), so its results differ in the last bits and an early
stop near its threshold may then fall one iteration apart. What lockstep itself must get right
(each image's own optimiser, loss, gradient and early stop; which rows stay in the batch; each
image's recorded maps) is checked with the UNet called one image at a time inside a batched call
(``one_at_a_time``, in conftest.py): the arithmetic is then that of a single image, and every tensor of every
inversion must be bit-equal to inverting the image alone.
"""

from __future__ import annotations

import pytest
import torch

from dpl_edit import DplEditError, invert, invert_many
from dpl_edit.images import to_pil
from dpl_edit.inversion import DynamicPromptConfig, NullTextConfig, dynamic_prompt_inversion_many

PROMPTS = ["a {cat}", "a red {dog} and a {cat}", "a {house} on grass"]
# thresholds inside the tiny model's range of losses, so that the images stop at other iterations
EARLY_STOPS = NullTextConfig(max_iterations=5, early_stop_epsilon=0.25, early_stop_growth=0.5)


def smooth_image(seed: int):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    return to_pil(torch.nn.functional.interpolate(coarse, size=128, mode="bilinear", align_corners=False))


def assert_same_inversion(batched, alone):
    for name in ("latent_T", "source_latent", "null_states", "token_vectors", "cross_maps", "background_mask",
                 "clusters", "trajectory"):
        a, b = getattr(batched, name), getattr(alone, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
    assert batched.dpl_log == alone.dpl_log
    assert batched.prompt == alone.prompt and batched.words == alone.words


def test_null_text_inversion_in_lockstep_is_each_image_alone(model, one_at_a_time):
    images = [smooth_image(seed) for seed in range(3)]
    steps = []
    batched = invert_many(model, images, PROMPTS, method="nti", num_steps=4, null_text=EARLY_STOPS,
                          callback=steps.append, progress=False)
    sizes = list(one_at_a_time)
    for b, (image, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        alone_steps = []
        alone = invert(model, image, prompt, method="nti", num_steps=4, null_text=EARLY_STOPS,
                       callback=alone_steps.append, progress=False)
        assert_same_inversion(batched[b], alone)
        assert [(s.loss, s.iterations) for s in steps if s.image == b] == [(s.loss, s.iterations) for s in alone_steps]
        assert batched[b].settings["batch"] == 3 and "batch" not in alone.settings
    # the scenario: images stopped at other iterations, so the batch shrank while the others went on
    iterations = {(s.step, s.image): s.iterations for s in steps}
    assert any(len({iterations[step, b] for b in range(3)}) > 1 for step in range(4))
    assert 3 in sizes and ({1, 2} & set(sizes))


def test_a_compiled_null_step_keeps_the_whole_batch(model, one_at_a_time, monkeypatch):
    """Where the null step's backward is compiled (static shapes), its forward keeps stopped images
    (each size the batch went through would be a compilation of its own); the inversions do not
    change. (The flag alone, on the eager model: what it changes is which rows are forwarded.)"""
    images = [smooth_image(seed) for seed in range(3)]
    null_text = NullTextConfig(max_iterations=2, early_stop_epsilon=0.4, early_stop_growth=0.5)  # stops apart
    shrinking = invert_many(model, images, PROMPTS, method="nti", num_steps=3, null_text=null_text, progress=False)
    assert {1, 2} & set(one_at_a_time)
    one_at_a_time.clear()
    monkeypatch.setattr(model, "compiled_backward", True)
    static = invert_many(model, images, PROMPTS, method="nti", num_steps=3, null_text=null_text, progress=False)
    assert set(one_at_a_time) == {3}
    for a, b in zip(static, shrinking, strict=True):
        assert_same_inversion(a, b)


@pytest.mark.parametrize("method", ["dpl", "direct"])
def test_recorded_maps_and_pivots_are_each_images_own(model, one_at_a_time, method):
    """The batch's DDIM inversion records every image's maps (DPL's background mask and its saved
    maps read them) and pivot; DPL then learns each image's tokens on its own, and its recorded
    forward and null-text step run for both images at once."""
    images = [smooth_image(seed) for seed in (3, 4)]
    dpl = DynamicPromptConfig(cross_resolution=8, self_resolution=8, max_iterations=2)
    null_text = NullTextConfig(max_iterations=2)
    batched = invert_many(model, images, PROMPTS[1:], method=method, num_steps=3, dpl=dpl, null_text=null_text,
                          progress=False)
    assert one_at_a_time.count(2) == (3 if method == "direct" else 3 + 3 * (2 + 1 + 2 + 1))  # DDIM (+ DPL: tokens, recorded, null)
    for b, (image, prompt) in enumerate(zip(images, PROMPTS[1:], strict=True)):
        alone = invert(model, image, prompt, method=method, num_steps=3, dpl=dpl, null_text=null_text, progress=False)
        assert_same_inversion(batched[b], alone)


def test_dpl_token_steps_in_lockstep_leave_the_batch_image_by_image(model, one_at_a_time, one_stops_at_once):
    """An image whose losses meet their thresholds leaves the token steps' batch at once, while the
    other learns to the cap alone."""
    images = [smooth_image(seed) for seed in (5, 6)]
    prompts, dpl, null_text = one_stops_at_once
    batched = invert_many(model, images, prompts, method="dpl", num_steps=2, dpl=dpl, null_text=null_text,
                          progress=False)
    assert [[entry["iterations"] for entry in each.dpl_log] for each in batched] == [[0, 0], [3, 3]]
    assert 1 in one_at_a_time  # the second image's token steps, without the first
    for b, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        alone = invert(model, image, prompt, method="dpl", num_steps=2, dpl=dpl, null_text=null_text, progress=False)
        assert_same_inversion(batched[b], alone)


def test_batched_unet_calls_invert_each_image_close_to_alone(model):
    """With the UNet's real batched kernels (no early stop, so every image runs every iteration):
    the null states agree with each image's own to float32 rounding amplified by Adam over a few
    steps (Adam divides by the gradient's running scale, so a gradient element near zero can move
    its state by up to the learning rate, 1e-2, either way)."""
    images = [smooth_image(seed) for seed in range(2)]
    null_text = NullTextConfig(max_iterations=3, early_stop=False)
    batched = invert_many(model, images, PROMPTS[:2], method="nti", num_steps=3, null_text=null_text, progress=False)
    for b, (image, prompt) in enumerate(zip(images, PROMPTS[:2], strict=True)):
        alone = invert(model, image, prompt, method="nti", num_steps=3, null_text=null_text, progress=False)
        assert torch.equal(batched[b].source_latent, alone.source_latent)
        assert torch.allclose(batched[b].latent_T, alone.latent_T, atol=1e-4, rtol=1e-4)
        difference = (batched[b].null_states - alone.null_states).abs()
        assert difference.max() <= 2 * 3 * 3 * 1e-2 and difference.mean() < 1e-3


def test_invert_many_wants_one_prompt_per_image_or_one_for_all(model):
    one = invert_many(model, [smooth_image(0)] * 2, "a cat", method="ddim", num_steps=2, progress=False)
    assert [each.prompt for each in one] == ["a cat", "a cat"]
    with pytest.raises(DplEditError, match="as many prompts as images"):
        invert_many(model, [smooth_image(0)] * 2, ["a {cat}"], method="nti", num_steps=2, progress=False)
    with pytest.raises(DplEditError, match="as many prompts as images"):
        invert_many(model, [], [], method="nti", num_steps=2, progress=False)


def test_dpl_checks_its_null_strategy_before_any_work():
    with pytest.raises(ValueError, match="null must be one of"):
        dynamic_prompt_inversion_many(None, [], [], None, [], [], None, 7.5, null="bogus")
