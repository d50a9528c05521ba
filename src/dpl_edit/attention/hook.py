"""The scoped attention hook: install inspecting processors on chosen layers only, restore the
original processors on exit (exceptions included), refuse to hook a UNet twice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from diffusers import UNet2DConditionModel

from .layers import AttentionLayer
from .processor import AttentionObserver, InspectingProcessor

_HOOKED = "_dpl_edit_attention_hook"


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
    if getattr(unet, _HOOKED, False):
        raise AttentionHookError(
            "This UNet already has an attention hook installed; leave the first `with "
            "attention_hook(...)` block before entering another (one observer can serve both)."
        )
    original = unet.attn_processors
    layers = list(layers)
    unknown = [layer.name for layer in layers if layer.name not in original]
    if unknown:
        raise AttentionHookError(f"No attention layers named {unknown} in this UNet")
    processors = dict(original)
    for layer in layers:
        processors[layer.name] = InspectingProcessor(layer, observer)
    unet.set_attn_processor(processors)
    setattr(unet, _HOOKED, True)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))
        setattr(unet, _HOOKED, False)
