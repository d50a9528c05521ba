"""At most one host synchronisation per iteration (issue 11): the inner loops read one value from the
device per iteration (the early-stop check), and nothing else they run reads the device per step.

On a GPU each read of a device tensor's value on the host (``.item()``, ``.tolist()``, ``float(t)``,
``if t:``, ``.cpu()``, ``nonzero``, a boolean mask) waits for every kernel launched before it, which
stalls the launch queue and leaves the GPU idle. These tests count such reads on the CPU, where every
tensor is on the host, by the line of dpl-edit, diffusers or transformers that makes them, eager and
on a model with CUDA graphs (the GPU's default). Left out: the optimisers' own reads (torch.optim
keeps its step counts on the host unless ``capturable``).
"""

import collections
import sys

import pytest
import torch
from test_cuda_graphs import fixed_memory
from torch import Tensor
from torch.overrides import TorchFunctionMode

from dpl_edit import EditConfig, edit, invert, invert_many
from dpl_edit.images import to_pil
from dpl_edit.inversion import DynamicPromptConfig, NullTextConfig
from dpl_edit.random_models import tiny_model

READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__,
         Tensor.numpy, Tensor.cpu, Tensor.nonzero, torch.nonzero, Tensor.unique, torch.unique,
         Tensor.masked_select, torch.masked_select}
TORCH = f"{torch.__path__[0]}/"
OPTIM = f"{TORCH}optim/"


class HostReads(TorchFunctionMode):
    """Counts the reads of tensor values on the host, by (file, function, line) of the first frame
    outside torch that asked for them."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS or (func is Tensor.__getitem__ and _boolean_index(args[1])):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                if frame.f_code.co_filename.startswith(OPTIM):
                    break  # the optimiser's host-side step count
                frame = frame.f_back
            else:
                if frame is not None:
                    code = frame.f_code
                    self.sites[(code.co_filename.rsplit("/", 1)[-1], code.co_name, frame.f_lineno)] += 1
        return func(*args, **(kwargs or {}))

    def at(self, function: str) -> int:
        return sum(n for (_, name, _), n in self.sites.items() if name == function)

    def besides(self, *functions: str) -> collections.Counter:
        return collections.Counter({site: n for site, n in self.sites.items() if site[1] not in functions})


def _boolean_index(index) -> bool:
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in (index if isinstance(index, tuple) else (index,)))


def _counted(call):
    with HostReads() as reads:
        result = call()
    return reads, result


@pytest.fixture
def picture(image):
    return to_pil(image)


def _model(graphs: bool, model):
    """The session's model, or a fresh one with CUDA graphs played by a stand-in that keeps their
    fixed buffers and replays the function eagerly (so a read in it would count at every replay)."""
    return tiny_model(seed=0).use_cuda_graphs(capture=fixed_memory) if graphs else model


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_an_nti_iteration_reads_the_device_once(model, picture, graphs):
    config = NullTextConfig(max_iterations=4, early_stop=False)
    runs = {steps: _counted(lambda s=steps: invert(_model(graphs, model), picture, "a cat", method="nti",
                                                   num_steps=s, null_text=config, progress=False))
            for steps in (2, 3)}
    for steps, (reads, _) in runs.items():
        assert reads.at("optimize_null") == 4 * steps  # its loss, once per iteration
    assert runs[2][0].besides("optimize_null") == runs[3][0].besides("optimize_null")  # nothing per step


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_dpl_iteration_reads_the_device_once(model, picture, graphs):
    config = DynamicPromptConfig(max_iterations=3)
    null_text = NullTextConfig(max_iterations=2, early_stop=False)
    runs = {steps: _counted(lambda s=steps: invert(_model(graphs, model), picture, "a {cat} and a {dog}",
                                                   method="dpl", num_steps=s, dpl=config, null_text=null_text,
                                                   progress=False))
            for steps in (2, 3)}
    for steps, (reads, inversion) in runs.items():
        evaluations = sum(min(entry["iterations"] + 1, config.max_iterations) for entry in inversion.dpl_log)
        assert reads.at("optimize_tokens_many") == evaluations  # its losses, once per evaluation
        assert reads.at("optimize_null") == 2 * steps
    every_step = ("optimize_tokens_many", "optimize_null")
    assert runs[2][0].besides(*every_step) == runs[3][0].besides(*every_step)


def test_a_lockstep_iteration_reads_the_device_once_for_the_batch(model, picture):
    null_text = NullTextConfig(max_iterations=3, early_stop=False)
    reads, _ = _counted(lambda: invert_many(model, [picture, picture.transpose(0)], ["a cat", "a dog"],
                                            method="nti", num_steps=2, null_text=null_text, progress=False))
    assert reads.at("optimize_null") == 3 * 2


def test_an_edit_reads_nothing_per_step(model, picture):
    config = EditConfig(blend=("cat",), self_replace_steps=0.5)
    runs = {}
    for steps in (3, 4):
        inversion = invert(model, picture, "a {cat} and a {dog}", method="ddim", num_steps=steps, progress=False)
        runs[steps], _ = _counted(lambda i=inversion: edit(model, i, ["a fox and a dog"], config, progress=False))
    assert runs[3].sites == runs[4].sites
