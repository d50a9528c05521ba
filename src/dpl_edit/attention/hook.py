"""The scoped attention hook: install inspecting processors on chosen layers only, restore the
original processors on exit (exceptions included), refuse to hook a UNet twice."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Self

from .layers import AttentionLayer
from .processor import AttentionObserver, InspectingProcessor

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

_HOOKED = "_dpl_edit_attention_hook"


def is_hooked(unet: UNet2DConditionModel) -> bool:
    """Whether an ``attention_hook`` block is open on this UNet."""
    return active_hook(unet) is not None


def active_hook(unet: UNet2DConditionModel) -> AttentionHook | None:
    """The hook whose ``with`` block is open on this UNet, if any."""
    return getattr(unet, _HOOKED, None)


class AttentionHookError(RuntimeError):
    """The UNet is already hooked, or a layer is unknown."""


class AttentionHook:
    """Within ``with hook:``, ``observer`` sees (and may edit) the attention of ``layers``.

    Every other layer keeps its own (fast, fused) processor. The hook can be entered any number of
    times and installs the same processor objects each time (a compiled forward's guards then see
    the same objects, so it is not recompiled). Example::

        store = AttentionStore()
        with attention_hook(model.unet, select_layers(layers, kinds=["cross"], resolutions=[16]), store):
            model.predict(z, t, states)
    """

    def __init__(self, unet: UNet2DConditionModel, layers: Iterable[AttentionLayer], observer: AttentionObserver):
        self.unet = unet
        self.observer = observer
        self.modules = {}
        self.processors = {}
        for layer in layers:
            path = layer.name.removesuffix(".processor")
            try:
                module = unet.get_submodule(path)
            except AttributeError:
                module = None
            if module is None or not hasattr(module, "set_processor"):
                raise AttentionHookError(f"No attention layers named {[layer.name]} in this UNet")
            self.modules[layer.name] = module
            self.processors[layer.name] = InspectingProcessor(layer, observer)
        self.original: dict[str, object] = {}

    def __enter__(self) -> Self:
        if is_hooked(self.unet):
            raise AttentionHookError(
                "This UNet already has an attention hook installed; leave the first `with "
                "attention_hook(...)` block before entering another (one observer can serve both)."
            )
        # Only the hooked layers' processors are swapped (a walk over the whole UNet, as
        # set_attn_processor does, costs about as much as a tenth of a small UNet's forward).
        self.original = {name: module.processor for name, module in self.modules.items()}
        for name, module in self.modules.items():
            module.set_processor(self.processors[name])
        setattr(self.unet, _HOOKED, self)
        return self

    def __exit__(self, *exc_info) -> None:
        for name, module in self.modules.items():
            module.set_processor(self.original[name])
        self.original = {}
        setattr(self.unet, _HOOKED, None)


def attention_hook(
    unet: UNet2DConditionModel, layers: Iterable[AttentionLayer], observer: AttentionObserver
) -> AttentionHook:
    """A hook of ``layers`` for ``observer``, to use as ``with attention_hook(...):`` (see
    :class:`AttentionHook`); the original processors come back on exit, exceptions included."""
    return AttentionHook(unet, layers, observer)
