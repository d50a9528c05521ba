"""LPIPS on SqueezeNet 1.1 (PIE-Bench's LPIPS: torchmetrics' ``LearnedPerceptualImagePatchSimilarity
(net_type="squeeze")``), without torchvision.

torchmetrics takes the backbone from torchvision, which does not install beside this project's CPU
build of torch. So the backbone is written here in torchvision's layout (its state-dict names, so
torchvision's own weight file ``squeezenet1_1-b8a52dc0.pth`` loads as it is), and everything else is
torchmetrics': the linear layers are the file torchmetrics ships (``lpips_models/squeeze.pth``), and
the computation is LPIPS' (Zhang et al. 2018): inputs in [-1, 1] shifted and scaled per channel, the
seven ReLU outputs normalised over channels, squared differences weighted by the linear layers,
averaged over space and summed.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import DplEditError

# torchvision's squeezenet1_1: 1,235,496 parameters, the 1000-class classifier (512 x 1000 + 1000) included.
SQUEEZENET_PARAMETERS = 1_235_496
WEIGHTS_FILE = "squeezenet1_1-b8a52dc0.pth"  # torchvision's SqueezeNet1_1_Weights.IMAGENET1K_V1
# LPIPS' ScalingLayer: (x - shift) / scale on inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# The features' indices where LPIPS' seven slices end (relu1 ... relu7) and their channels.
SLICE_ENDS = (2, 5, 8, 10, 11, 12, 13)
CHANNELS = (64, 128, 256, 384, 384, 512, 512)


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expansions side by side."""

    def __init__(self, inputs: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inputs, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


def squeezenet1_1_features() -> nn.Sequential:
    """torchvision's ``squeezenet1_1().features``, same modules at the same indices."""
    pool = {"kernel_size": 3, "stride": 2, "ceil_mode": True}
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(), nn.MaxPool2d(**pool),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(**pool),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(**pool),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )


def torchmetrics_linear_layers() -> list[torch.Tensor]:
    """The seven (1, C, 1, 1) LPIPS weights torchmetrics ships for SqueezeNet."""
    path = resources.files("torchmetrics.functional.image") / "lpips_models" / "squeeze.pth"
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"] for i in range(len(CHANNELS))]


class Lpips(nn.Module):
    """LPIPS distance of two (N, 3, H, W) batches in [-1, 1] (one value per pair)."""

    def __init__(self, features: nn.Sequential, linear: list[torch.Tensor]):
        super().__init__()
        self.features = features
        self.linear = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in linear)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> Lpips:
        """LPIPS with torchvision's SqueezeNet 1.1 weights from ``path`` (a .pth or .safetensors state
        dict in torchvision's names, or a folder holding one)."""
        file = _weight_file(Path(path))
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(file))
            else:
                state = torch.load(str(file), map_location="cpu", weights_only=True)
            features = squeezenet1_1_features()
            features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
        except Exception as err:  # any unreadable file (pickle, safetensors, shapes): say which and why
            raise DplEditError(f"Could not load SqueezeNet 1.1 weights from {file} ({err}); give torchvision's "
                               f"{WEIGHTS_FILE} with --lpips or DPL_LPIPS") from err
        return cls(features, torchmetrics_linear_layers()).to(device)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, start = [], 0
        x = (x - self.shift) / self.scale
        for end in SLICE_ENDS:
            for module in self.features[start:end]:
                x = module(x)
            outputs.append(x)
            start = end
        return outputs

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = 0
        for fa, fb, weight in zip(self.layers(a), self.layers(b), self.linear, strict=True):
            fa = fa / torch.sqrt(1e-8 + (fa**2).sum(1, keepdim=True))
            fb = fb / torch.sqrt(1e-8 + (fb**2).sum(1, keepdim=True))
            total = total + nn.functional.conv2d((fa - fb) ** 2, weight).mean((2, 3), keepdim=True)
        return total.flatten()


def default_weights() -> Path | None:
    """``DPL_LPIPS``, else torchvision's file in the torch hub cache (where torchmetrics would find it)."""
    if os.environ.get("DPL_LPIPS"):
        return Path(os.environ["DPL_LPIPS"])
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    return cached if cached.is_file() else None


def _weight_file(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("squeezenet1_1*.pth")) + sorted(path.glob("*.safetensors"))
        if not found:
            raise DplEditError(f"No SqueezeNet 1.1 weights in {path}: expected torchvision's {WEIGHTS_FILE} "
                               "(or a .safetensors of it); give it with --lpips or DPL_LPIPS")
        return found[0]
    if not path.is_file():
        raise DplEditError(f"SqueezeNet 1.1 weights not found: {path}; give torchvision's {WEIGHTS_FILE} "
                           "with --lpips or DPL_LPIPS")
    return path
