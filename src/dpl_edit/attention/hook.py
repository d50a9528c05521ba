"""The scoped attention hook: install inspecting processors on chosen layers only, restore the
original processors on exit (exceptions included), refuse to hook a UNet twice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from diffusers import UNet2DConditionModel

from .layers import AttentionLayer
from .processor import AttentionObserver, InspectingProcessor

_HOOKED = "_dpl_edit_attention_hook"


def is_hooked(unet: UNet2DConditionModel) -> bool:
    """Whether an ``attention_hook`` block is open on this UNet."""
    return getattr(unet, _HOOKED, False)


class AttentionHookError(RuntimeError):
    """The UNet is already hooked, or a layer is unknown."""


@contextlib.contextmanager
def attention_hook(
    unet: UNet2DConditionModel, layers: Iterable[AttentionLayer], observer: AttentionObserver
) -> Iterator[None]:
    """Within the block, ``observer`` sees (and may edit) the attention of ``layers``.

    Every other layer keeps its own (fast, fused) processor. Example::

        store = AttentionStore()
        with attention_hook(model.unet, select_layers(layers, kinds=["cross"], resolutions=[16]), store):
            model.predict(z, t, states)
    """
    if is_hooked(unet):
        raise AttentionHookError(
            "This UNet already has an attention hook installed; leave the first `with "
            "attention_hook(...)` block before entering another (one observer can serve both)."
        )
    layers = list(layers)
    modules = {}
    for layer in layers:
        path = layer.name.removesuffix(".processor")
        try:
            module = unet.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or not hasattr(module, "set_processor"):
            raise AttentionHookError(f"No attention layers named {[layer.name]} in this UNet")
        modules[layer.name] = module
    # Only the hooked layers' processors are swapped (a walk over the whole UNet, as
    # set_attn_processor does, costs about as much as a tenth of a small UNet's forward).
    original = {name: module.processor for name, module in modules.items()}
    for layer in layers:
        modules[layer.name].set_processor(InspectingProcessor(layer, observer))
    setattr(unet, _HOOKED, True)
    try:
        yield
    finally:
        for name, module in modules.items():
            module.set_processor(original[name])
        setattr(unet, _HOOKED, False)
