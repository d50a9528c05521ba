import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from dpl_edit.random_models import tiny_model


@pytest.fixture(scope="session")
def model():
    """A tiny random-weight Stable Diffusion (128 px images, 16x16 latents)."""
    return tiny_model(seed=0)


@pytest.fixture
def image():
    """A smooth random image (1, 3, 128, 128) in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=128, mode="bilinear", align_corners=False)
