"""Attention capture on diffusers UNets: which layers exist, a processor that exposes the
attention probabilities, a scoped hook that installs it, and a store that averages the maps."""

from .early_exit import ForwardStopped, StopAfter, execution_order, last_layer
from .hook import AttentionHook, AttentionHookError, attention_hook
from .layers import AttentionLayer, attention_layers, same_level_resolution, select_layers
from .processor import AttentionObserver, InspectingProcessor
from .store import AttentionStore

__all__ = [
    "AttentionHook",
    "AttentionHookError",
    "AttentionLayer",
    "AttentionObserver",
    "AttentionStore",
    "ForwardStopped",
    "InspectingProcessor",
    "StopAfter",
    "attention_hook",
    "attention_layers",
    "execution_order",
    "last_layer",
    "same_level_resolution",
    "select_layers",
]
