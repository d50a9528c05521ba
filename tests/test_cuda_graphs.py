"""CUDA graphs without a compiler (``StableDiffusion.use_cuda_graphs``), checked on the CPU.

A CUDA graph cannot run here, so these tests take the three properties of a capture that our code
must live with and check them on the real code path: a replay runs the captured kernels, not the
Python that launched them (``traced_once`` below traces the function once with ``make_fx`` and
replays the trace, forward and backward); it writes its outputs and its input gradients into the
same fixed buffers every time (``fixed_memory``); and nothing may be copied from the host or read
back while a graph is captured (checked by running the captured functions on the meta device,
where any host tensor that enters shows)."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dpl_edit import edit, invert, invert_many, models
from dpl_edit.attention import attention_hook, attention_layers, select_layers
from dpl_edit.cuda_graphs import GraphedFunction, capture_cuda_graph
from dpl_edit.editing import EditConfig
from dpl_edit.editing.controller import PromptToPrompt
from dpl_edit.editing.plan import make_plan
from dpl_edit.images import to_pil
from dpl_edit.inversion import DynamicPromptConfig, NullTextConfig
from dpl_edit.inversion.dynamic_prompt import LockstepTokenLosses, TokenLosses
from dpl_edit.models import COMPILE_TOLERANCE, StableDiffusion, gradient_tolerance
from dpl_edit.prompts import parse_marked_prompt
from dpl_edit.random_models import tiny_model
from dpl_edit.registry import load_model


def fixed_memory(function, samples):
    """``torch.cuda.make_graphed_callables``' memory behaviour on the CPU: the inputs are copied into
    ``samples``; the output and the input gradients come back as views of buffers that the next
    call overwrites."""
    buffers = {}

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch.no_grad():
                for sample, x in zip(samples, inputs, strict=True):
                    sample.copy_(x)
            with torch.enable_grad():
                live = [s.detach().requires_grad_(s.requires_grad) for s in samples]
                out = function(*live)
            ctx.live, ctx.out = live, out
            outs = out if isinstance(out, tuple) else (out,)
            fixed = tuple(buffers.setdefault(("out", k), torch.empty_like(o)).copy_(o.detach()).detach()
                          for k, o in enumerate(outs))
            return fixed if isinstance(out, tuple) else fixed[0]

        @staticmethod
        def backward(ctx, grad):
            wanted = [s for s in ctx.live if s.requires_grad]
            grads = iter(torch.autograd.grad(ctx.out, wanted, grad, allow_unused=True))
            result = []
            for i, s in enumerate(ctx.live):
                g = next(grads) if s.requires_grad else None
                if g is not None:
                    g = buffers.setdefault(i, torch.empty_like(g)).copy_(g).detach()
                result.append(g)
            return tuple(result)

    return lambda *args: Replay.apply(*args)


def traced_once(function, samples):
    """The function's Python run once, at capture: its forward and its backward (a
    vector-Jacobian product for the inputs that want a gradient) traced to aten ops with
    ``make_fx`` and replayed. What the Python did per call (a counter, a value read into an int, a
    tensor made afresh) is frozen at its captured value, as in a CUDA graph."""
    wants = [s.requires_grad for s in samples]
    with one_fake_mode():
        forward = make_fx(lambda *args: function(*args), tracing_mode="real")(*samples)  # (bound methods too)

    def vjp(*args):
        *inputs, grad = args
        inputs = [x.detach().requires_grad_(w) for x, w in zip(inputs, wants, strict=True)]
        with torch.enable_grad():
            out = function(*inputs)
        return torch.autograd.grad(out, [x for x, w in zip(inputs, wants, strict=True) if w], grad,
                                   allow_unused=True)

    backward = None
    if any(wants):
        with torch.enable_grad():
            shape = function(*samples)
        with one_fake_mode():
            backward = make_fx(vjp, tracing_mode="real")(*samples, torch.ones_like(shape))

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return forward(*inputs)

        @staticmethod
        def backward(ctx, grad):
            grads = iter(backward(*ctx.saved_tensors, grad))
            return tuple(next(grads) if w else None for w in wants)

    return lambda *args: Replay.apply(*args)


def one_fake_mode():
    """One fake-tensor mode for a whole trace: ``make_fx`` in real mode otherwise makes one per traced
    operation to describe its output, each reading the whole Python stack (half a test's time)."""
    return torch._guards.tracing(torch._guards.TracingContext(FakeTensorMode(allow_fallback_kernels=True)))


def captured(function, samples):
    """Both: Python run once, fixed buffers."""
    return fixed_memory(traced_once(function, samples), samples)


def counting(captures):
    def capture(function, samples):
        captures.append((function, samples))
        return captured(function, samples)
    return capture


def test_one_capture_per_signature_on_copies_of_the_inputs():
    captures = []
    graphed = GraphedFunction(lambda x, w: (x * w).sum(dim=-1), counting(captures))
    x, w = torch.randn(2, 3), torch.randn(3, requires_grad=True)
    graphed(x, w)
    graphed(torch.randn(2, 3), w)  # same signature
    assert len(captures) == 1 and all(s is not x and s is not w for s in captures[0][1])
    graphed(torch.randn(4, 3), w)  # another shape
    with torch.no_grad():
        graphed(x, w)  # grad mode
    graphed(x, w.detach())  # which inputs want a gradient
    assert len(captures) == 4 and all(function is graphed.function for function, _ in captures)


def test_beyond_its_limit_the_least_recently_used_capture_goes():
    captures = []
    graphed = GraphedFunction(lambda x: x * 2, counting(captures), max_captures=2)
    one, two, three = torch.randn(1), torch.randn(2), torch.randn(3)
    graphed(one)
    graphed(two)
    graphed(one)  # used last
    graphed(three)  # the capture for two goes
    assert len(captures) == 3 and len(graphed.captures) == 2
    graphed(one)
    assert len(captures) == 3
    assert graphed(two).tolist() == (two * 2).tolist() and len(captures) == 4


def test_outputs_and_gradients_outlive_the_next_replay():
    """What an optimiser keeps (the last output, the gradient it accumulated) is not overwritten
    by the next call, though the capture hands out the same buffers each time."""
    graphed = GraphedFunction(lambda x, w: x * w, fixed_memory)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    first = graphed(torch.tensor([3.0, 4.0]), w)
    first.sum().backward()
    second = graphed(torch.tensor([5.0, 6.0]), w)
    second.sum().backward()  # accumulates into w.grad
    assert first.tolist() == [3.0, 8.0] and second.tolist() == [5.0, 12.0]
    assert w.grad.tolist() == [8.0, 10.0]


CAPTURES = []


@pytest.fixture(scope="module")
def model():
    """The eager model the captures are compared with: the tiny model with its UNet's weights in
    channels_last, as ``use_cuda_graphs`` leaves them (a replay runs the same arithmetic as eager in
    the same layout; what the layout itself changes is ``test_channels_last_changes_only_rounding``'s)."""
    eager = tiny_model(seed=0)
    eager.unet.to(memory_format=torch.channels_last)
    return eager


@pytest.fixture(scope="module")
def graphed_model():
    return tiny_model(seed=0).use_cuda_graphs(capture=counting(CAPTURES))


@pytest.mark.parametrize("method", ["nti", "dpl"])
def test_inversions_with_graphs_equal_eager(model, graphed_model, image, method, caplog):
    """The same arithmetic replayed: every tensor of NTI's and DPL's inversions is bit-equal (null
    states, token vectors, the recorded maps, DPL's background mask and clusters), and the graphed
    paths were taken: the UNet's no-grad and null-step captures, the DDIM inversion recorded under
    an attention store (and DPL's recorded forward), DPL's token step; each traced once and
    replayed at every timestep."""
    runs = []
    CAPTURES.clear()
    graphed_model.graphed_steps.clear()  # (the recordings of the tests before)
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        for m in (model, graphed_model):
            runs.append(invert(m, to_pil(image), "a {cat} and a {dog}", method=method, num_steps=2,
                               dpl=DynamicPromptConfig(max_iterations=3), progress=False))
    assert "CUDA graphs" not in caplog.text
    eager, graphed = runs
    for name in ("latent_T", "null_states", "token_vectors", "cross_maps", "background_mask", "clusters",
                 "trajectory"):
        a, b = getattr(graphed, name), getattr(eager, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    signatures = graphed_model.graphed_unet.captures
    assert {key[0] for key in signatures} == {False, True}  # no-grad forwards and the null step's
    recordings = [f for f, _ in CAPTURES if getattr(f, "__name__", "") == "recorded"]
    assert len(recordings) == (2 if method == "dpl" else 1)  # the recorded DDIM inversion (and DPL's step forward)


@pytest.mark.parametrize("method", [pytest.param("nti", marks=pytest.mark.slow), "dpl"])
def test_lockstep_inversions_with_graphs(model, graphed_model, image, method, caplog):
    """Two images in lockstep (``invert_many``) on a graphed model: the batch's forwards are captured
    at the batch's size, DPL's token step as one capture of the whole batch for the inversion
    (``LockstepTokenLosses``), and every tensor is bit-equal to the eager lockstep's (both images
    run every token iteration here, so the batches are the same)."""
    images = [to_pil(image), to_pil(image.flip(-1))]
    prompts = ["a {cat} and a {dog}", "a red {dog}"]
    CAPTURES.clear()
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        eager, graphed = (invert_many(m, images, prompts, method=method, num_steps=2,
                                      dpl=DynamicPromptConfig(max_iterations=3),
                                      null_text=NullTextConfig(max_iterations=3), progress=False)
                          for m in (model, graphed_model))
    assert "CUDA graphs" not in caplog.text
    for a_run, b_run in zip(graphed, eager, strict=True):
        for name in ("latent_T", "null_states", "token_vectors", "cross_maps", "background_mask", "clusters",
                     "trajectory"):
            a, b = getattr(a_run, name), getattr(b_run, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
        assert a_run.dpl_log == b_run.dpl_log
    assert any(samples[0].shape[0] == 2 for _, samples in CAPTURES)  # batched forwards, captured
    names = [getattr(function, "__name__", "") for function, _ in CAPTURES]
    tokens = [samples for function, samples in CAPTURES if getattr(function, "__name__", "") == "every_loss"]
    assert "layout_losses" not in names  # no image's own token step
    assert len(tokens) == (1 if method == "dpl" else 0) and all(s[0].shape[0] == 2 for s in tokens)


@pytest.mark.slow
def test_graphed_lockstep_null_step_keeps_stopped_images_in_its_forward(model, one_at_a_time, image):
    """NTI's images stopping at other iterations: on a graphed model the null step's forward keeps
    the whole batch (one capture at batch 3, where the eager batch goes down to 2; a stopped image's
    loss is left out, its states unchanged), and with the UNet called per image every tensor equals
    the eager lockstep's (which equals each image alone, test_lockstep.py)."""
    images = [to_pil(image), to_pil(image.flip(-1)), to_pil(image.flip(-2))]
    prompts = ["a {cat}", "a red {dog} and a {cat}", "a {house} on grass"]
    null_text = NullTextConfig(max_iterations=3, early_stop_epsilon=0.3, early_stop_growth=0.5)
    runs, steps, captures = [], [[], []], []
    try:
        for k in range(2):
            if k == 1:
                model.use_cuda_graphs(capture=counting(captures))
            runs.append(invert_many(model, images, prompts, method="nti", num_steps=3, null_text=null_text,
                                    callback=steps[k].append, progress=False))
    finally:
        model.graphed_unet = None
        model.graphed_hooks.clear()
    iterations = {(s.step, s.image): s.iterations for s in steps[1]}
    stops = [sorted(iterations[step, b] for b in range(3)) for step in range(3)]
    assert any(first < second for first, second, _ in stops)  # one image stopped while two went on
    assert [(s.loss, s.iterations) for s in steps[1]] == [(s.loss, s.iterations) for s in steps[0]]
    for graphed, eager in zip(*reversed(runs), strict=True):
        for name in ("latent_T", "source_latent", "null_states", "cross_maps", "trajectory"):
            assert torch.equal(getattr(graphed, name), getattr(eager, name)), name
    null_steps = [samples for _, samples in captures if samples[2].requires_grad]
    assert [s[0].shape[0] for s in null_steps] == [1, 3]  # use_cuda_graphs' own check at batch 1, then the batch


def test_graphed_lockstep_token_step_keeps_a_stopped_image_in_its_forward(model, one_at_a_time, one_stops_at_once,
                                                                          image):
    """One image meets its thresholds at once, the other learns to the cap. The graphed lockstep step still forwards both (one capture
    at batch 2 serves every iteration of both steps) without moving the stopped image's vectors, and
    with the UNet called per image (so that a batch's arithmetic is each image's own) every tensor
    equals the eager lockstep's, which shrinks its batch instead (and equals each image alone,
    test_lockstep.py)."""
    images = [to_pil(image), to_pil(image.flip(-1))]
    prompts, dpl, null_text = one_stops_at_once
    eager = invert_many(model, images, prompts, method="dpl", num_steps=2, dpl=dpl, null_text=null_text,
                        progress=False)
    captures = []
    try:
        model.use_cuda_graphs(capture=counting(captures))
        graphed = invert_many(model, images, prompts, method="dpl", num_steps=2, dpl=dpl, null_text=null_text,
                              progress=False)
    finally:
        model.graphed_unet = None
        model.graphed_hooks.clear()
    assert [[entry["iterations"] for entry in each.dpl_log] for each in graphed] == [[0, 0], [3, 3]]
    for a_run, b_run in zip(graphed, eager, strict=True):
        for name in ("latent_T", "null_states", "token_vectors", "cross_maps", "background_mask", "clusters",
                     "trajectory"):
            assert torch.equal(getattr(a_run, name), getattr(b_run, name)), name
        assert a_run.dpl_log == b_run.dpl_log
    tokens = [samples for function, samples in captures if getattr(function, "__name__", "") == "every_loss"]
    assert len(tokens) == 1 and tokens[0][0].shape[0] == 2


def test_edits_with_graphs_equal_eager_and_share_the_capture_of_their_layout(image, monkeypatch):
    """A Prompt-to-Prompt edit replays its forwards under the controller (window, self-attention
    switch and recorded maps live in tensors it updates in place): the same latents, maps and
    local-blend masks as eager, bit for bit, with one capture for all its steps. The capture reads
    the controller's state tensors where they are, so a later edit of the same layout (as many
    targets and unconditional rows, the same switches) takes them over with its own values and replays
    it: a word swap with local blend on an NTI inversion, then a refinement on a direct inversion of
    another length (both sources follow their trajectories: 3 rows), one capture; re-weighting on a
    DDIM inversion (no trajectory: 4 rows) is a layout of its own, and beyond ``EDIT_LAYOUTS`` (1
    here) the least recently used layout's capture goes."""
    monkeypatch.setattr(models, "EDIT_LAYOUTS", 1)
    model = tiny_model(seed=0)
    model.unet.to(memory_format=torch.channels_last)  # (the graphed model's layout)
    inversions = [invert(model, to_pil(image), "a {cat} and a {dog}", method=method, num_steps=n, progress=False)
                  for method, n in (("nti", 2), ("direct", 3), ("ddim", 3))]
    captures = []
    graphed_model = tiny_model(seed=0).use_cuda_graphs(capture=counting(captures))
    edits = [  # (inversion, targets, config, captures of edits so far)
        (0, ["a cat and a tiger"], EditConfig(mode="replace", blend=("cat",), self_replace_steps=0.5), 1),
        (1, ["a cat and a big tiger"], EditConfig(mode="refine"), 1),
        (2, ["a cat and a big tiger"], EditConfig(mode="refine", reweight={"tiger": 2.0},
                                                  word_cross_replace_steps={"tiger": 0.4}), 2),
    ]
    for k, (which, targets, config, count) in enumerate(edits):
        eager, graphed = (edit(m, inversions[which], targets, config, progress=False) for m in (model, graphed_model))
        assert torch.equal(graphed.latents, eager.latents) and torch.equal(graphed.maps, eager.maps), k
        assert (graphed.blend_masks is None) == (eager.blend_masks is None), k
        if eager.blend_masks is not None:
            assert torch.equal(graphed.blend_masks, eager.blend_masks), k
        assert len([s for _, s in captures if s[0].shape[0] > 2]) == count, k
        assert captures[-1][1][0].shape[0] == (4 if inversions[which].trajectory is None else 3), k
    kept = [owner for key, (owner, _) in graphed_model.graphed_steps.items() if key[0] == "edit"]
    assert [owner.equalizer is not None for owner in kept] == [True]


def test_later_inversions_replay_the_captures_of_the_first(model, graphed_model, image, caplog):
    """DPL's token step is captured once for every prompt of a layout (as many tokens and words):
    a later inversion with other words at other positions (another end position, token ids,
    background mask) replays the first one's capture with its own layout, and a prompt with a third
    word is a capture of its own. The recorded forwards (the DDIM inversion's, DPL's at each step)
    are captured by the first inversion only, each later one's maps going to its own store. Every
    inversion is bit-equal to eager."""
    prompts = ["a {cat} and a {dog}", "a red {dog} and a {cat}", "a {cat} and a {dog} and a {bird}"]
    graphed_model.graphed_steps.clear()
    CAPTURES.clear()
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        for k, prompt in enumerate(prompts):
            picture = to_pil(image.flip(-1) if k == 1 else image)
            eager, graphed = (invert(m, picture, prompt, method="dpl", num_steps=2,
                                     dpl=DynamicPromptConfig(max_iterations=3),
                                     null_text=NullTextConfig(max_iterations=2), progress=False)
                              for m in (model, graphed_model))
            for name in ("null_states", "token_vectors", "cross_maps", "background_mask"):
                assert torch.equal(getattr(graphed, name), getattr(eager, name)), (prompt, name)
            assert graphed.dpl_log == eager.dpl_log
    assert "CUDA graphs" not in caplog.text
    token_steps = [samples for function, samples in CAPTURES if getattr(function, "__name__", "") == "layout_losses"]
    assert [len(samples[4]) for samples in token_steps] == [2, 3]  # positions: 2 words, then 3
    assert len([function for function, _ in CAPTURES if getattr(function, "__name__", "") == "recorded"]) == 2


def test_token_step_is_graphed_and_checked(graphed_model):
    graphed_model.graphed_steps.clear()
    marked = parse_marked_prompt("a {cat} and a {dog}", graphed_model.tokenizer)
    layers = select_layers(attention_layers(graphed_model.unet), kinds=["cross"], resolutions=[16])
    losses_at = TokenLosses(graphed_model, marked, layers, torch.ones(16, 16), DynamicPromptConfig())
    vectors = graphed_model.token_embedding(losses_at.token_ids[0, losses_at.positions]).requires_grad_(True)
    with losses_at.hook:
        for _ in range(2):
            losses_at.values(torch.randn(1, 4, 32, 32), torch.tensor(501), vectors)
    assert losses_at.checked and losses_at.fast_kind == "CUDA graphs"
    assert len(graphed_model.graphed_steps[losses_at.graphed_key].captures) == 1
    with pytest.raises(KeyError):  # the maps each call recorded stayed inside it
        losses_at.store.step_maps("cross", 16)


def test_a_failing_capture_leaves_the_model_eager(model, image, caplog):
    def broken(function, samples):
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        broken_model = tiny_model(seed=0).use_cuda_graphs(capture=broken)
    assert broken_model.graphed_unet is None
    assert "CUDA graphs failed" in caplog.text and "operation not permitted" in caplog.text
    runs = [invert(m, to_pil(image), "a cat", num_steps=2, progress=False) for m in (model, broken_model)]
    assert torch.equal(runs[1].null_states, runs[0].null_states)


@pytest.mark.slow
def test_a_recording_that_fails_to_capture_leaves_its_store_as_it_was(model, image, caplog):
    """A capture that breaks after the store recorded part of a forward: those maps are taken out
    again, the forward runs eager and records once (the same inversion as eager, maps included)."""
    def breaks_on_recordings(function, samples):
        if getattr(function, "__name__", "") == "recorded":
            store = function.__self__.store
            store(store_layer, torch.rand(1, 8, 256, 77))  # a map the broken capture left behind
            raise RuntimeError("operation not permitted when stream is capturing")
        return captured(function, samples)

    store_layer = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])[0]
    graphed_model = tiny_model(seed=0).use_cuda_graphs(capture=breaks_on_recordings)
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        runs = [invert(m, to_pil(image), "a cat", num_steps=2, progress=False) for m in (model, graphed_model)]
    assert "CUDA graphs failed" in caplog.text and graphed_model.graphed_unet is None
    assert torch.equal(runs[1].cross_maps, runs[0].cross_maps)
    assert torch.equal(runs[1].null_states, runs[0].null_states)


@pytest.mark.slow
def test_a_lockstep_token_step_that_fails_to_capture_runs_the_batch_eager(model, image, caplog):
    """A capture of the lockstep token step that breaks after the hook recorded part of a forward:
    a warning, the maps it left are dropped, and the batch runs eager (the eager lockstep's
    inversions, bit for bit); the rest of the model stays graphed."""
    def breaks_on_the_token_step(function, samples):
        if getattr(function, "__name__", "") == "every_loss":
            store = function.__self__.losses_at[0].store
            store(store_layer, torch.rand(2, 8, 256, 77))  # maps the broken capture left behind
            raise RuntimeError("operation not permitted when stream is capturing")
        return captured(function, samples)

    store_layer = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])[0]
    graphed_model = tiny_model(seed=0).use_cuda_graphs(capture=breaks_on_the_token_step)
    images, prompts = [to_pil(image), to_pil(image.flip(-1))], ["a {cat} and a {dog}", "a red {dog}"]
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        eager, graphed = (invert_many(m, images, prompts, method="dpl", num_steps=2,
                                      dpl=DynamicPromptConfig(max_iterations=3),
                                      null_text=NullTextConfig(max_iterations=2), progress=False)
                          for m in (model, graphed_model))
    assert "could not make DPL's lockstep token step" in caplog.text and graphed_model.graphed_unet is not None
    for a_run, b_run in zip(graphed, eager, strict=True):
        for name in ("null_states", "token_vectors", "cross_maps"):
            assert torch.equal(getattr(a_run, name), getattr(b_run, name)), name


def test_channels_last_changes_only_rounding(image):
    """``use_cuda_graphs`` puts the UNet's weights in channels_last (cuDNN's tensor-core layout); the
    UNet's output and its gradient to the text states then differ from the default layout's by
    float32 rounding alone (other convolution kernels, other summation orders), measured here on
    the whole tiny UNet at an inversion's input: 1e-4 is about a thousand float32 epsilons, where a
    weight read in the wrong layout would be off by the order of the output itself."""
    default, graphed = tiny_model(seed=0), tiny_model(seed=0).use_cuda_graphs(capture=fixed_memory)
    weights = [p for p in graphed.unet.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    latents = default.encode_image(image)
    states = default.encode_prompt("a cat and a dog")
    outputs, grads = [], []
    for m in (default, graphed):
        x = states.clone().requires_grad_(True)
        out = m.unet_sample(latents, m.timestep(501, latents.device), x)
        (out**2).mean().backward()
        outputs.append(out.detach())
        grads.append(x.grad)
    for a, b in (outputs, grads):
        assert ((a - b).norm() / a.norm()).item() < 1e-4  # measured 4.5e-6 and 2.1e-6 on a 2-core AVX2 CPU


def test_cuda_graphs_need_cuda_and_no_compiler(model):
    with pytest.raises(ValueError, match="need a CUDA device; this model is on cpu"):
        tiny_model(seed=0).use_cuda_graphs()
    compiled = tiny_model(seed=0)
    compiled.compiled = "default"  # what compile() sets
    with pytest.raises(ValueError, match="compiled"):
        compiled.use_cuda_graphs(capture=fixed_memory)
    with pytest.raises(ValueError, match="one or the other"):
        tiny_model(seed=0).use_cuda_graphs(capture=fixed_memory).compile()


class HostTensors(TorchDispatchMode):
    """Records the ops on meta tensors that also take a host tensor (not a 0-d scalar): on CUDA each
    is a copy from the host, which a CUDA graph capture refuses."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors) and any(t.device.type == "cpu" and t.dim() for t in tensors):
            self.ops.append(str(func))
        return out


def test_the_graphed_functions_take_nothing_from_the_host():
    """The UNet's forward + backward, DPL's whole token step (text encoder, hooked UNet to its
    early exit, the three losses, the backward), alone and for a lockstep batch, and a forward under
    a Prompt-to-Prompt controller
    run on the meta device with no host tensor (and no ``.item()``, which meta tensors refuse). Without this, the Attend-and-Excite kernel and
    L_dj's pair indices, made on the CPU, made the token step's capture fail on a GPU."""
    model = tiny_model(seed=0)
    marked = parse_marked_prompt("a {cat} and a {dog}", model.tokenizer)
    model.unet.to("meta")
    model.text_encoder.to("meta")
    z = torch.randn(1, 4, 32, 32, device="meta")
    timestep = torch.tensor(501, device="meta")
    states = torch.randn(1, 77, model.text_encoder.config.hidden_size, device="meta", requires_grad=True)
    with HostTensors() as unet:
        (model.unet_sample(z, timestep, states) ** 2).mean().backward()
    layers = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    losses_at = TokenLosses(model, marked, layers, torch.ones(16, 16, device="meta"), DynamicPromptConfig())
    vectors = torch.randn(2, model.text_encoder.config.hidden_size, device="meta", requires_grad=True)
    with losses_at.hook, HostTensors() as token_step:
        losses_at.weighted(losses_at.stacked_losses(z, timestep, vectors)).backward()
    other = TokenLosses(model, parse_marked_prompt("a red {house}", model.tokenizer), layers,
                        torch.ones(16, 16, device="meta"), DynamicPromptConfig())
    lockstep = LockstepTokenLosses([losses_at, other], captured)
    params = [vectors.detach().requires_grad_(True),
              torch.randn(1, model.text_encoder.config.hidden_size, device="meta", requires_grad=True)]
    with losses_at.hook, HostTensors() as lockstep_step:
        lockstep.every_loss(z.expand(2, -1, -1, -1), timestep, *params).sum().backward()
    target = parse_marked_prompt("a cat and a tiger", model.tokenizer, require_words=False)
    plan = make_plan(marked, [target], [2, 5], EditConfig(blend=("cat",)), 3, model.tokenizer)
    hooked = [layer for layer in attention_layers(model.unet) if layer.kind == "cross" or layer.resolution <= 16]
    controller = PromptToPrompt(plan, 16, 16, device="meta", map_layers=hooked)
    with attention_hook(model.unet, hooked, controller), HostTensors() as edit_step, torch.no_grad():
        model.unet_sample(z.expand(4, -1, -1, -1), timestep, states.expand(4, -1, -1))
    assert unet.ops == [] and token_step.ops == [] and lockstep_step.ops == [] and edit_step.ops == []
    assert vectors.grad is not None and all(p.grad is not None for p in params)


@pytest.fixture
def no_automatic_collection():
    """Python's collector left to the code under test (a cycle made in the test is freed only by it)."""
    thresholds = gc.get_threshold()
    gc.set_threshold(10**6)
    yield
    gc.set_threshold(*thresholds)


@pytest.mark.parametrize("short", [True, False])
def test_no_garbage_collection_during_a_capture_and_dead_graphs_collected_first_where_memory_is_short(
        monkeypatch, no_automatic_collection, short):
    """A graph that dies in a reference cycle must not be destroyed while another capture is underway
    (the H200 refused a lockstep token step's capture so): the collector stays off during the
    capture and is on again after it; where the device is short of memory, dead cycles (and the
    memory their graphs keep) are collected first, and only there (a full collection costs a
    quarter of a second)."""
    class Graphs:  # an ended inversion's graphed step: a cycle only the collector frees
        pass
    dead = Graphs()
    dead.itself = dead
    gone = weakref.ref(dead)
    del dead
    seen = {}

    def make_graphed_callables(function, samples, allow_unused_input):
        seen["dead graphs collected"], seen["collector on"] = gone() is None, gc.isenabled()
        return function
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (10 if short else 50, 100))
    assert gc.isenabled()
    capture_cuda_graph(lambda x: x, (torch.ones(1),))
    assert seen == {"dead graphs collected": short, "collector on": False} and gc.isenabled()


@pytest.mark.parametrize(("on_cuda", "options", "graphed"), [
    (True, {}, True), (True, {"compile": True}, False), (True, {"cuda_graphs": False}, False), (False, {}, False),
])
def test_load_model_uses_cuda_graphs_by_default_on_cuda(monkeypatch, on_cuda, options, graphed):
    """``load_model`` replays CUDA graphs wherever the model is on CUDA and not compiled (the device
    is faked: the CPU has none)."""
    calls = []
    if on_cuda:
        monkeypatch.setattr(StableDiffusion, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(StableDiffusion, "use_cuda_graphs", lambda self: calls.append("graphs") or self)
    monkeypatch.setattr(StableDiffusion, "compile", lambda self: calls.append("compile") or self)
    load_model("tiny", **options)
    assert ("graphs" in calls) is graphed and ("compile" in calls) is bool(options.get("compile"))


def test_float32_on_cuda_with_tf32_is_checked_at_float16s_tolerance():
    """cuDNN's float32 convolutions run in TF32 by PyTorch's default (float16's 10-bit mantissa), so
    a captured or compiled gradient is checked against eager at float16's tolerance there; on the
    CPU, in half precision and with TF32 off, each dtype keeps its own."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32, matmul.allow_tf32 = True, False  # PyTorch's defaults
        assert gradient_tolerance(torch.float32, cuda) == COMPILE_TOLERANCE[torch.float16]
        assert gradient_tolerance(torch.float32, cpu) == COMPILE_TOLERANCE[torch.float32]
        assert gradient_tolerance(torch.bfloat16, cuda) == COMPILE_TOLERANCE[torch.bfloat16]
        cudnn.allow_tf32 = False
        assert gradient_tolerance(torch.float32, cuda) == COMPILE_TOLERANCE[torch.float32]
        matmul.allow_tf32 = True
        assert gradient_tolerance(torch.float32, cuda) == COMPILE_TOLERANCE[torch.float16]
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/speed_gpu.sh runs it there)")
@pytest.mark.parametrize("method", ["nti", "dpl"])
def test_real_cuda_graphs_match_eager(image, method, caplog):
    """The real captures on a GPU: no fallback (every graphed gradient passed its check against
    eager), and the same inversion as eager up to what rounding becomes over two steps of Adam. In
    float32 on CUDA the convolutions run in TF32 (PyTorch's default) and a captured kernel may be
    another algorithm than eager's, so the gradients differ at float16's precision, and Adam's
    normalised steps carry that into the learned vectors: on an H200, 1.3e-3 (NTI's null states) and
    4.9e-3 (DPL's) relative over two steps. A stale buffer or a map of another step makes the
    difference of the order of the vectors themselves; 2e-2 tells the two apart. A second eager run
    prints eager's own spread beside it."""
    def run(model):
        return invert(model, to_pil(image), "a {cat} and a {dog}", method=method, num_steps=2,
                      dpl=DynamicPromptConfig(max_iterations=3), progress=False)
    eager = tiny_model(seed=0).to("cuda")
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        graphed = tiny_model(seed=0).to("cuda").use_cuda_graphs()
        runs = [run(eager), run(graphed), run(eager)]
    assert "CUDA graphs" not in caplog.text and graphed.graphed_unet is not None
    for name in ("null_states", "token_vectors", "trajectory"):  # (a kept capture output would be far off)
        reference = getattr(runs[0], name)
        if reference is not None:
            graphed_error, eager_spread = (((getattr(r, name) - reference).norm() / reference.norm()).item()
                                           for r in runs[1:])
            print(f"{method} {name}: graphed against eager {graphed_error:.2g}, eager against eager {eager_spread:.2g}")
            assert graphed_error < 2e-2, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/speed_gpu.sh runs it there)")
def test_real_cuda_graphs_edit_like_eager(image, caplog):
    """Two edits of one layout on a GPU, the second replaying the first's capture with its own
    mappings and windows: one capture, no fallback, and each target branch as eager's up to
    rounding. Measured against the edit itself (target less source, 0.25-0.4 of the latents on the
    tiny model): a stale mapping or window puts the second edit 0.10 off on the CPU stand-in, and
    TF32's rounding should stay near 1e-3; 3e-2 tells the two apart. A second eager run prints
    eager's own spread beside it."""
    eager = tiny_model(seed=0).to("cuda")
    inversion = invert(eager, to_pil(image), "a {cat} and a {dog}", num_steps=3, progress=False)
    with caplog.at_level(logging.WARNING, logger="dpl_edit"):
        graphed = tiny_model(seed=0).to("cuda").use_cuda_graphs()
        for target, config in [("a cat and a tiger", EditConfig(mode="replace", blend=("cat",))),
                               ("a cat and a big tiger", EditConfig(mode="refine"))]:
            runs = [edit(m, inversion, [target], config, progress=False).latents for m in (eager, graphed, eager)]
            size = (runs[0][1:] - runs[0][:1]).norm()
            graphed_error, eager_spread = (((r[1:] - runs[0][1:]).norm() / size).item() for r in runs[1:])
            print(f"{config.mode} edit: graphed against eager {graphed_error:.2g}, eager against eager {eager_spread:.2g}")
            assert graphed_error < 3e-2, config.mode
    assert "CUDA graphs" not in caplog.text and graphed.graphed_unet is not None
    assert len([key for key in graphed.graphed_steps if key[0] == "edit"]) == 1
