"""The Gradio page of `dpl serve`: an Invert panel, an Edit panel and the views, on :class:`Workbench`.

Every handler turns a :class:`~dpl_edit.errors.DplEditError` into a message in the page's status
line and leaves what is already shown in place; an unexpected exception is logged on the server
with its traceback and the page says only that it happened. Long work goes through Gradio's queue,
one job on the model at a time.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import gradio as gr
import torch

from ..cli.common import pairs
from ..editing import MODES, EditConfig, recommended_edit_config
from ..editing.plan import TARGET_TOKENS
from ..errors import DplEditError, out_of_memory, system_refusal
from ..images import FITS
from .workbench import DPL_NULLS, PAGE_METHODS, InvertSettings, Workbench, enlarged

logger = logging.getLogger(__name__)
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SCENE_CHOICES = [f"test scene {i} (two objects)" for i in range(4)] + [f"test scene {i} (three objects)" for i in range(2)]
ERROR = "**Error:** "
# the token helper's table keeps each token on one line, in narrow cells (a long prompt scrolls sideways)
PAGE_CSS = ("#tokens table { display: block; overflow-x: auto; } "
            "#tokens th, #tokens td { white-space: nowrap; padding: 4px 6px; } "
            "#status .pending, #edit-status .pending { visibility: hidden; }")  # the last message, under the progress


def _guarded(outputs: int):
    """Run a handler; on an error, put the message in the first output (the status line) and skip the rest."""

    def wrap(handler):
        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except DplEditError as err:
                message = str(err)
            except torch.OutOfMemoryError as err:
                message = out_of_memory(err)
            except OSError as err:
                message = system_refusal(err, "dpl serve --cache") or _bug(handler)
            except Exception:  # noqa: BLE001 (a bug: the traceback goes to the server's log, never to the page)
                message = _bug(handler)
            if outputs == 1:
                return ERROR + message
            return (ERROR + message, *[gr.skip() for _ in range(outputs - 1)])

        return run

    return wrap


def _bug(handler) -> str:
    """Log the traceback of an unexpected error (never shown on the page) and say so."""
    logger.exception("dpl serve: unexpected error in %s", handler.__name__)
    return "Something went wrong on the server (a bug in dpl-edit; the details are in its log)."


class CancelFlags:
    """Each session's inversion and edit, each with a flag of its own that Cancel sets.

    A job keeps its own flag: a job cancelled and then started again gets a new, clear one, while
    the cancelled one (still running to the end of its step) keeps its set flag and stops."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], threading.Event] = {}

    def start(self, session: str, job: str) -> threading.Event:
        """A new job of the session (``job``: "invert" or "edit"); its flag."""
        flag = self._latest[session, job] = threading.Event()
        return flag

    def cancel(self, session: str, job: str) -> None:
        """Cancel the session's latest job of that kind (nothing when it has none)."""
        flag = self._latest.get((session, job))
        if flag is not None:
            flag.set()


def build_page(workbench: Workbench, default_steps: int = 50) -> gr.Blocks:
    """The page; ``workbench`` does all the work."""
    jobs = CancelFlags()

    def session(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or ""

    @_guarded(4)
    def pick(choice, model_name):
        if not choice:
            return "", gr.skip(), gr.skip(), gr.skip()
        if choice.startswith("test scene"):
            index, objects = int(choice.split()[2]), 3 if "three" in choice else 2
            path, caption = workbench.scene_example(index, objects)
        else:
            path, caption = str(EXAMPLES / choice), "a red {circle} and a blue {square} on grass"
        image = workbench.source_image(path, model_name)
        return f"Picked {choice}.", path, caption, enlarged(image)

    @_guarded(3)
    def upload(path, model_name, fit):
        image = workbench.source_image(path, model_name, fit)
        return "Image loaded; now describe it in the source prompt.", path, enlarged(image)

    @_guarded(1)
    def show_tokens(prompt, model_name):
        return workbench.tokens(prompt, model_name)

    @_guarded(9)
    def run_invert(path, prompt, method, model_name, null, steps, guidance, seed, fit,
                   request: gr.Request, progress=gr.Progress()):  # noqa: B008 (how Gradio asks for a progress bar)
        stop = jobs.start(session(request), "invert")
        settings = InvertSettings(method=method, null=null, steps=int(steps), guidance=float(guidance),
                                  seed=int(seed), fit=fit)
        view = workbench.invert(path, prompt, settings, model_name,
                                report=lambda done, what: progress(done, desc=what), cancelled=stop.is_set)
        return (view.summary, view.key, enlarged(view.reconstruction), view.attention, view.comparison,
                view.background, view.dpl_log, str(workbench.inversion_zip(view.key)), gr.update(interactive=True))

    def cancel(request: gr.Request):
        jobs.cancel(session(request), "invert")
        return ("Inversion cancelled: it stops at the end of its step and keeps nothing, unless the inversion had "
                "finished (then Invert with the same settings shows it at once). Press Invert to start again.")

    def cancel_edit(request: gr.Request):
        jobs.cancel(session(request), "edit")
        return "Edit cancelled: it stops at the end of its step; the edits shown before are kept."

    @_guarded(4)
    def run_edit(key, targets, mode, cross, self_steps, reweight, blend, subtract, target_tokens,
                 request: gr.Request, progress=gr.Progress()):  # noqa: B008 (how Gradio asks for a progress bar)
        stop = jobs.start(session(request), "edit")
        config = EditConfig(
            mode=mode, cross_replace_steps=float(cross), self_replace_steps=float(self_steps),
            reweight=pairs((reweight or "").split(), "re-weighting"), blend=tuple((blend or "").split()),
            subtract=tuple((subtract or "").split()), target_tokens=target_tokens,
        )
        view = workbench.edit(key, targets, config, report=lambda done, what: progress(done, desc=what),
                              cancelled=stop.is_set)
        gallery = [(enlarged(image), caption) for image, caption in view.edits]
        return f"{len(gallery)} edit(s) of the kept inversion (not inverted again).", gallery, view.grid, \
            str(view.download)

    examples = sorted(p.name for p in EXAMPLES.glob("*.png")) if EXAMPLES.is_dir() else []
    with gr.Blocks(title="dpl-edit", analytics_enabled=False) as page:
        gr.Markdown("# dpl-edit: invert once, edit many times\n"
                    "Dynamic Prompt Learning (DPL), null-text inversion and Prompt-to-Prompt on "
                    f"`{workbench.model_name}`. Mark the words DPL should learn in braces: `a {{cat}} and a {{dog}}`.")
        key = gr.State(None)
        source_path = gr.State(None)
        with gr.Row():
            with gr.Column():
                gr.Markdown("## 1. Invert")
                picker = gr.Dropdown(SCENE_CHOICES + examples, value=None, label="Pick a scene or an example",
                                     elem_id="picker")
                uploaded = gr.File(label="... or upload an image", type="filepath", file_types=["image"])
                preview = gr.Image(label="Source image", interactive=False, height=256, elem_id="source-image")
                prompt = gr.Textbox(label="Source prompt (words in {braces} are learned by DPL)", elem_id="prompt")
                tokens = gr.Markdown(elem_id="tokens")
                method = gr.Radio(list(PAGE_METHODS), value="dpl", label="Method")
                with gr.Accordion("Advanced", open=False):
                    model_name = gr.Textbox(value=workbench.model_name, label="Model (a name or a diffusers folder)")
                    null = gr.Radio(list(DPL_NULLS), value="optimized", label="DPL's null step")
                    steps = gr.Slider(1, 100, value=default_steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Number(value=7.5, label="Guidance scale")
                    seed = gr.Number(value=InvertSettings.seed, precision=0,
                                     label="Seed (DPL's background clustering; the authors' by default)")
                    fit = gr.Radio(list(FITS), value="crop", label="Non-square images")
                with gr.Row():
                    invert_button = gr.Button("Invert", variant="primary", elem_id="invert")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
                # the inversion's progress shows here, under Invert: its step, DPL's losses and a bar
                status = gr.Markdown(elem_id="status", min_height=80)
            with gr.Column():
                gr.Markdown("## 2. Edit")
                targets = gr.Textbox(label="Target prompts, one per line", lines=3, elem_id="targets")
                mode = gr.Radio(list(MODES), value="replace", label="Mode (replace: same token count)")
                with gr.Row():
                    cross = gr.Slider(0, 1, value=0.8, step=0.05, label="Cross-attention steps")
                    self_steps = gr.Slider(0, 1, value=0.4, step=0.05, label="Self-attention steps")
                reweight = gr.Textbox(label="Re-weighting (word=factor ...)", placeholder="fluffy=2.0")
                with gr.Row():
                    blend = gr.Textbox(label="Local blend words", placeholder="circle")
                    subtract = gr.Textbox(label="Subtract words", placeholder="square")
                recommended = recommended_edit_config(EditConfig(), workbench.model().settings).target_tokens
                target_tokens = gr.Radio(list(TARGET_TOKENS), value=recommended,
                                         label="Learned DPL tokens in the targets (default: the model's choice)")
                with gr.Row():
                    edit_button = gr.Button("Edit", variant="primary", interactive=False, elem_id="edit")
                    cancel_edit_button = gr.Button("Cancel", elem_id="cancel-edit")
                edit_status = gr.Markdown(elem_id="edit-status", min_height=80)  # and the edit's progress
        with gr.Tabs():
            with gr.Tab("Edits"):
                gallery = gr.Gallery(label="Edits", columns=4, fit_columns=False, height=300, object_fit="contain",
                                     preview=False, allow_preview=False, elem_id="edits")
                grid = gr.Image(label="Edit grid: source, reconstruction, edit, edited words' maps")
            with gr.Tab("Reconstruction"):
                reconstruction = gr.Image(label="Reconstruction", height=256)
            with gr.Tab("Attention"):
                # short: the label sits over the figure's centred title (the columns name the step ranges)
                attention = gr.Image(label="Each word's cross-attention", elem_id="attention")
                comparison = gr.Image(label="NTI vs DPL (when both are inverted for this image and prompt)")
            with gr.Tab("DPL"):
                background = gr.Image(label="Self-attention clusters and the background mask")
                dpl_log = gr.Image(label="DPL's losses against their thresholds, per step")
            with gr.Tab("Downloads"):
                inversion_file = gr.File(label="Inversion folder (zip)")
                edits_file = gr.File(label="Inversion and edits (zip)")

        picker.change(pick, [picker, model_name], [status, source_path, prompt, preview]).then(
            show_tokens, [prompt, model_name], [tokens])
        uploaded.upload(upload, [uploaded, model_name, fit], [status, source_path, preview])
        prompt.change(show_tokens, [prompt, model_name], [tokens], queue=False)
        inverting = invert_button.click(
            run_invert, [source_path, prompt, method, model_name, null, steps, guidance, seed, fit],
            [status, key, reconstruction, attention, comparison, background, dpl_log, inversion_file, edit_button],
            concurrency_id="model", concurrency_limit=1, show_progress_on=[status],
        )
        cancel_button.click(cancel, None, [status], cancels=[inverting], queue=False)
        editing = edit_button.click(
            run_edit, [key, targets, mode, cross, self_steps, reweight, blend, subtract, target_tokens],
            [edit_status, gallery, grid, edits_file], concurrency_id="model", concurrency_limit=1,
            show_progress_on=[edit_status],
        )
        cancel_edit_button.click(cancel_edit, None, [edit_status], cancels=[editing], queue=False)
    return page


def serve(workbench: Workbench, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          default_steps: int = 50, block: bool = True):
    """Start the page (queued: one job on the model at a time); returns Gradio's (app, local url, share url)."""
    page = build_page(workbench, default_steps)
    page.queue(default_concurrency_limit=1)
    return page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       max_file_size="25mb", allowed_paths=[str(workbench.cache_dir)], footer_links=[],
                       css=PAGE_CSS)
