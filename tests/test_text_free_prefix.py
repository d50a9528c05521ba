"""The UNet's text-free prefix is computed once per inversion timestep, bit for bit as recomputing."""

import pytest
import torch

from dpl_edit import invert, text_free_prefix
from dpl_edit.images import to_pil
from dpl_edit.inversion import NullTextConfig
from dpl_edit.pipeline import model_dpl_config
from dpl_edit.registry import SCENE_MODEL_ID, load_model
from dpl_edit.scenes.render import render, split_scene
from dpl_edit.text_free_prefix import LastCall, TextFreePrefix, text_free_modules

TENSORS = ("latent_T", "null_states", "token_vectors", "cross_maps", "background_mask", "trajectory")


@pytest.fixture(scope="module")
def scene_model():
    return load_model(SCENE_MODEL_ID)


def test_the_prefix_of_each_layout(model, scene_model):
    """Stable Diffusion's layout (the tiny model's): the first resnet of its first block, which has
    cross-attention. The scene model's: its first block (no attention, 32x32) and the first resnet
    of the second."""
    assert text_free_modules(model.unet) == [model.unet.down_blocks[0].resnets[0]]
    unet = scene_model.unet
    assert text_free_modules(unet) == [unet.down_blocks[0], unet.down_blocks[1].resnets[0]]


@pytest.mark.parametrize("method, null", [("nti", "optimized"), ("dpl", "optimized"), ("dpl", "direct")])
@pytest.mark.parametrize("which", ["tiny", "scenes"])
def test_inversions_compute_the_prefix_once_per_step_bit_for_bit(which, method, null, model, scene_model, image,
                                                                 monkeypatch):
    """Every module of the prefix computes once per timestep of the inversion loop (the step's
    first forward), and the inversion is bit-identical to one that computes it at every forward."""
    if which == "tiny":
        picture, prompt = to_pil(image), "a {cat} and a {dog}"
    else:
        model = scene_model
        scene = split_scene("test", 0, num_objects=2)
        picture, prompt = render(scene)[0], scene.marked_caption()
    calls = []

    class Counted(LastCall):
        def __init__(self, module):
            super().__init__(module)
            calls.append(self)

    monkeypatch.setattr(text_free_prefix, "LastCall", Counted)
    steps = 3
    results = {}
    for reuse in (True, False):
        model.reuse_text_free_prefix = reuse
        try:
            results[reuse] = invert(model, picture, prompt, method=method, null=null, num_steps=steps,
                                    dpl=model_dpl_config(model, max_iterations=3), null_text=NullTextConfig(max_iterations=3),
                                    progress=False)
        finally:
            model.reuse_text_free_prefix = True
    assert len(calls) == len(text_free_modules(model.unet))
    assert [call.computed for call in calls] == [steps] * len(calls)
    for name in TENSORS:
        a, b = getattr(results[True], name), getattr(results[False], name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert results[True].dpl_log == results[False].dpl_log


def test_a_kept_call_is_reused_only_while_it_holds(model):
    resnet = model.unet.down_blocks[0].resnets[0]
    channels = resnet.conv1.in_channels
    g = torch.Generator().manual_seed(0)
    x, temb = torch.randn(1, channels, 8, 8, generator=g), torch.randn(1, resnet.time_emb_proj.in_features, generator=g)
    with TextFreePrefix(model) as prefix:
        assert prefix.modules == [resnet]
        kept = resnet.forward
        first = resnet(x, temb)
        assert resnet(x.clone(), temb.clone()) is first  # equal values: the kept outputs
        assert kept.computed == 1
        other = resnet(x + 1, temb)  # another input: computed
        assert other is not first and kept.computed == 2
        other.add_(1)  # the caller changed the kept outputs in place: computed again
        again = resnet(x + 1, temb)
        assert again is not other and kept.computed == 3
        assert torch.equal(again, resnet.__class__.forward(resnet, x + 1, temb))
        with torch.enable_grad():  # an input with a gradient: computed, with its graph, and not kept
            y = (x + 1).requires_grad_(True)
            assert resnet(y, temb).grad_fn is not None
        assert kept.computed == 3 and resnet(x + 1, temb) is again
    assert "forward" not in resnet.__dict__  # the class's forward again


def test_the_prefix_is_computed_at_every_forward_where_it_must_be(model):
    """Switched off, or on a model whose forwards are captured (CUDA graphs) or compiled, every
    forward computes the prefix."""
    model.reuse_text_free_prefix = False
    try:
        assert TextFreePrefix(model).modules == []
    finally:
        model.reuse_text_free_prefix = True
    for attribute, value in (("graphed_unet", object()), ("compiled", "default")):
        setattr(model, attribute, value)
        try:
            assert TextFreePrefix(model).modules == []
        finally:
            setattr(model, attribute, None)
    assert TextFreePrefix(model).modules == [model.unet.down_blocks[0].resnets[0]]
