import contextlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Under `-n auto` each test process (and each process it starts) takes one thread: torch's threads
# in several processes spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch

from dpl_edit.attention import AttentionStore, ForwardStopped, StopAfter
from dpl_edit.attention.hook import active_hook
from dpl_edit.inversion import DynamicPromptConfig, NullTextConfig
from dpl_edit.random_models import tiny_model


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n``, whole files to each test process: a file's module fixtures are built once."""
    from xdist.scheduler import LoadFileScheduling

    return LoadFileScheduling(config, log)


@pytest.fixture(scope="session")
def model():
    """A tiny random-weight Stable Diffusion (128 px images, 32x32 latents)."""
    return tiny_model(seed=0)


@pytest.fixture
def image():
    """A smooth random image (1, 3, 128, 128) in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=128, mode="bilinear", align_corners=False)


@pytest.fixture
def one_at_a_time(model, monkeypatch):
    """The model's UNet called once per image of a batch (the maps a recording store takes are put
    back together as one batched call's, and an early exit ends the batched call after every image
    ran to it; under any other hook, such as an edit's controller, which needs its whole batch, it
    is called as it is), and the batch sizes it was called with."""
    unet_sample, sizes = model.unet_sample, []

    def call(latents, timestep, states):
        hook = active_hook(model.unet)
        observer = None if hook is None else hook.observer
        stops = isinstance(observer, StopAfter)  # DPL's token step: the forward ends after the maps it reads
        store = observer.observer if stops else observer
        if hook is not None and not isinstance(store, AttentionStore):
            return unet_sample(latents, timestep, states)
        outputs, recorded = [], []
        for b in range(latents.shape[0]):
            mark = store.mark() if store is not None else None
            with contextlib.suppress(ForwardStopped):
                outputs.append(unet_sample(latents[b : b + 1], timestep, states[b : b + 1]))
            if store is not None:
                recorded.append(store.take_since(mark))
        if store is not None:
            store.give_back([(key, torch.cat([maps[j][1] for maps in recorded]))
                             for j, (key, _) in enumerate(recorded[0])])
        sizes.append(latents.shape[0])
        if stops:
            raise ForwardStopped
        return torch.cat(outputs)

    monkeypatch.setattr(model, "unet_sample", call)
    return sizes


@pytest.fixture
def one_stops_at_once():
    """Two prompts and DPL settings under which, on the tiny model, the first image's token steps
    end at once (one noun: L_bg only, whose threshold is above any cosine) and the second's run to
    the cap of 3 (two nouns: L_at, at about 0.98 on random weights, never meets 0.5):
    ``(prompts, dpl, null_text)``."""
    dpl = DynamicPromptConfig(cross_resolution=8, self_resolution=8, max_iterations=3, threshold_at=0.5,
                              threshold_dj=2.0, threshold_bg=2.0)
    return ["a {house} on grass", "a red {dog} and a {cat}"], dpl, NullTextConfig(max_iterations=2)
