"""The one place that knows diffusers/transformers details: loading Stable Diffusion components,
encoding images and text, the VAE scale, dtype and device.

Every model (Stable Diffusion 1.4/1.5/2.x, the project's scene model, tiny random test models)
goes through the same :class:`StableDiffusion` object, so every code path is the real one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import checks
from .attention.early_exit import ForwardStopped
from .attention.hook import AttentionHook, active_hook, is_hooked
from .attention.store import AttentionStore
from .cuda_graphs import Capture, GraphedFunction, GraphedRecording, capture_cuda_graph
from .errors import DplEditError, ModelLoadError, PromptError

if TYPE_CHECKING:  # diffusers and transformers load when a model does (`dpl --help` without them)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
FOLDER_LAYOUT = ", ".join(["model_index.json", *(f"{c}/" for c in COMPONENTS)])  # a diffusers folder, as messages name it
# Largest relative error of the compiled UNet's gradient against eager that compile() accepts: about
# 100x what reordered reductions give (fp32: 1.4e-6 measured on the tiny model; bf16/fp16 eps 8e-3 / 1e-3).
COMPILE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float64: 1e-8}
RECORDING_CAPTURES = 4  # input signatures (batch sizes) of a recorded forward whose captures a model keeps
EDIT_LAYOUTS = 2  # edit layouts (PromptToPrompt.graph_layout) whose captured forwards a model keeps
RECOMPILE_LIMIT = 32  # graphs of the UNet's forward a compiled model may hold (dynamo's default: 8)
SETTINGS_FILE = "dpl_edit.json"  # optional: the method settings a model recommends, e.g. its map sizes
WEIGHTED = ("text_encoder", "unet", "vae")  # the components with weights
# a component's safetensors weights, whole or sharded, plain or a variant ("fp16", "non_ema", ...)
WEIGHTS_FILE = re.compile(r"(?:model|diffusion_pytorch_model)(?:\.(\w+))?(?:-\d+-of-\d+)?\.safetensors")


def _recommended_settings(file: Path) -> dict:
    """A model folder's dpl_edit.json, checked when the model loads: its ``dpl`` section must make a
    :class:`~dpl_edit.inversion.dynamic_prompt.DynamicPromptConfig` and its ``edit`` section hold
    only what :data:`~dpl_edit.editing.plan.RECOMMENDABLE` names, with values an
    :class:`~dpl_edit.editing.plan.EditConfig` takes (``training`` is the trainer's), so that a
    mistyped recommendation is said to come from the file, not from the user's options."""
    from .editing.plan import RECOMMENDABLE, EditConfig
    from .inversion.dynamic_prompt import DynamicPromptConfig

    def refuse(problem: str) -> ModelLoadError:
        return ModelLoadError(f"{file} (the settings this model recommends) {problem}; fix it or remove it.")

    try:
        settings = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise refuse(f"is not valid JSON ({err})") from err
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k, {}), dict) for k in ("dpl", "edit")):
        raise refuse('must be a JSON object whose "dpl" and "edit" entries are objects')
    for section, make, allowed in (("dpl", DynamicPromptConfig, DynamicPromptConfig.__dataclass_fields__),
                                   ("edit", EditConfig, RECOMMENDABLE)):
        unknown = sorted(set(settings.get(section, {})) - set(allowed))
        if unknown:
            raise refuse(f'names no {section} setting {", ".join(unknown)} (it may recommend {", ".join(allowed)})')
        try:
            make(**settings.get(section, {}))
        except DplEditError as err:
            raise refuse(f"recommends {section} settings that cannot be used: {err}") from err
    return settings


def ddim_scheduler(config: dict) -> DDIMScheduler:
    """The DDIM scheduler of REFERENCE section 1, keeping the model's own beta schedule.

    DDIM without clipping and with the final alpha taken from the schedule (``set_alpha_to_one=
    False``); ``steps_offset=1`` gives the timesteps 981, 961, ..., 1 of Stable Diffusion 1.x.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        config, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"
    )


@dataclass
class StableDiffusion:
    """Stable Diffusion's components, frozen (no parameter requires a gradient).

    Latents are always the *scaled* latents (VAE posterior mean times
    ``vae.config.scaling_factor``); images are (B, 3, H, W) tensors in [-1, 1].
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler
    model_id: str
    settings: dict = field(default_factory=dict)  # method settings shipped with the model (dpl_edit.json)
    variant: str | None = None  # the weight files' variant asked for when loaded (from_pretrained), if any
    compiled: str | None = None  # torch.compile mode of the UNet's forwards (see compile())
    compiled_backward: bool = False  # whether gradient-carrying calls use the compiled UNet too
    hooked_forward: Callable | None = field(default=None, repr=False)  # the compiled forward under attention hooks
    graphed_unet: GraphedFunction | None = field(default=None, repr=False)  # see use_cuda_graphs()
    # the UNet graphed under each open hook that allows it (see graphed())
    graphed_hooks: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    # whole steps graphed once for many calls, by what their function depends on (DPL's token step for
    # every prompt of a layout, see TokenLosses; a recorded forward for every store of its layers and an
    # edit's forward for every edit of its layout, see graphed())
    graphed_steps: dict = field(default_factory=dict, repr=False)
    _timesteps: dict = field(default_factory=dict, repr=False)  # (t, device) -> 0-d tensor, see timestep()
    # an inversion's forwards of one timestep share the UNet's text-free first layers (eager CPU only,
    # bit-identical; see text_free_prefix.py): False computes them at every forward
    reuse_text_free_prefix: bool = True

    def __post_init__(self) -> None:
        for module in (self.text_encoder, self.unet, self.vae):
            module.requires_grad_(False)
            module.eval()

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        variant: str | None = None,
    ) -> StableDiffusion:
        """Load from a diffusers folder or a hub id (safetensors weights only).

        ``variant`` names the weight files to read, as diffusers does (``"fp16"``:
        ``diffusion_pytorch_model.fp16.safetensors``); by default each component's plain weights, or
        the one variant it has where it has none (a folder or hub cache with only the ``fp16`` files).
        Weights are converted to ``dtype`` whichever files they come from. Raises
        :class:`ModelLoadError` with a readable message when the model is missing, not cached while
        offline, or not in the diffusers Stable Diffusion layout.
        """
        device, dtype = checks.device("device", device), checks.dtype("dtype", dtype)
        name = str(name_or_path)
        local = Path(name).expanduser()
        if local.exists():
            local = _main_snapshot(local).resolve()  # absolute: an inversion records it, read from anywhere
            _check_folder(local)
            name = str(local)
        elif _is_a_path(name):  # not a hub id (owner/name): a folder that is not there
            raise ModelLoadError(f"Could not load model {name!r}: there is no folder at {local}. Pass the path of an "
                                 f"existing diffusers folder ({FOLDER_LAYOUT}) or a Hugging Face hub id (owner/name).")
        folder = local if local.exists() else _cached_snapshot(name)  # None: a hub id that diffusers downloads
        variants = _weight_variants(str(name_or_path), folder, variant)
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kwargs = {"use_safetensors": True}
        try:
            with _quiet_diffusers():
                _check_architecture(  # the configurations, before gigabytes of weights
                    str(name_or_path), UNet2DConditionModel.load_config(name, subfolder="unet"),
                    CLIPTextModel.config_class.from_pretrained(name, subfolder="text_encoder").hidden_size,
                    AutoencoderKL.load_config(name, subfolder="vae")["latent_channels"],
                )
                tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer")
                text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=dtype,
                                                             variant=variants["text_encoder"], **kwargs)
                unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=dtype,
                                                            variant=variants["unet"], **kwargs)
                vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=dtype,
                                                    variant=variants["vae"], **kwargs)
                scheduler_config = DDIMScheduler.load_config(name, subfolder="scheduler")
        except (OSError, ValueError) as err:
            raise ModelLoadError(_load_failure_message(str(name_or_path), err)) from err
        settings_file = folder / SETTINGS_FILE if folder else None  # a folder's or a cached hub model's
        settings = _recommended_settings(settings_file) if settings_file and settings_file.is_file() else {}
        model = cls(tokenizer, text_encoder, unet, vae, ddim_scheduler(scheduler_config), name, settings, variant)
        return model.to(device)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers folder (safetensors weights) that :meth:`from_pretrained` reads; ``dtype``: the
        weights written in that precision, from a copy of one component at a time (the model keeps its own)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        for name in ("text_encoder", "unet", "vae"):
            module = getattr(self, name)
            if dtype is not None and module.dtype != dtype:
                with _quiet_diffusers():  # it warns on every cast
                    module = copy.deepcopy(module).to(dtype=dtype)
            module.save_pretrained(path / name, safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        if self.settings:
            (path / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2))

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        """Move the components (in place); returns self. CUDA graphs captured before are dropped
        (the next calls capture again)."""
        if self.graphed_unet is not None:
            self.graphed_unet.captures.clear()
            self.graphed_hooks.clear()
            self.graphed_steps.clear()
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device)
            if dtype is not None and module.dtype != dtype:
                with _quiet_diffusers():  # it warns on every cast, even with nothing to keep in fp32
                    module.to(dtype=dtype)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            logger.warning("float16 on the CPU has no fast kernels in most torch builds (a scene-model UNet forward "
                           "took 56 times float32's time on a 2-core AVX512 CPU); use bfloat16 or float32 there.")
        return self

    # ----------------------------------------------------------------- properties
    # The UNet's first parameter, read directly: diffusers' `unet.dtype` / `.device` walk every
    # parameter (about 1.6 ms on the scene model, paid on every UNet call of an inversion).
    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent the UNet was trained on (64 for SD 1.x at 512x512)."""
        return int(self.unet.config.sample_size)

    @property
    def image_size(self) -> int:
        """Side of the images the model was trained on (512 for SD 1.x)."""
        return self.latent_size * self.vae_scale_factor

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    # ----------------------------------------------------------------- text
    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids (1, 77) with start token, prompt, end token and end-token padding.

        Raises :class:`PromptError` when the prompt does not fit in the model's context.
        """
        ids = self.tokenizer(prompt).input_ids
        if len(ids) > self.max_tokens:
            raise PromptError(
                f"The prompt {prompt!r} is {len(ids)} tokens long (start and end included); this "
                f"model reads at most {self.max_tokens}. Shorten the prompt."
            )
        ids = ids + [self.tokenizer.pad_token_id] * (self.max_tokens - len(ids))
        return torch.tensor([ids], device=self.device)

    def encode_tokens(
        self,
        token_ids: torch.Tensor,
        vectors: torch.Tensor | None = None,
        positions: Sequence[int] | torch.Tensor = (),
    ) -> torch.Tensor:
        """Text-encoder hidden states (B, 77, D) for token ids (B, 77).

        ``vectors`` (K, D_in) replace the input token embeddings at ``positions`` (K ints, or a
        tensor of them) before the whole encoder runs, so later tokens see them through causal
        attention (DPL's dynamic tokens, REFERENCE section 5). Gradients flow to ``vectors`` only.
        ``vectors`` (B, K, D_in) give each row its own: one batched forward for all of an
        inversion's steps, where one forward per step would pay the encoder's launches each time.
        """
        if vectors is None:
            return self.text_encoder(token_ids).last_hidden_state
        with _substituted_embeddings(self.text_encoder, vectors, positions):
            return self.text_encoder(token_ids).last_hidden_state

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Hidden states (1, 77, D) of a prompt (``""`` gives the unconditional embedding)."""
        with torch.no_grad():
            return self.encode_tokens(self.tokenize(prompt))

    def token_embedding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (..., D_in) of token ids, from the encoder's table (a copy)."""
        return self.text_encoder.get_input_embeddings()(token_ids).detach().clone()

    # ----------------------------------------------------------------- images and latents
    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) of images (B, 3, H, W) in [-1, 1]: posterior mean x scale."""
        image = image.to(device=self.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(image).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from scaled latents."""
        latents = latents.to(dtype=self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample.clamp(-1, 1)

    def compile(self, mode: str | None = None) -> StableDiffusion:
        """Compile the UNet's forward (``torch.compile``, static shapes): DDIM steps, the null-text
        step (forward and backward to the null states), unedited sampling, and the forwards an
        attention hook watches (recorded inversions, Prompt-to-Prompt sampling: the processors and
        what they record or edit are traced into the graph; each hook set-up is its own graph).
        DPL's token step compiles itself on a compiled model (see ``TokenLosses``). ``mode``:
        ``"reduce-overhead"`` (CUDA graphs) on CUDA, inductor's ``"default"`` elsewhere.

        The compiled backward is checked once against eager on a random input; where it disagrees
        (torch 2.13's inductor on CPU drops the gradient through UpBlock2D's skip connections),
        calls that carry a gradient run eager and a warning says so; where the UNet does not compile at
        all, the model stays eager (with a warning). Returns self."""
        if self.graphed_unet is not None:
            raise ValueError("this model replays CUDA graphs (use_cuda_graphs); use one or the other")
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        # Every graph of the UNet's forward (plain, with a gradient, under each hook set-up: recorded
        # inversions, DPL's recorded forward, each kind of edit) is an entry of one code object's
        # cache, which dynamo caps at 8 before running that code eager: room for a batch's variety.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        self.unet.compile(mode=mode, dynamic=False)
        self.hooked_forward = torch.compile(self.unet.forward, mode=mode, dynamic=False)
        self.compiled = mode
        try:
            error = self.compiled_gradient_error()
        except Exception as err:  # noqa: BLE001 - the UNet does not compile here: eager is always right
            self.uncompile(err)
            return self
        tolerance = gradient_tolerance(self.dtype, self.device)
        self.compiled_backward = error <= tolerance
        if not self.compiled_backward:
            logger.warning("torch.compile's backward of this UNet disagrees with eager here (relative error %.2g > "
                           "%.0e): steps that need a gradient run eager, the others compiled.", error, tolerance)
        return self

    def compiled_gradient_error(self) -> float:
        """:meth:`unet_gradient_error` of the compiled UNet."""
        return self.unet_gradient_error(self.unet_sample, self.compiled == "reduce-overhead")

    def unet_gradient_error(self, fast: Callable, cuda_graph_trees: bool = False) -> float:
        """Relative error (L2) of the gradient with respect to the text states of ``fast`` (a
        compiled or graphed UNet call: latents, timestep, states -> output) against the eager UNet's,
        at a seeded random latent and the states of ""."""
        g = torch.Generator().manual_seed(0)
        side = self.latent_size
        latents = torch.randn(1, self.unet.config.in_channels, side, side, generator=g).to(self.device, self.dtype)
        timestep = torch.tensor(501, device=self.device)

        def loss(call: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda param: (call(latents, timestep, param).float() ** 2).mean()

        def eager(latents: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return self.unet.forward(latents, timestep, encoder_hidden_states=states).sample

        return gradient_error(loss(eager), loss(fast), self.encode_prompt(""), cuda_graph_trees)

    def predict(self, latents: torch.Tensor, t: int | torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output for scaled latents (B, C, h, w) at timestep t (an int, or a 0-d
        tensor: a compiled caller passes a tensor so that a new timestep is not a recompilation)."""
        timestep = t if isinstance(t, torch.Tensor) else self.timestep(t, latents.device)
        latents = latents.to(self.dtype)
        graphed = None if self.graphed_unet is None else self.graphed(active_hook(self.unet))
        if graphed is not None:
            try:
                return graphed(latents, timestep, text_states)
            except Exception as err:  # noqa: BLE001 - a capture or replay failure: eager is always right
                self.drop_cuda_graphs(err)
        if self.compiled is None:
            return self.unet_sample(latents, timestep, text_states)
        needs_grad = torch.is_grad_enabled() and (latents.requires_grad or text_states.requires_grad)
        hooked = is_hooked(self.unet)
        if torch.compiler.is_compiling() or (needs_grad and (hooked or not self.compiled_backward)):
            # eager: inside a caller's graph (DPL's token step) this forward is traced into it; a hooked
            # forward with a gradient is the token step's eager reference or fallback; or the compiled
            # backward is off
            return self.unet.forward(latents, timestep, encoder_hidden_states=text_states).sample
        unet = self.hooked_forward if hooked else self.unet
        try:
            if self.compiled == "reduce-overhead":  # a CUDA graph's outputs are overwritten by its next replay
                torch.compiler.cudagraph_mark_step_begin()
                return unet(latents, timestep, encoder_hidden_states=text_states).sample.clone()
            return unet(latents, timestep, encoder_hidden_states=text_states).sample
        except ForwardStopped:
            raise
        except Exception as err:  # noqa: BLE001 - a compiler or CUDA-graph failure: eager is always right
            self.uncompile(err)
            return self.unet_sample(latents, timestep, text_states)

    def graphed(self, hook: AttentionHook | None) -> Callable | None:
        """The graphed UNet to use under ``hook`` (None: no hook open), or None for eager. A
        Prompt-to-Prompt controller keeps its state in tensors (it has a ``graph_layout``): the
        first edit of a layout is captured, and every later one takes over its state tensors and
        replays that capture (``graphed_steps``, for the last ``EDIT_LAYOUTS`` layouts). An attention
        store that records detached maps gets them back after each replay
        (:class:`GraphedRecording`), whose captures the model keeps for every later store that
        records the same layers and rows (a new inversion's recorded forwards replay the last
        one's). Any other observer (DPL's early exit, a store whose maps carry a gradient) needs
        the eager forward."""
        if hook is None:
            return self.graphed_unet
        observer, capture = hook.observer, self.graphed_unet.capture
        if hook not in self.graphed_hooks:
            layout = getattr(observer, "graph_layout", None)
            if layout is not None:
                self.graphed_hooks[hook] = self._graphed_edit(observer, ("edit", tuple(hook.processors), layout), capture)
            elif isinstance(observer, AttentionStore) and not observer.keep_grad:
                rows = None if observer.rows is None else tuple(observer.rows)
                key = ("recording", tuple(hook.processors), rows)
                if key not in self.graphed_steps:
                    self.graphed_steps[key] = GraphedRecording(self.unet_sample, capture, RECORDING_CAPTURES)
                self.graphed_hooks[hook] = functools.partial(self.graphed_steps[key], observer)
            else:
                return None
        return self.graphed_hooks[hook]

    def _graphed_edit(self, controller, key: tuple, capture: Capture) -> GraphedFunction:
        """The graphed forward under an edit's controller: the one captured under the first
        controller of its layout, whose state tensors ``controller`` takes over. Beyond
        ``EDIT_LAYOUTS`` layouts the least recently used one's capture (and its memory) goes."""
        if key in self.graphed_steps:
            owner, graphed = self.graphed_steps.pop(key)  # put back last: the most recently used
        else:
            edits = [k for k in self.graphed_steps if k[0] == "edit"]
            for old in edits[: max(0, len(edits) + 1 - EDIT_LAYOUTS)]:
                del self.graphed_steps[old]
            owner, graphed = controller, GraphedFunction(self.unet_sample, capture)
        self.graphed_steps[key] = (owner, graphed)
        controller.share_state(owner)
        return graphed

    def timestep(self, t: int, device: torch.device) -> torch.Tensor:
        """Timestep t as a 0-d tensor on ``device``, made once: on CUDA each copy from the host waits
        for the GPU to finish its queue, which an inner loop must not do at every call."""
        key = (t, device)
        if key not in self._timesteps:
            self._timesteps[key] = torch.tensor(t, device=device)
        return self._timesteps[key]

    def unet_sample(self, latents: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """The eager UNet's output (what :meth:`use_cuda_graphs` captures)."""
        return self.unet(latents, timestep, encoder_hidden_states=text_states).sample

    def use_cuda_graphs(self, capture: Capture = capture_cuda_graph) -> StableDiffusion:
        """Replay the UNet's unhooked forwards (DDIM steps, the null-text step with its backward,
        unedited sampling), its forwards under a Prompt-to-Prompt controller (an edit's sampling) or
        a recording attention store (recorded inversions) and DPL's token step (see ``TokenLosses``)
        as CUDA graphs of the eager kernels (:mod:`dpl_edit.cuda_graphs`): no compiler, a few eager
        calls to capture each input signature (and each hook). The graphed gradient is checked once
        against eager, and a capture or replay that fails leaves the model eager, with a warning.
        ``capture`` is how a function is captured (the tests pass a stand-in on the CPU). The UNet's
        weights go to channels_last. Call it after moving the model. Returns self."""
        if capture is capture_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this model is on {self.device.type}")
        if self.compiled is not None:
            raise ValueError("this model is compiled (its CUDA graphs are torch.compile's); use one or the other")
        # The UNet's weights in channels_last (NHWC), the layout of cuDNN's tensor-core convolutions:
        # in the default layout a third of a graphed DPL step's GPU time went to cuDNN's own NCHW <-> NHWC
        # copies around each convolution, and channels_last took a graphed bf16 forward from 9.5 to
        # 7.3 ms and a forward + backward from 19.8 to 15.9 on an H200 at SD-1.4 size (README, Benchmarks)
        self.unet.to(memory_format=torch.channels_last)
        self.graphed_unet = GraphedFunction(self.unet_sample, capture)
        try:
            error = self.unet_gradient_error(self.graphed_unet)
        except Exception as err:  # noqa: BLE001 - the UNet does not capture here: eager is always right
            self.drop_cuda_graphs(err)
            return self
        if not error <= gradient_tolerance(self.dtype, self.device):
            self.drop_cuda_graphs(ValueError(f"the graphed gradient differs from eager's by {error:.2g}"))
        return self

    def drop_cuda_graphs(self, failure: Exception) -> None:
        """Back to eager UNet forwards after a CUDA-graph capture or replay failed (logged)."""
        logger.warning("CUDA graphs failed on a UNet forward (%s); this model runs eager from now on.",
                       compile_failure(failure))
        self.graphed_unet = None
        self.graphed_hooks.clear()
        self.graphed_steps.clear()

    def uncompile(self, failure: Exception) -> None:
        """Back to eager UNet forwards after a compiled call raised ``failure`` (logged). Dynamo
        applies what a traced forward does to Python objects (the maps an attention store keeps, a
        controller's state) only after its graph has run, and the hooked forwards are one graph, so
        the eager call that replaces a failed one finds them as they were."""
        logger.warning("torch.compile failed on a UNet forward (%s); this model runs eager from now on.",
                       compile_failure(failure))
        self.unet._compiled_call_impl = None  # what nn.Module.compile set
        self.compiled, self.compiled_backward, self.hooked_forward = None, False, None

    # ----------------------------------------------------------------- identity
    def fingerprint(self) -> dict:
        """What an inversion must match to be used with this model.

        ``architecture`` is a hash of the component configs (must be equal); ``weights`` is a
        sample of weight values, compared with a tolerance so fp16/bf16 copies still match.
        """
        text_encoder = self.text_encoder.config.to_diff_dict()
        # as saving writes it: transformers' save_pretrained adds the class name, so a model built in
        # memory has the fingerprint of its saved and reloaded copy
        text_encoder.setdefault("architectures", [type(self.text_encoder).__name__])
        configs = {"unet": dict(self.unet.config), "vae": dict(self.vae.config), "text_encoder": text_encoder}
        # Keep the architecture only: drop private keys (paths, versions, which values were defaults).
        configs = {
            name: {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE}
            for name, config in configs.items()
        }
        configs["vocab_size"] = len(self.tokenizer)
        blob = json.dumps(configs, sort_keys=True, default=str).encode()
        samples = [
            self.unet.conv_in.weight.flatten()[:8],
            self.unet.conv_out.weight.flatten()[:8],
            self.vae.encoder.conv_in.weight.flatten()[:8],
            self.text_encoder.get_input_embeddings().weight[320, :8],
        ]
        weights = torch.cat([s.detach().float().cpu() for s in samples]).tolist()
        return {"architecture": hashlib.sha256(blob).hexdigest()[:16], "weights": weights}


_VOLATILE = ("transformers_version", "dtype", "torch_dtype")


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' and transformers' notices and loading bars (not their errors)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # diffusers still passes an argument huggingface_hub deprecated
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        transformers_logging.enable_progress_bar()


def compile_failure(err: Exception) -> str:
    """A compiler or CUDA-graph exception in one line, for the warnings of the eager fallbacks."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def gradient_error(
    eager: Callable[[torch.Tensor], torch.Tensor],
    compiled: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    cuda_graphs: bool,
) -> float:
    """Relative L2 error (in fp32) of the compiled loss's gradient at ``start`` against the eager
    one's: what the compile checks compare with ``gradient_tolerance``. Each function maps a
    parameter to a scalar loss."""
    grads = []
    for loss in (eager, compiled):
        param = start.detach().clone().requires_grad_(True)
        if loss is compiled and cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss(param).backward()
        grads.append(param.grad.float())
    compiled_grad, reference = grads[1], grads[0]
    return ((compiled_grad - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def gradient_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """The ``COMPILE_TOLERANCE`` for a model's dtype on its device. On CUDA, float32 convolutions (by
    PyTorch's default, cuDNN's ``allow_tf32``) and matmuls where ``allow_tf32`` is set run in TF32,
    whose 10-bit mantissa is float16's: a captured or compiled kernel may pick another algorithm than
    eager, and their results differ as float16's do (1.1e-4 to 1.5e-4 measured for DPL's token step
    at SD-1.4 size on an H200, above float32's 1e-4), so float16's tolerance applies there."""
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    if dtype == torch.float32 and device.type == "cuda" and tf32:
        return COMPILE_TOLERANCE[torch.float16]
    return COMPILE_TOLERANCE[dtype]


def fingerprints_match(a: dict, b: dict) -> bool:
    """Same architecture and (up to half-precision rounding) the same weights."""
    if a["architecture"] != b["architecture"]:
        return False
    wa, wb = torch.tensor(a["weights"]), torch.tensor(b["weights"])
    return wa.shape == wb.shape and torch.allclose(wa, wb, rtol=1e-2, atol=1e-3 * wa.abs().max())


class _SubstitutedEmbedding(nn.Module):
    """A token-embedding table whose rows at given positions are replaced by given vectors."""

    def __init__(self, table: nn.Embedding, vectors: torch.Tensor, positions: Sequence[int] | torch.Tensor):
        super().__init__()
        self.table = table
        self.vectors = vectors
        self.positions = positions

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.table(token_ids)  # (B, L, D_in)
        index = torch.as_tensor(self.positions, device=embeds.device)
        vectors = self.vectors.to(embeds.dtype).expand(embeds.shape[0], -1, -1)  # (K, D_in) or (B, K, D_in)
        return embeds.index_copy(1, index, vectors)


@contextlib.contextmanager
def _substituted_embeddings(
    text_encoder: CLIPTextModel, vectors: torch.Tensor, positions: Sequence[int] | torch.Tensor
) -> Iterator[None]:
    if vectors.shape[-2] != len(positions):
        raise ValueError(f"{vectors.shape[-2]} token vectors for {len(positions)} positions")
    table = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(_SubstitutedEmbedding(table, vectors, positions))
    try:
        yield
    finally:
        text_encoder.set_input_embeddings(table)


def _check_folder(path: Path) -> None:
    if path.is_file():
        checkpoint = path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
        raise ModelLoadError(
            f"{path} is {'a single-file checkpoint' if checkpoint else 'a file'}; dpl-edit reads diffusers folders "
            f"({FOLDER_LAYOUT}). "
            + ("Convert it once with diffusers, StableDiffusionPipeline.from_single_file(PATH).save_pretrained(FOLDER) "
               "(it reads the model's configurations from the Hugging Face Hub or its cache), and pass FOLDER."
               if checkpoint else "Pass the folder of a diffusers model.")
        )
    missing = [f"{c}/" for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path} is not a diffusers Stable Diffusion folder: it lacks {', '.join(missing)}. "
            f"Expected the layout written by StableDiffusionPipeline.save_pretrained ({FOLDER_LAYOUT})."
        )


def _main_snapshot(folder: Path) -> Path:
    """A model's folder in the Hugging Face cache (``models--owner--name``, as users find it on disk)
    is read as the snapshot its ``main`` ref names; any other path is itself."""
    ref = folder / "refs" / "main"
    snapshot = folder / "snapshots" / ref.read_text().strip() if ref.is_file() else folder
    return snapshot if snapshot.is_dir() else folder


def _cached_snapshot(name: str) -> Path | None:
    """The folder of a hub id's snapshot in the local Hugging Face cache; None where it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid hub id
        return None


def _weight_variants(name: str, folder: Path | None, variant: str | None) -> dict[str, str | None]:
    """The variant each component's weights are read from: ``variant`` where given, else its plain
    weights, else the one variant it has (diffusers reads the plain files unless told)."""
    chosen = dict.fromkeys(WEIGHTED, variant)
    for component in WEIGHTED if folder is not None else ():  # a hub id not cached: diffusers downloads
        files = [f.name for f in (folder / component).glob("*.safetensors")]
        found = {match[1] for match in map(WEIGHTS_FILE.fullmatch, files) if match}
        if not found:
            continue  # no safetensors weights at all: diffusers' error says so
        labels = ", ".join(sorted(v or "plain" for v in found))
        if variant is not None and variant not in found:
            raise ModelLoadError(f"Could not load model {name!r}: its {component}/ has no {variant!r} weights "
                                 f"(its safetensors weights: {labels}). Choose a variant it has (--variant, or "
                                 "variant= in Python; none for the plain weights).")
        if variant is None and None not in found:
            if len(found) > 1:
                raise ModelLoadError(f"Could not load model {name!r}: its {component}/ has no plain safetensors "
                                     f"weights but several variants ({labels}). Choose one (--variant, or "
                                     "variant= in Python).")
            chosen[component] = found.pop()
    if variant is None and any(chosen.values()):
        logger.info("Model %s has no plain safetensors weights in %s; reading %s", name,
                    ", ".join(f"{c}/" for c, v in chosen.items() if v),
                    ", ".join(sorted({f"its {v!r} ones" for v in chosen.values() if v})))
    return chosen


def _check_architecture(name: str, unet: dict, text_width: int, latent_channels: int) -> None:
    """A clear error for the diffusers models that are not text-to-image Stable Diffusion 1.x/2.x
    (whose UNet would fail at its first forward): SDXL, inpainting, depth, upscalers, unCLIP."""
    widths = unet["cross_attention_dim"]
    widths = set(widths) if isinstance(widths, (list, tuple)) else {widths}
    if unet.get("addition_embed_type"):
        problem = f"takes extra conditioning (addition_embed_type {unet['addition_embed_type']!r}, as SDXL's)"
    elif unet.get("class_embed_type"):
        problem = f"takes a class embedding (class_embed_type {unet['class_embed_type']!r}, as upscalers and unCLIP)"
    elif unet.get("in_channels", 4) != latent_channels:
        problem = (f"takes {unet['in_channels']} input channels where the VAE's latents have {latent_channels} "
                   "(an inpainting, depth or InstructPix2Pix model)")
    elif widths != {text_width}:
        problem = (f"attends to text states {'/'.join(map(str, sorted(widths)))} wide where the text encoder's "
                   f"are {text_width} (another model's text encoder, or a second one as SDXL has)")
    else:
        return
    raise ModelLoadError(f"Could not load model {name!r}: dpl-edit edits with text-to-image Stable Diffusion "
                         f"1.x and 2.x, and its UNet {problem}.")


def _is_a_path(name: str) -> bool:
    """Whether a model name can only be a folder: absolute, relative to ``.`` or ``~``, or with more
    parts than a hub id's owner/name."""
    return (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def _load_failure_message(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "safetensors" in str(err).lower():
        return (
            f"Could not load model {name!r}: dpl-edit only reads safetensors weights (a pickle file, .bin or "
            f".ckpt, can run code as it loads) and this model has none ({first_line}). If its .bin weights come "
            "from a source you trust, convert them once with diffusers: StableDiffusionPipeline.from_pretrained("
            "NAME, use_safetensors=False).save_pretrained(FOLDER) writes safetensors; then pass FOLDER."
        )
    hint = (
        "Hugging Face Hub access is off (HF_HUB_OFFLINE=1) and the model is not in the local cache"
        if offline
        else "it is neither a local diffusers folder nor a model that could be fetched from the Hub"
    )
    return (
        f"Could not load model {name!r}: {hint} ({first_line}). Pass the path of a diffusers "
        f"folder ({FOLDER_LAYOUT}), or "
        "download the model on a machine with network access (huggingface-cli download NAME)."
    )
