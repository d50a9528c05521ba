"""What the web page does, without the page: load a model, invert once, edit many times.

:class:`Workbench` holds one model at a time and an on-disk cache of inversions keyed by the
image, the prompt, the model and the settings, so that a second edit, a page reload or a second
browser session reuses an inversion instead of computing it again. Every method takes and returns
plain values (paths, strings, PIL images), raises :class:`~dpl_edit.errors.DplEditError` with a
message for a person when the input is wrong, and is what the Gradio app (:mod:`.app`) calls.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import io
import json
import logging
import re
import shutil
import threading
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .. import checks
from ..artifacts import METADATA_FILE, Inversion
from ..editing import EDIT_FILE, EditConfig, EditResult, edit, edit_record
from ..errors import DplEditError, ImageLoadError, InversionFileError, PromptError
from ..images import FITS, load_image, psnr
from ..inversion import DynamicPromptConfig, NullTextConfig
from ..inversion.dynamic_prompt import capped_steps
from ..pipeline import invert, model_dpl_config, reconstruct
from ..prompts import parse_marked_prompt
from ..registry import load_model
from ..scenes.render import render, split_scene
from ..views import (
    background_view,
    comparison_grid,
    dpl_log_view,
    edit_grid,
    save_figure,
    word_attention_grid,
)

PAGE_METHODS = ("dpl", "nti", "npi", "direct")  # what the page offers (ddim is nti's first half)
DPL_NULLS = ("optimized", "negative", "direct")
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
DISPLAY_SIZE = 256  # small model images are shown enlarged (nearest neighbour)
logger = logging.getLogger(__name__)
# An inversion's cache key (Workbench._key): <image, prompt and model>-<method>-<method settings>.
KEY = re.compile(rf"[0-9a-f]{{20}}-(?:{'|'.join(PAGE_METHODS)})-[0-9a-f]{{12}}")

Report = Callable[[float, str], None]  # (fraction done, what is happening)


class Cancelled(DplEditError):
    """The person asked to stop the inversion or edit in progress."""


@dataclass(frozen=True)
class InvertSettings:
    method: str = "dpl"
    null: str = "optimized"  # DPL's null step
    steps: int = 50
    guidance: float = 7.5
    seed: int = DynamicPromptConfig.cluster_seed  # the background clustering's seed (DPL; the authors')
    fit: str = "crop"

    def check(self) -> None:
        if self.method not in PAGE_METHODS:
            raise DplEditError(f"Unknown method {self.method!r}; choose one of {', '.join(PAGE_METHODS)}")
        if self.null not in DPL_NULLS:
            raise DplEditError(f"Unknown null step {self.null!r}; choose one of {', '.join(DPL_NULLS)}")
        if self.fit not in FITS:
            raise DplEditError(f"Unknown fit {self.fit!r}; choose one of {', '.join(FITS)}")
        checks.count("steps", self.steps)
        checks.finite("guidance", self.guidance, 0.0)
        checks.count("seed", self.seed, 0)


@dataclass
class InversionView:
    """What the page shows after an inversion."""

    key: str  # the cache entry
    inversion: Inversion
    reconstruction: Image.Image
    psnr: float
    attention: Image.Image  # each marked word's map over the image, all steps and by step range
    comparison: Image.Image | None  # NTI vs DPL maps, when both inversions of this image and prompt exist
    background: Image.Image | None  # DPL's self-attention clusters and background mask
    dpl_log: Image.Image | None  # DPL's losses against thresholds, per step
    cached: bool  # reused from the cache
    summary: str


@dataclass
class EditView:
    edits: list[tuple[Image.Image, str]]
    grid: Image.Image
    download: Path  # a zip of the inversion folder and the edits


WAITING = "Waiting for the model: it is finishing another job (a cancelled one ends with its current step)"


def on_torch_thread(method):
    """Run a :class:`Workbench` method on the workbench's one torch thread (directly when already there).

    Gradio calls each handler from a thread of its pool, and the server loads the model from its main
    thread. Every thread that runs torch's CPU kernels gets its own OpenMP team, and once a process
    has more team threads than CPUs, OpenMP's idle threads stop spinning between parallel regions
    (GNU OpenMP throttles them), so every small kernel waits for its threads to wake: a 20-step DPL
    inversion of a scene took 53 s from a second thread against 33 s from the first one (this
    project's 2-core CPU). One thread for all of the page's model work keeps one team. The call runs
    in a copy of the caller's context, where Gradio keeps what its progress bar reports to. A call
    with a ``report`` that has to wait for the work before it (another session's, or a cancelled job
    finishing its step) reports that it waits."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if threading.current_thread() is self._torch_thread:
            return method(self, *args, **kwargs)
        with self._calls_lock:
            waits = self._calls > 0
            self._calls += 1
        try:
            if waits and kwargs.get("report") is not None:
                kwargs["report"](0.0, WAITING)
            return self._torch.submit(contextvars.copy_context().run, method, self, *args, **kwargs).result()
        finally:
            with self._calls_lock:
                self._calls -= 1

    return run


def _sampling_steps(steps: int, what: str, report: Report | None, cancelled: Callable[[], bool] | None,
                    cancel_message: str) -> Callable[[int], None]:
    """The callback of a sampling loop on the page (an edit, a reconstruction): after each step it
    stops (``Cancelled``, with ``cancel_message``) when the person cancelled, else reports "what: step i/N"."""
    def callback(step: int) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled(cancel_message)
        if report is not None:
            report((step + 1) / steps, f"{what}: step {step + 1}/{steps}")

    return callback


def _names(current: tuple[str, object], name: str) -> bool:
    """Whether ``name`` names the loaded model: the name it was loaded by, or its model_id."""
    return name in (current[0], getattr(current[1], "model_id", None))


@dataclass
class Workbench:
    """One model at a time (loaded on first use) and an inversion cache in ``cache_dir``.

    ``device``, ``dtype``, ``compile`` and ``cuda_graphs`` are :func:`~dpl_edit.registry.load_model`'s
    for every model the page loads; ``variant`` chooses the weight files of ``model_name`` only (a
    model named on the page reads its plain weights, or the one variant it has).
    """

    cache_dir: Path
    model_name: str = "scenes"
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "float32"
    variant: str | None = None
    compile: bool = False
    cuda_graphs: bool | None = None
    # (the name it was loaded by, the model): set in one assignment, so any thread reads a matching pair
    _current: tuple[str, object] | None = field(default=None, repr=False)
    # the one thread that runs the model (see on_torch_thread)
    _torch: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpl-torch"), repr=False)
    _torch_thread: threading.Thread | None = field(default=None, repr=False)
    _calls: int = field(default=0, init=False, repr=False)  # calls sent to that thread and not yet returned
    _calls_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._torch_thread = self._torch.submit(threading.current_thread).result()

    # -------------------------------------------------------------- inputs
    def model(self, name: str | None = None):
        """The model called ``name`` (default: the one loaded last, else the server's), loaded once; a
        clear error when it is not available offline. An inversion's ``model_id`` (what the loaded
        model calls itself: ``tiny:0``, a folder's path as read) names the loaded model too.

        The loaded model is returned at once on any thread: the token helper and a picked picture
        read its tokenizer and size while an inversion runs on it. Loading one runs on the torch
        thread, after the work already there."""
        current = self._current
        name = (name or (current[0] if current else None) or self.model_name).strip()
        if current is not None and _names(current, name):
            return current[1]
        return self._load(name)

    @on_torch_thread
    def _load(self, name: str):
        if self._current is None or not _names(self._current, name):  # (not loaded by a call queued before)
            variant = self.variant if name == self.model_name else None
            self._current = (name, load_model(name, device=self.device, dtype=self.dtype, compile=self.compile,
                                              cuda_graphs=self.cuda_graphs, variant=variant))
        return self._current[1]

    def scene_example(self, index: int, objects: int = 2) -> tuple[str, str]:
        """A rendered test scene saved as PNG: (path, its caption with the nouns in braces)."""
        scene = split_scene("test", index, num_objects=objects)
        path = self.cache_dir / "scenes" / f"test-{objects}-{index}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            render(scene)[0].save(path)
        return str(path), scene.marked_caption()

    def tokens(self, prompt: str, model_name: str | None = None) -> str:
        """A markdown table of the prompt's tokens, the marked ones in bold (Attend-and-Excite's
        "check token indices")."""
        if not prompt or not prompt.strip():
            return "Type a prompt; put the words DPL should learn in braces: `a {cat} and a {dog}`."
        model = self.model(model_name)
        marked = parse_marked_prompt(prompt, model.tokenizer, require_words=False)
        tokens = model.tokenizer.convert_ids_to_tokens(list(marked.token_ids[1 : marked.end_position]))
        marks = {p for word in marked.words for p in word.positions}
        cells = [f"**{t.replace('</w>', '')}**" if i in marks else t.replace("</w>", "")
                 for i, t in enumerate(tokens, start=1)]
        words = ", ".join(f"{w.word} ({', '.join(map(str, w.positions))})" for w in marked.words) or "none"
        header = "| " + " | ".join(str(i) for i in range(1, len(tokens) + 1)) + " |"
        return (f"{len(tokens)} tokens of 75; marked words: {words}\n\n{header}\n"
                f"|{'---|' * len(tokens)}\n| " + " | ".join(cells) + " |")

    def source_image(self, path: str | None, model_name: str | None = None, fit: str = "crop") -> Image.Image:
        """The uploaded or picked image at the model's size; clear errors for a missing, unreadable
        or huge file."""
        if not path:
            raise DplEditError("Upload an image or pick a scene first.")
        path = Path(path)
        if path.is_file() and path.stat().st_size > MAX_UPLOAD_BYTES:
            raise DplEditError(f"The image file is {path.stat().st_size / 2**20:.0f} MB; the page takes images up "
                               f"to {MAX_UPLOAD_BYTES // 2**20} MB. Resize it first.")
        try:
            with Image.open(path) as opened:
                pixels = opened.width * opened.height
        except (OSError, SyntaxError, Image.DecompressionBombError):
            pixels = 0  # load_image gives the message
        if pixels > MAX_UPLOAD_PIXELS:
            raise DplEditError(f"The image has {pixels / 1e6:.0f} megapixels; the page takes up to "
                               f"{MAX_UPLOAD_PIXELS / 1e6:.0f}. Resize it first.")
        size = self.model(model_name).image_size
        try:
            return load_image(path, size, fit=fit)
        except ImageLoadError as err:  # the page shows the file's name, not the server's upload folder
            raise ImageLoadError(str(err).replace(str(path), path.name)) from err

    # -------------------------------------------------------------- inversion
    @on_torch_thread
    def invert(self, image_path: str | None, prompt: str, settings: InvertSettings, model_name: str | None = None,
               report: Report | None = None, cancelled: Callable[[], bool] | None = None) -> InversionView:
        """Invert (or take from the cache) and build the views."""
        settings.check()
        if not prompt or not prompt.strip():
            raise PromptError("Give the source prompt: what the image shows, e.g. 'a {cat} and a {dog}'.")
        model = self.model(model_name)
        image = self.source_image(image_path, model_name, settings.fit)
        parse_marked_prompt(prompt, model.tokenizer, require_words=settings.method == "dpl")  # checks the marks
        key = self._key(image, prompt, model, settings)
        folder = self.cache_dir / "inversions" / key
        inversion = _readable(folder)
        cached = inversion is not None
        if not cached:
            inversion = self._invert(model, image, prompt, settings, report, cancelled)
            inversion.settings["fit"] = settings.fit
            shutil.rmtree(folder, ignore_errors=True)  # what an unreadable or interrupted entry left there
            inversion.save(folder)
        return self.view(key, inversion, cached, report, cancelled)

    def _invert(self, model, image, prompt, settings: InvertSettings, report, cancelled) -> Inversion:
        steps = settings.steps

        def callback(step) -> None:
            if cancelled is not None and cancelled():
                raise Cancelled("Inversion cancelled; nothing was kept. Press Invert to start again.")
            if report is None:
                return
            if hasattr(step, "losses"):
                losses = ", ".join(f"L_{k} {v:.3f}/{step.thresholds[k]:.3f}" for k, v in step.losses.items())
                report((step.step + 1) / steps, f"DPL step {step.step + 1}/{steps}: {losses}, "
                                                 f"{step.iterations} token iterations")
            else:
                report((step.step + 1) / steps, f"null-text step {step.step + 1}/{steps}: loss {step.loss:.5f}")

        if report is not None:
            report(0.0, f"DDIM inversion ({steps} steps)")
        dpl = model_dpl_config(model, cluster_seed=settings.seed)
        method, null = settings.method, settings.null if settings.method == "dpl" else "optimized"
        return invert(model, image, prompt, method=method, null=null, num_steps=steps,
                      guidance_scale=settings.guidance, null_text=NullTextConfig(), dpl=dpl,
                      callback=callback, progress=False)

    @on_torch_thread
    def view(self, key: str, inversion: Inversion, cached: bool = True, report: Report | None = None,
             cancelled: Callable[[], bool] | None = None) -> InversionView:
        """The page's views of an inversion: its reconstruction (sampled again: ``report`` counts the
        steps, ``cancelled`` stops it at the end of a step), its PSNR and its figures."""
        model = self.model(inversion.model_id)
        callback = _sampling_steps(inversion.num_steps, "Reconstructing the image", report, cancelled,
                                   "Cancelled while the views were drawn; the inversion itself is kept: "
                                   "Invert with the same settings shows it at once.")
        reconstruction = reconstruct(model, inversion, callback=callback, progress=False)
        score = psnr(reconstruction, inversion.source_image)
        other = self._other_method(key, inversion)
        comparison = None
        if other is not None:
            pair = (other, inversion) if inversion.method == "dpl" else (inversion, other)
            comparison = figure_image(comparison_grid(*pair))
        seconds = inversion.settings.get("seconds")
        summary = (f"{inversion.method.upper()} inversion, {inversion.num_steps} steps"
                   + (" (from the cache)" if cached else f", {seconds:.1f} s" if seconds else "")
                   + f"; reconstruction PSNR {score:.2f} dB")
        if inversion.dpl_log:
            cap = inversion.settings["dpl"]["max_iterations"]
            summary += (f"; DPL steps at the {cap}-iteration cap: {capped_steps(inversion.dpl_log, cap)} "
                        f"of {inversion.num_steps}")
        if inversion.method == "dpl" and inversion.null == "negative":
            summary += ("; DPL's tokens with a negative-prompt null step damaged the other objects of scene edits "
                        "even with a local blend (README, Faster inversions): --null direct kept them")
        if inversion.method == "dpl" and model.dtype != torch.float32:
            summary += (f"; DPL in {checks.dtype_name(model.dtype)} went astray on some scenes where "
                        "float32 did not (README, Benchmarks): float32 is its reliable precision")
        return InversionView(
            key=key, inversion=inversion, reconstruction=reconstruction, psnr=score,
            attention=figure_image(word_attention_grid(inversion)),
            comparison=comparison,
            background=figure_image(background_view(inversion)) if inversion.clusters is not None else None,
            dpl_log=figure_image(dpl_log_view(inversion)) if inversion.dpl_log else None,
            cached=cached, summary=summary,
        )

    def cached(self, key: str) -> Inversion:
        """A cached inversion by key (what a browser session keeps)."""
        return Inversion.load(self._inversion_folder(key))

    def _inversion_folder(self, key: str | None) -> Path:
        """The cache folder of an inversion by its key; only a key :meth:`_key` makes names one (never a
        path out of the cache, whatever a session sends)."""
        folder = self.cache_dir / "inversions" / str(key)
        if not key or not KEY.fullmatch(key) or not (folder / METADATA_FILE).is_file():
            raise DplEditError("Invert an image first: editing starts from an inversion.")
        return folder

    # -------------------------------------------------------------- editing
    @on_torch_thread
    def edit(self, key: str | None, targets: str, config: EditConfig, report: Report | None = None,
             cancelled: Callable[[], bool] | None = None) -> EditView:
        """Edit a cached inversion towards each target prompt (one per line); never inverts again."""
        if not key:
            raise DplEditError("Invert an image first: editing starts from an inversion.")
        prompts = [line.strip() for line in (targets or "").splitlines() if line.strip()]
        if not prompts:
            raise PromptError("Give at least one target prompt (one per line).")
        inversion = self.cached(key)
        what = f"Editing {len(prompts)} target(s)"
        callback = _sampling_steps(inversion.num_steps, what, report, cancelled,
                                   "Edit cancelled; the edits shown before are kept. Press Edit to start again.")
        if report is not None:
            report(0.0, f"{what}: {inversion.num_steps} steps")
        result = edit(self.model(inversion.model_id), inversion, prompts, config, callback=callback, progress=False)
        grid = figure_image(edit_grid(result, inversion.source_image))
        download = self._package(key, inversion, result, grid, config)
        return EditView([(image, target) for image, target in zip(result.edits, result.targets)], grid, download)

    def _package(self, key: str, inversion: Inversion, result: EditResult, grid: Image.Image,
                 config: EditConfig) -> Path:
        """inversion/ and edits/ of this edit as one zip in the cache, named by the whole inversion key,
        the targets and the edit's settings (one image and prompt's NTI and DPL inversions share a key's
        first part, and one inversion's edits of the same targets differ by their settings)."""
        edit_settings = json.dumps([result.targets, dataclasses.asdict(config)], sort_keys=True, default=str)
        path = self.cache_dir / "downloads" / f"{key}-edit-{hashlib.sha256(edit_settings.encode()).hexdigest()[:12]}.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w") as archive:
            for file in sorted(self._inversion_folder(key).iterdir()):
                archive.write(file, f"inversion/{file.name}")
            archive.writestr("edits/reconstruction.png", png_bytes(result.reconstruction))
            for j, image in enumerate(result.edits, start=1):
                archive.writestr(f"edits/edit_{j}.png", png_bytes(image))
            archive.writestr("edits/edit_grid.png", png_bytes(grid))
            record = edit_record(inversion, result, config, "../inversion")
            archive.writestr(f"edits/{EDIT_FILE}", json.dumps(record, indent=2, default=str))
        tmp.replace(path)
        return path

    def inversion_zip(self, key: str) -> Path:
        """The inversion folder as a zip."""
        folder = self._inversion_folder(key)
        path = self.cache_dir / "downloads" / f"{key}-inversion.zip"
        if not path.is_file():  # written under a temporary name: an interrupted zip is never served
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w") as archive:
                for file in sorted(folder.iterdir()):
                    archive.write(file, file.name)
            tmp.replace(path)
        return path

    # -------------------------------------------------------------- cache
    def _key(self, image: Image.Image, prompt: str, model, settings: InvertSettings) -> str:
        """``<image, prompt, model and its precision>-<method settings>``: inversions of one image and prompt
        share a prefix."""
        model_key = json.dumps([model.fingerprint(), str(model.dtype)], sort_keys=True, default=str)
        pair = hashlib.sha256(png_bytes(image) + prompt.encode() + model_key.encode())
        method = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
        return f"{pair.hexdigest()[:20]}-{settings.method}-{method.hexdigest()[:12]}"

    def _other_method(self, key: str, inversion: Inversion) -> Inversion | None:
        """The newest cached inversion of the same image and prompt by NTI when this is DPL, or by DPL otherwise."""
        wanted = "nti" if inversion.method == "dpl" else "dpl"
        prefix = key.split("-")[0]
        folders = sorted((self.cache_dir / "inversions").glob(f"{prefix}-{wanted}-*"),
                         key=lambda f: f.stat().st_mtime, reverse=True)
        return next((inversion for folder in folders if (inversion := _readable(folder)) is not None), None)


def _readable(folder: Path) -> Inversion | None:
    """The cached inversion in ``folder``, or None where there is none or it cannot be read (damaged,
    of another version, or left without its inversion.json by a server stopped while saving it):
    inverting again replaces it, rather than the image failing for good."""
    if not (folder / METADATA_FILE).is_file():
        return None
    try:
        return Inversion.load(folder)
    except InversionFileError as err:
        logger.warning("The cached inversion %s cannot be read (%s); it is inverted again.", folder.name, err)
        return None


def figure_image(fig) -> Image.Image:
    """A matplotlib figure as a PIL image."""
    buffer = io.BytesIO()
    save_figure(fig, buffer)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def enlarged(image: Image.Image | None) -> Image.Image | None:
    """Small model images enlarged for the page (nearest neighbour, so pixels stay pixels)."""
    if image is None or image.width >= DISPLAY_SIZE:
        return image
    factor = DISPLAY_SIZE // image.width
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
