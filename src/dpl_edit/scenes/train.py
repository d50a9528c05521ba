"""Training the scene model: first the VAE, then the UNet and text encoder on its latents.

Seeded and resumable: every batch (scene indices, noise, timesteps, caption dropout) is drawn
from a generator seeded by (seed, stage, step), so a run resumed from a checkpoint continues
exactly. With ``grounding_weight`` > 0 the UNet is also trained to keep each object noun's
cross-attention on its object (see :mod:`.grounding`). A checkpoint folder holds fp32 weights (one
safetensors file per component), EMA weights and AdamW state as safetensors and the progress as
JSON. An exported model (fp16 EMA weights in a diffusers folder, small enough to commit or to copy
off a GPU machine) records the progress too, and training resumes from it with a fresh optimiser.
On CUDA the steps run under bf16 autocast, optionally with ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import checks
from ..attention.hook import attention_hook
from ..attention.layers import attention_layers, select_layers
from ..errors import DplEditError
from ..models import SETTINGS_FILE, StableDiffusion
from .data import MASK_RESOLUTION, SceneSet, render_scene_set
from .grounding import GroundingObserver

logger = logging.getLogger(__name__)
STAGES = ("vae", "diffusion", "done")


@dataclass(frozen=True)
class TrainConfig:
    """Scene-model training settings (the defaults are the bundled model's)."""

    seed: int = 0
    train_scenes: int = 20_000  # rendered once, scenes 0 .. N-1 of the train split
    vae_steps: int = 3_000
    vae_batch_size: int = 64
    vae_learning_rate: float = 5e-4
    kl_weight: float = 1e-6
    diffusion_steps: int = 20_000
    batch_size: int = 128
    learning_rate: float = 3e-4  # UNet and text encoder, after a linear warm-up
    warmup_steps: int = 500
    caption_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    ema_decay: float = 0.999
    grounding_weight: float = 0.01  # token grounding loss at the 16x16 cross-attention layers (0: off)
    checkpoint_every: int = 1_000

    def __post_init__(self) -> None:
        for name in ("train_scenes", "vae_batch_size", "batch_size", "checkpoint_every"):
            checks.count(name.replace("_", " "), getattr(self, name))
        for name in ("seed", "vae_steps", "diffusion_steps", "warmup_steps"):
            checks.count(name.replace("_", " "), getattr(self, name), 0)
        for name in ("vae_learning_rate", "learning_rate"):
            checks.finite(name.replace("_", " "), getattr(self, name), 0.0, above=True)
        checks.finite("kl weight", self.kl_weight, 0.0)
        checks.finite("grounding weight", self.grounding_weight, 0.0)
        checks.fraction("caption dropout", self.caption_dropout)
        checks.fraction("EMA decay", self.ema_decay)


class SceneTrainer:
    """Trains into ``folder`` (checkpoint/, loss_log.jsonl, model/ when done)."""

    def __init__(self, config: TrainConfig, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 compile: bool = False):
        self.config = config
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.compile = compile
        # diffusers' model classes load when a training starts, not at `dpl --help`
        from .model import scene_model

        self.model = scene_model(config.seed).to(self.device)
        self.stage, self.step = "vae", 0
        self.ema: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_state: dict | None = None
        self.scaling_factor: float | None = None
        self.data: SceneSet | None = None
        self.latents: torch.Tensor | None = None
        self.grounding: GroundingObserver | None = None

    # ------------------------------------------------------------------ the run
    def run(self, time_limit: float | None = None, progress: bool = True) -> bool:
        """Train until done or ``time_limit`` seconds; checkpoint; return True when finished."""
        started = time.monotonic()
        self.resume()
        if self.stage == "done":
            return True
        self.data = render_scene_set("train", self.config.train_scenes, progress=progress).to(self.device)
        try:
            if self.stage == "vae":
                if not self._train("vae", self.config.vae_steps, started, time_limit, progress):
                    return False
                self._begin_diffusion()
            if not self._train("diffusion", self.config.diffusion_steps, started, time_limit, progress):
                return False
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        self.stage, self.step = "done", 0
        self.save_checkpoint()
        self.export(self.folder / "model")
        return True

    def _train(self, stage: str, total: int, started: float, time_limit: float | None, progress: bool) -> bool:
        step_fn = self._vae_step if stage == "vae" else self._diffusion_step
        if self.optimizer is None:
            self._make_optimizer()
        bar = tqdm(total=total, initial=self.step, desc=f"Training {stage}", disable=not progress)
        with open(self.folder / "loss_log.jsonl", "a") as log, self._grounding_hook():
            while self.step < total:
                losses = self._step_with_fallback(step_fn)
                self.step += 1
                bar.update(1)
                if self.step % 50 == 0 or self.step == total:
                    values = {name: value.item() for name, value in losses.items()}
                    bar.set_postfix({name: f"{value:.4f}" for name, value in values.items()})
                    log.write(json.dumps({"stage": stage, "step": self.step, **values}) + "\n")
                    log.flush()
                if self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
                if time_limit is not None and time.monotonic() - started > time_limit:
                    self.save_checkpoint()
                    bar.close()
                    logger.info("Time limit reached at %s step %d; resume to continue.", stage, self.step)
                    return False
        bar.close()
        return True

    def _grounding_hook(self) -> contextlib.AbstractContextManager:
        """Within it, the grounding observer sees the 16x16 cross-attention (diffusion stage only)."""
        if self.stage != "diffusion" or self.config.grounding_weight == 0:
            self.grounding = None
            return contextlib.nullcontext()
        self.grounding = GroundingObserver()
        layers = select_layers(attention_layers(self.model.unet), kinds=["cross"], resolutions=[MASK_RESOLUTION])
        return attention_hook(self.model.unet, layers, self.grounding)

    def _step_with_fallback(self, step_fn) -> dict[str, torch.Tensor]:
        """One step; if the compiled UNet fails, continue without torch.compile."""
        try:
            return step_fn()
        except Exception as err:  # a compiler failure, whatever its type
            if self.unet_forward is self.model.unet:
                raise
            logger.warning("torch.compile failed (%s: %s); continuing without it", type(err).__name__, err)
            self.unet_forward = self.model.unet
            return step_fn()

    # ------------------------------------------------------------------ steps
    def _generator(self) -> torch.Generator:
        g = torch.Generator(self.device)
        g.manual_seed(self.config.seed * 1_000_003 + STAGES.index(self.stage) * 100_000_007 + self.step)
        return g

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _vae_step(self) -> dict[str, torch.Tensor]:
        g = self._generator()
        index = torch.randint(len(self.data), (self.config.vae_batch_size,), generator=g, device=self.device)
        images = self.data.batch_images(index)
        with self._autocast():
            posterior = self.vae_forward.encode(images).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g, device=self.device)
            reconstruction = self.vae_forward.decode(z).sample
        loss = F.mse_loss(reconstruction.float(), images) + 0.5 * F.l1_loss(reconstruction.float(), images)
        loss = loss + self.config.kl_weight * posterior.kl().mean()
        self._update(loss, self.config.vae_learning_rate)
        return {"loss": loss.detach()}

    def _diffusion_step(self) -> dict[str, torch.Tensor]:
        g, batch = self._generator(), self.config.batch_size
        index = torch.randint(len(self.latents), (batch,), generator=g, device=self.device)
        z0 = self.latents[index].float()
        ids = self.data.token_ids[index]
        dropped = torch.rand(batch, generator=g, device=self.device) < self.config.caption_dropout
        ids = torch.where(dropped[:, None], self.empty_ids, ids)
        t = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=g, device=self.device)
        eps = torch.randn(z0.shape, generator=g, device=self.device)
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = alpha.sqrt() * z0 + (1 - alpha).sqrt() * eps  # q(z_t | z_0), DDPM Eq. 4
        if self.grounding is not None:  # nouns of dropped captions are not in the prompt
            self.grounding.begin(self.data.noun_tokens[index] * ~dropped[:, None, None], self.data.object_masks[index])
        with self._autocast():
            states = self.model.text_encoder(ids).last_hidden_state
            prediction = self.unet_forward(zt, t, encoder_hidden_states=states).sample
        losses = {"loss": F.mse_loss(prediction.float(), eps)}
        total = losses["loss"]
        if self.grounding is not None:
            losses["grounding"] = self.grounding.loss()
            total = total + self.config.grounding_weight * losses["grounding"]
        warmup = min(1.0, (self.step + 1) / self.config.warmup_steps)
        self._update(total, self.config.learning_rate * warmup)
        self._update_ema()
        return {name: value.detach() for name, value in losses.items()}

    def _update(self, loss: torch.Tensor, learning_rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self._ema_pairs[0], self._ema_pairs[1], 1 - decay)

    # ------------------------------------------------------------------ stage set-up
    def _trained_modules(self) -> dict[str, torch.nn.Module]:
        if self.stage == "vae":
            return {"vae": self.model.vae}
        return {"unet": self.model.unet, "text_encoder": self.model.text_encoder}

    def _trained_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        for prefix, module in self._trained_modules().items():
            for name, param in module.named_parameters():
                yield f"{prefix}.{name}", param

    def _make_optimizer(self) -> None:
        for module in (self.model.vae, self.model.unet, self.model.text_encoder):
            module.requires_grad_(False).eval()
        for module in self._trained_modules().values():
            module.requires_grad_(True).train()
        params = [p for _, p in self._trained_parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=self.config.learning_rate, weight_decay=0.01)
        if self.optimizer_state is not None:
            self.optimizer.load_state_dict(self.optimizer_state)
            self.optimizer_state = None
        self.vae_forward, self.unet_forward = self.model.vae, self.model.unet
        if self.compile and self.device.type == "cuda":
            self.unet_forward = torch.compile(self.model.unet)
        if self.stage == "diffusion":
            self._prepare_diffusion()
            if not self.ema:
                self.ema = {n: p.detach().clone() for n, p in self._trained_parameters()}
            params = dict(self._trained_parameters())
            self._ema_pairs = ([self.ema[n] for n in self.ema], [params[n].detach() for n in self.ema])

    def _begin_diffusion(self) -> None:
        """Freeze the VAE; fix the latent scale so latents have unit variance (as SD's 0.18215 does)."""
        self.stage, self.step, self.optimizer, self.ema = "diffusion", 0, None, {}
        self.model.vae.register_to_config(scaling_factor=1.0)
        self.scaling_factor = 1.0 / self._encode_all().float().std().item()
        self._make_optimizer()

    def _prepare_diffusion(self) -> None:
        self.model.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.latents = self._encode_all().to(torch.float16)
        self.alphas_cumprod = self.model.scheduler.alphas_cumprod.to(self.device, torch.float32)
        empty = self.model.tokenizer("", padding="max_length", max_length=77).input_ids
        self.empty_ids = torch.tensor(empty, device=self.device)

    @torch.no_grad()
    def _encode_all(self) -> torch.Tensor:
        chunks = torch.arange(len(self.data), device=self.device).split(256)
        return torch.cat([self.model.encode_image(self.data.batch_images(c)) for c in chunks])

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self) -> Path:
        """Write folder/checkpoint atomically: weights, EMA, AdamW state (safetensors), state.json."""
        final = self.folder / "checkpoint"
        tmp = self.folder / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for prefix, module in _modules(self.model).items():
            save_file(_cpu(module.state_dict()), tmp / f"{prefix}.safetensors")
        if self.ema:
            save_file(_cpu(self.ema), tmp / "ema.safetensors")
        groups = None
        if self.optimizer is not None:
            state = self.optimizer.state_dict()
            flat = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
            save_file(_cpu(flat), tmp / "optimizer.safetensors")
            groups = state["param_groups"]
        progress = {"stage": self.stage, "step": self.step, "scaling_factor": self.scaling_factor,
                    "config": asdict(self.config), "param_groups": groups}
        (tmp / "state.json").write_text(json.dumps(progress, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def saved_progress(self) -> tuple[Path, dict] | None:
        """What training continues from: folder/checkpoint (full) or else folder/weights (an exported
        model) and its progress; None where the folder holds neither."""
        full, light = self.folder / "checkpoint", self.folder / "weights"
        if (full / "state.json").is_file():
            return full, _read_progress(full / "state.json")
        progress = _read_progress(light / SETTINGS_FILE, "training") if (light / SETTINGS_FILE).is_file() else None
        return None if progress is None else (light, progress)

    def resume(self) -> None:
        """Continue from :meth:`saved_progress`, if there is any."""
        self.folder.mkdir(parents=True, exist_ok=True)
        saved = self.saved_progress()
        if saved is None:
            return
        source, progress = saved
        theirs = {k: v for k, v in progress["config"].items() if k not in _MAY_CHANGE}
        current = {k: v for k, v in asdict(self.config).items() if k not in _MAY_CHANGE}
        if theirs != current:
            raise ValueError(f"{source} was made with other settings ({theirs}); train into a new folder.")
        self.stage, self.step, self.scaling_factor = progress["stage"], progress["step"], progress["scaling_factor"]
        if self.scaling_factor is not None:
            self.model.vae.register_to_config(scaling_factor=self.scaling_factor)
        if source.name == "weights":  # fp16 EMA weights: both the weights and the EMA start from them
            exported = StableDiffusion.from_pretrained(source)
            for prefix, module in _modules(self.model).items():
                module.load_state_dict(getattr(exported, prefix).state_dict())
            self.ema = {}
        else:
            for prefix, module in _modules(self.model).items():
                weights = load_file(source / f"{prefix}.safetensors", device=str(self.device))
                module.load_state_dict({k: v.float() for k, v in weights.items()})
            if (source / "ema.safetensors").is_file():
                self.ema = {k: v.float() for k, v in load_file(source / "ema.safetensors", device=str(self.device)).items()}
        if (source / "optimizer.safetensors").is_file():
            flat = load_file(source / "optimizer.safetensors", device=str(self.device))
            state: dict[int, dict] = {}
            for key, value in flat.items():
                index, name = key.split(".", 1)
                state.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
            self.optimizer_state = {"state": state, "param_groups": progress["param_groups"]}
        logger.info("Resumed from %s at %s step %d", source, self.stage, self.step)

    def ema_model(self) -> StableDiffusion:
        """A copy of the model with the EMA weights (the VAE has none: its trained weights), frozen
        and in eval mode; the model in training keeps its own weights."""
        model = copy.deepcopy(self.model)
        if self.ema:
            for prefix, module in {"unet": model.unet, "text_encoder": model.text_encoder}.items():
                module.load_state_dict({k[len(prefix) + 1:]: v for k, v in self.ema.items()
                                        if k.startswith(prefix + ".")}, strict=False)
        for module in _modules(model).values():
            module.requires_grad_(False).eval()
        return model

    def export(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
        """A diffusers folder (safetensors) of the EMA model, loadable by the engine; its dpl_edit.json
        also records the training progress, so that training can resume from it (put it at
        ``<training folder>/weights``; the optimiser starts afresh)."""
        model = self.ema_model()
        progress = {"stage": self.stage, "step": self.step, "scaling_factor": self.scaling_factor,
                    "config": asdict(self.config)}
        model.settings = {**model.settings, "training": progress}
        model.save_pretrained(folder, dtype=dtype)
        return Path(folder)


def _read_progress(path: Path, key: str | None = None) -> dict | None:
    """A run's progress (stage, step, scaling factor, config) in the JSON file at ``path``: the whole
    file (a checkpoint's state.json) or its ``key`` entry (an export's dpl_edit.json; None where it
    has none). A file damaged or edited by hand is said to be, with what to do, rather than failing
    somewhere in the resumption."""
    try:
        saved = json.loads(path.read_text())
        progress = saved if key is None else saved.get(key)
        if key is not None and progress is None:
            return None
        if not isinstance(progress, dict) or not {"stage", "step", "scaling_factor", "config"} <= set(progress):
            raise ValueError("no stage, step, scaling_factor and config")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise DplEditError(f"{path} holds no training progress that can be read ({err}): move its folder "
                           f"({path.parent}) away to train from the step before it, or train into a new folder.") from err
    return progress


# Settings that may change between resumptions (e.g. a GPU run continued on a CPU with smaller batches,
# or grounding switched on for a model first trained without it).
_MAY_CHANGE = ("vae_steps", "diffusion_steps", "checkpoint_every", "batch_size", "vae_batch_size", "grounding_weight")


def _modules(model: StableDiffusion) -> dict[str, torch.nn.Module]:
    return {"vae": model.vae, "unet": model.unet, "text_encoder": model.text_encoder}


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
