import pytest
import torch

from dpl_edit.attention import (
    AttentionHookError,
    AttentionStore,
    attention_hook,
    attention_layers,
    select_layers,
)


def _inputs(model, batch=2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 4, 32, 32, generator=g)
    states = torch.randn(batch, 77, 32, generator=g)
    return z, states


def test_layers_parsed_from_processor_names(model):
    layers = attention_layers(model.unet)
    assert len(layers) == len(model.unet.attn_processors)
    first = layers[0]
    assert (first.place, first.block, first.kind, first.resolution) == ("down", 0, "self", 32)
    cross16 = select_layers(layers, kinds=["cross"], resolutions=[16])
    assert {(l.place, l.block) for l in cross16} == {("down", 1), ("up", 1)}
    mid = select_layers(layers, places=["mid"])
    assert {l.resolution for l in mid} == {8}


def test_hooked_unet_output_equals_unhooked(model):
    z, states = _inputs(model)
    with torch.no_grad():
        plain = model.predict(z, 501, states)
        store = AttentionStore()
        with attention_hook(model.unet, attention_layers(model.unet), store):
            hooked = model.predict(z, 501, states)
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)


def test_recorded_maps_have_the_layer_sizes(model):
    z, states = _inputs(model)
    layers = attention_layers(model.unet)
    store = AttentionStore(rows=[1])
    with torch.no_grad(), attention_hook(model.unet, layers, store):
        model.predict(z, 501, states)
    for layer in layers:
        keys = 77 if layer.kind == "cross" else layer.queries
        maps = store.step_maps(layer.kind, layer.resolution)
        assert maps.shape == (1, layer.resolution, layer.resolution, keys)
        torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)))


def test_only_requested_layers_are_replaced_and_all_restored(model):
    original = {k: type(v) for k, v in model.unet.attn_processors.items()}
    chosen = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    with attention_hook(model.unet, chosen, AttentionStore()):
        during = model.unet.attn_processors
        changed = {k for k in during if type(during[k]) is not original[k]}
        assert changed == {l.name for l in chosen}
    assert {k: type(v) for k, v in model.unet.attn_processors.items()} == original


def test_hook_restores_on_exception_and_refuses_twice(model):
    original = dict(model.unet.attn_processors)
    layers = attention_layers(model.unet)
    with pytest.raises(RuntimeError, match="boom"), attention_hook(model.unet, layers, AttentionStore()):
        with pytest.raises(AttentionHookError), attention_hook(model.unet, layers, AttentionStore()):
            pass
        raise RuntimeError("boom")
    assert model.unet.attn_processors == original


def test_a_hook_enters_again_with_the_same_processors(model):
    original = dict(model.unet.attn_processors)
    chosen = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    hook = attention_hook(model.unet, chosen, AttentionStore())
    installed = []
    for _ in range(2):
        with hook:
            installed.append({l.name: model.unet.attn_processors[l.name] for l in chosen})
        assert model.unet.attn_processors == original
    assert all(installed[0][name] is installed[1][name] for name in installed[0])


def test_maps_carry_gradients_when_asked(model):
    z, _ = _inputs(model, batch=1)
    states = torch.randn(1, 77, 32, requires_grad=True)
    layers = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    store = AttentionStore(keep_grad=True)
    with attention_hook(model.unet, layers, store):
        model.predict(z, 501, states)
    store.step_maps("cross", 16)[..., 3].sum().backward()
    assert states.grad is not None and states.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.unet.parameters())


def test_store_averages_over_steps(model):
    z, states = _inputs(model, batch=1)
    layers = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    store = AttentionStore()
    steps = []
    with torch.no_grad(), attention_hook(model.unet, layers, store):
        for t in (901, 501):
            model.predict(z, t, states)
            steps.append(store.step_maps("cross", 16))
            store.end_step()
    torch.testing.assert_close(store.average_maps("cross", 16), (steps[0] + steps[1]) / 2)
