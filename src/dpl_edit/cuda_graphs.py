"""CUDA graphs without a compiler: the inner loops' eager kernels captured once and replayed.

At batch 1 a GPU inverting an image is launch-bound: an SD-1.4 UNet forward takes 28 ms eager on an
H200 against about 1 ms of arithmetic, and replaying the same kernels as one CUDA graph removes the
launches. ``torch.compile(mode="reduce-overhead")`` does that too, but compiles first: 45-90 s of
inductor compilation for each new graph on the H200 (measured, README), and an inversion needs
several (DPL's token step, the null step, no-grad forwards). :func:`torch.cuda.make_graphed_callables`
captures the eager kernels after three warm-up calls instead, forward and backward.

:class:`GraphedFunction` wraps a function of tensors: one capture per input signature (shapes,
dtypes, which inputs require a gradient, grad mode). A graph replays into fixed memory, so its
outputs are handed out as copies and the gradients it gives its inputs are copied too (an
optimiser may keep them while the graph replays again). :class:`GraphedRecording` does the same
for a forward under an attention store, whose maps it hands back to the store after each replay.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

import torch

from .attention.store import AttentionStore

Capture = Callable[[Callable, tuple[torch.Tensor, ...]], Callable]


def capture_cuda_graph(function: Callable, samples: tuple[torch.Tensor, ...]) -> Callable:
    """``function`` captured as CUDA graphs (forward, and backward for the inputs that require a
    gradient) on ``samples``, which become the graphs' input buffers; with no garbage collection
    during the capture, and dead graphs collected first where the device is short of memory
    (:func:`no_collection`)."""
    with no_collection(collect_first=memory_is_short()):
        return torch.cuda.make_graphed_callables(function, samples, allow_unused_input=True)


def memory_is_short(fraction: float = 0.25) -> bool:
    """Whether less than ``fraction`` of the CUDA device's memory is free."""
    free, total = torch.cuda.mem_get_info()
    return free < fraction * total


@contextlib.contextmanager
def no_collection(collect_first: bool) -> Iterator[None]:
    """Python's cyclic garbage collector kept off until the end (and run first if ``collect_first``).

    Graphs that are no longer used live on in reference cycles (each capture's autograd function
    is a class made for it; our steps hold their own bound methods) until the collector runs. Run
    while a capture is underway (the captured function's Python allocates, and may trigger it), it
    destroys those graphs there, which a capture does not permit, and the capture fails (on an
    H200, a lockstep batch's token step after four one-image inversions: "operation not permitted
    when stream is capturing"). Their memory pools stay reserved until then, so a collection
    first frees them where memory is short; not at every capture, since a full collection takes
    about 0.26 s with an SD-1.4-sized model loaded (half a million objects, this project's CPU)."""
    if collect_first:
        gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class CopyGradient(torch.autograd.Function):
    """Identity whose backward hands on a copy of the gradient (not the graph's fixed buffer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


def signature(args: tuple[torch.Tensor, ...]) -> tuple:
    """What a capture is valid for: grad mode and each input's shape, dtype, device and grad flag."""
    grad = torch.is_grad_enabled()
    return (grad, *((tuple(a.shape), a.dtype, a.device, grad and a.requires_grad) for a in args))


class GraphedFunction:
    """``function(*tensors) -> tensor`` replayed from a capture made at the first call of each signature.

    ``capture`` makes the replayable version (:func:`capture_cuda_graph`; the tests pass a
    stand-in that runs the same path on a CPU). The function must not depend on anything but its
    inputs and what stays fixed while it is captured (weights, hooks installed around it).
    """

    def __init__(self, function: Callable, capture: Capture = capture_cuda_graph, max_captures: int | None = None):
        self.function = function
        self.capture = capture
        self.captures: dict[tuple, Callable] = {}  # least recently used first
        self.max_captures = max_captures  # beyond it the least recently used capture (and its memory) goes

    def __call__(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        key = signature(args)
        graphed = self.captures.pop(key, None)
        if graphed is None:
            samples = tuple(a.detach().clone().requires_grad_(requires_grad)
                            for a, (*_, requires_grad) in zip(args, key[1:], strict=True))
            graphed = self.capture(self.function, samples)
            if self.max_captures is not None and len(self.captures) >= self.max_captures:
                del self.captures[next(iter(self.captures))]
        self.captures[key] = graphed
        args = tuple(CopyGradient.apply(a) if requires_grad else a
                     for a, (*_, requires_grad) in zip(args, key[1:], strict=True))
        out = graphed(*args)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()


class GraphedRecording:
    """A UNet call under an attention store that records maps (in Python, at each call), graphed:
    the captured function returns the output and the maps the store recorded during the call,
    taken back out of it; after each replay they are given back to the store of the call, under
    the keys and in the order the capture recorded them. One serves every store that records the
    same layers the same way (what the capture's Python did is the same for each)."""

    def __init__(self, call: Callable, capture: Capture = capture_cuda_graph, max_captures: int | None = None):
        self.call = call
        self.store: AttentionStore | None = None  # the store of the call under way
        self.keys: list[tuple[str, int]] = []
        self.graphed = GraphedFunction(self.recorded, capture, max_captures)

    def recorded(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mark = self.store.mark()
        output = self.call(*args)
        taken = self.store.take_since(mark)
        self.keys = [key for key, _ in taken]
        return (output, *(maps for _, maps in taken))

    def __call__(self, store: AttentionStore, *args: torch.Tensor) -> torch.Tensor:
        self.store = store
        mark = store.mark()
        try:
            output, *maps = self.graphed(*args)
        except Exception:
            store.take_since(mark)  # whatever a failed capture left (the eager forward records again)
            raise
        finally:
            self.store = None  # (not kept alive past its inversion)
        store.give_back(list(zip(self.keys, maps, strict=True)))
        return output
