"""Invert once, edit many: an inversion saved as safetensors (tensors) + JSON (everything else).

A folder holds ``inversion.safetensors``, ``inversion.json`` (which records the SHA-256 of the
tensor file) and ``source.png``. Files are written to temporary names and renamed, the JSON last,
so a folder never holds a half-written inversion. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from . import checks
from .errors import InversionFileError, SettingError
from .models import StableDiffusion, fingerprints_match

FORMAT = "dpl-edit/inversion"
FORMAT_VERSION = 1
TENSORS_FILE = "inversion.safetensors"
METADATA_FILE = "inversion.json"
SOURCE_FILE = "source.png"


@dataclass
class Inversion:
    """Everything editing needs from an inverted image.

    Latents are scaled latents (1, C, h, w); text states are text-encoder outputs; token vectors
    are text-encoder *inputs*. Step i = 0 is the noisiest timestep.
    """

    method: str  # "ddim", "nti", "npi", "direct" or "dpl"
    model_id: str
    model_fingerprint: dict
    prompt: str
    token_ids: list[int]  # the 77 ids of the source prompt, start/end/padding included
    prompt_tokens: list[str]  # the BPE tokens at positions 1 .. n (the prompt without start/end/padding)
    latent_T: torch.Tensor  # z_bar_T: where sampling starts (1, C, h, w)
    source_latent: torch.Tensor  # z_0 of the source image (1, C, h, w)
    num_steps: int
    guidance_scale: float
    null: str = "empty"  # unconditional states: "empty" (""), "optimized" (null_states), "negative" (the source
    # prompt's own states) or "direct" ("", with the source branch kept on the DDIM pivot when editing)
    null_states: torch.Tensor | None = None  # (num_steps, 77, D) optimised unconditional states
    token_vectors: torch.Tensor | None = None  # (num_steps, K, D_in) per-step dynamic tokens (DPL)
    token_positions: list[int] = field(default_factory=list)  # K positions in token_ids
    words: list[dict] = field(default_factory=list)  # dynamic words: {"word": str, "positions": [int]}
    cross_maps: torch.Tensor | None = None  # (num_steps, n, res, res) maps of prompt tokens 1..n per step
    background_mask: torch.Tensor | None = None  # (res, res) DPL background mask, 1 = background
    clusters: torch.Tensor | None = None  # (res_self, res_self) self-attention cluster labels
    # (num_steps + 1, C, h, w), sampling order: the source branch's latents, which an edit's source follows
    # (direct: the DDIM pivot; NTI and DPL: their null-text trajectory z_bar_T .. z_bar_0; None otherwise)
    trajectory: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)  # method settings, image fit, timings
    dpl_log: list[dict] = field(default_factory=list)  # DPL per step: losses, thresholds, AdamW iterations
    versions: dict = field(default_factory=dict)
    source_image: Image.Image | None = None

    def null_at(self, model: StableDiffusion, cond: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-step unconditional states (1, 77, D) on the model's device; ``cond``: this inversion's
        :meth:`cond_at` where the caller has it already (negative-prompt inversion's null states are
        those, not encoded a second time)."""
        if self.null == "negative":
            return self.cond_at(model) if cond is None else cond
        if self.null == "optimized":
            null = self.null_states.to(model.device, model.dtype)
            return [null[i : i + 1] for i in range(self.num_steps)]
        return [model.encode_prompt("")] * self.num_steps

    def cond_at(self, model: StableDiffusion) -> list[torch.Tensor]:
        """Per-step conditional states (1, 77, D) of the source prompt (with the step's tokens for DPL)."""
        token_ids = torch.tensor([self.token_ids], device=model.device)
        with torch.no_grad():
            if self.token_vectors is None:
                return [model.encode_tokens(token_ids)] * self.num_steps
            vectors = self.token_vectors.to(model.device, model.dtype)  # (T, K, D_in): all steps in one batch
            states = model.encode_tokens(token_ids.expand(len(vectors), -1), vectors, self.token_positions)
            return list(states.split(1))

    def check_compatible(self, model: StableDiffusion) -> None:
        """Raise :class:`InversionFileError` unless this inversion was made with ``model``."""
        if not fingerprints_match(self.model_fingerprint, model.fingerprint()):
            raise InversionFileError(
                f"This inversion was made with model {self.model_id!r}, which differs from the "
                f"loaded model {model.model_id!r} (architecture or weights). Load the model it was "
                "made with (--model), or invert the image again with this one."
            )

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the inversion into ``folder`` (created if needed, or holding an earlier inversion, which
        this replaces); returns the folder."""
        folder = inversion_folder("The inversion's folder", folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
        written = {name: folder / (name + ".tmp") for name in (TENSORS_FILE, SOURCE_FILE, METADATA_FILE)}
        try:  # every file under its temporary name first: a failure or a Ctrl-C while writing leaves the folder as it was
            save_file(tensors, written[TENSORS_FILE])
            if self.source_image is not None:
                self.source_image.save(written[SOURCE_FILE], format="PNG")
            skip = (*_TENSOR_FIELDS, "source_image")
            metadata = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
            metadata.update(format=FORMAT, format_version=FORMAT_VERSION, tensors_sha256=_sha256(written[TENSORS_FILE]))
            written[METADATA_FILE].write_text(json.dumps(metadata, indent=2))
            if self.source_image is None:  # not an earlier inversion's image taken for this one's
                (folder / SOURCE_FILE).unlink(missing_ok=True)
            for name, tmp in written.items():  # then renamed, the JSON last
                if tmp.exists():
                    os.replace(tmp, folder / name)
        finally:
            for tmp in written.values():
                tmp.unlink(missing_ok=True)
        return folder

    @classmethod
    def of(cls, inversion: Inversion | str | os.PathLike) -> Inversion:
        """``inversion`` itself, or the inversion saved in that folder (what the entry points that
        take an inversion accept)."""
        if isinstance(inversion, Inversion):
            return inversion
        if isinstance(inversion, (str, os.PathLike)):
            return cls.load(inversion)
        raise InversionFileError(f"Expected an Inversion or the folder of a saved one, got {type(inversion).__name__}.")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Inversion:
        """Read an inversion folder written by :meth:`save` (tensors on the CPU)."""
        folder = Path(folder)
        metadata = _read_metadata(folder)
        tensor_path = folder / TENSORS_FILE
        if not tensor_path.is_file() or _sha256(tensor_path) != metadata.pop("tensors_sha256", None):
            raise InversionFileError(
                f"{tensor_path} is missing or does not match {METADATA_FILE} (interrupted copy?). "
                "Invert the image again."
            )
        tensors = load_file(tensor_path)
        for key in ("format", "format_version"):
            metadata.pop(key)
        _check_contents(metadata, tensors, folder / METADATA_FILE)
        source = folder / SOURCE_FILE
        try:
            image = Image.open(source).convert("RGB") if source.is_file() else None
        except (OSError, Image.DecompressionBombError) as err:
            raise InversionFileError(f"{source} is no readable image ({err}); put the inverted image back there "
                                     "as a PNG, or invert the image again.") from err
        return cls(**metadata, **tensors, source_image=image)


def inversion_folder(name: str, folder: str | os.PathLike) -> Path:
    """A folder an inversion may be written into (:func:`checks.output_folder`) that holds none of the
    inversion's file names unless an inversion wrote them: an image of the user's called source.png,
    say, is never written over."""
    folder = checks.output_folder(name, folder)
    if not (folder / METADATA_FILE).is_file():
        taken = [file for file in (TENSORS_FILE, SOURCE_FILE) if (folder / file).exists()]
        if taken:
            raise SettingError(f"{name} {folder} holds {' and '.join(taken)} but no inversion ({METADATA_FILE}); "
                               "an inversion would write over it: give another folder.")
    return folder


_TENSOR_FIELDS = (
    "latent_T", "source_latent", "null_states", "token_vectors", "cross_maps", "background_mask", "clusters",
    "trajectory",
)


def library_versions() -> dict:
    """Versions worth recording next to a result."""
    import diffusers
    import transformers

    from . import __version__

    return {
        "dpl_edit": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _read_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    if not path.is_file():
        raise InversionFileError(
            f"{folder} holds no inversion ({METADATA_FILE} not found). Make one with `dpl invert`."
        )
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InversionFileError(f"{path} is not valid JSON ({err}); invert the image again.") from err
    if not isinstance(metadata, dict):
        raise InversionFileError(f"{path} holds no JSON object (found {type(metadata).__name__}); invert the image again.")
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise InversionFileError(
            f"{path} is not a dpl-edit inversion of format version {FORMAT_VERSION} "
            f"(found {metadata.get('format')!r} version {metadata.get('format_version')!r})."
        )
    return metadata


# the JSON types of the fields inversion.json holds, by the start of their annotations
_JSON_TYPES = {"str": str, "int": int, "float": (int, float), "dict": dict, "list": list}
NULLS = ("empty", "optimized", "negative", "direct")  # what Inversion.null may be


def _check_contents(metadata: dict, tensors: dict, path: Path) -> None:
    """The fields an inversion has, of their JSON types, and the tensors its null needs: a hand-edited,
    damaged or other version's ``inversion.json`` is said to be one (never a TypeError from deep in
    an edit). ``metadata`` is the file's without its format keys."""
    problem = _contents_problem(metadata, tensors)
    if problem:
        raise InversionFileError(f"{path} is damaged or was written by another version of dpl-edit ({problem}); "
                                 "invert the image again.")


def _contents_problem(metadata: dict, tensors: dict) -> str | None:
    known = {f.name: f for f in fields(Inversion) if f.name != "source_image"}
    unknown = sorted(set(metadata) - set(known) | set(tensors) - set(_TENSOR_FIELDS))
    if unknown:
        return f"unknown fields {', '.join(unknown)}"
    required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in metadata and name not in tensors]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = [name for name, value in metadata.items() if name not in _TENSOR_FIELDS
             and not _of_json_type(value, known[name].type)]
    if wrong:
        return f"{', '.join(wrong)} of the wrong type"
    null = metadata.get("null", "empty")
    if null not in NULLS:
        return f"null {null!r} is none of {', '.join(NULLS)}"
    if null == "optimized" and "null_states" not in tensors:
        return "null 'optimized' without null_states"
    return _step_count_problem(metadata["num_steps"], tensors)


def _step_count_problem(num_steps: int, tensors: dict) -> str | None:
    """What disagrees with ``num_steps`` among the tensors of one row per step (the trajectory: one more)."""
    rows = {"null_states": num_steps, "token_vectors": num_steps, "cross_maps": num_steps, "trajectory": num_steps + 1}
    wrong = [f"{name} has {len(tensors[name])} rows" for name, count in rows.items()
             if name in tensors and len(tensors[name]) != count]
    return f"num_steps {num_steps}, but {', '.join(wrong)}" if wrong else None


def _of_json_type(value, annotation: str) -> bool:
    if value is None:
        return "None" in annotation
    kind = _JSON_TYPES.get(annotation.split("[")[0].split(" ")[0])
    return kind is None or (isinstance(value, kind) and not isinstance(value, bool))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
