"""The demo: the whole chain on the bundled scene model, offline, in about a minute on a CPU.

A two-object test scene from the renderer (so its ground truth is exact) is inverted with DPL and
with null-text inversion, one object's shape is swapped with Prompt-to-Prompt (word swap with
local blending) from each inversion, and the edits are compared with the renderer's oracle: the
background and the other object should not change, the edited object should become the oracle's.

    report = run_demo("outputs/demo")
    print(report.summary)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from . import checks
from .artifacts import Inversion
from .editing import EditConfig, edit, recommended_edit_config
from .errors import SettingError
from .images import psnr
from .inversion.dynamic_prompt import saturation
from .localisation import attention_shares
from .models import StableDiffusion
from .pipeline import invert
from .registry import SCENE_MODEL_ID, load_model
from .scenes.edits import swap_config
from .scenes.render import SPLIT_SIZE, WordSwap, check_scene_model_size, render, split_scene, swap_word
from .views import background_view, comparison_grid, demo_figure, save_figure, word_attention_grid, word_map

DEMO_SCENE = 16  # test split: "a purple oval and a purple circle on water" (look-alikes, one colour)
DEMO_EDIT = WordSwap("shape", "triangle", index=0)
DEMO_STEPS = 20  # under a minute on 2 CPU cores (the paper: 50); both methods get the same schedule
METHODS = {"nti": "NTI + P2P", "dpl": "DPL + P2P"}


@dataclass
class MethodResult:
    inversion: Inversion
    edited: Image.Image
    inversion_seconds: float
    edit_seconds: float
    background_psnr: float  # outside both objects (before and after the edit), vs the source
    other_object_psnr: float  # the object that was not edited, vs the source
    edited_object_psnr: float  # the edited object's region, vs the oracle
    shares: dict[str, list[float]]  # per noun: its map's mass on its own object, the other object, the background


@dataclass
class DemoReport:
    folder: Path
    source_prompt: str
    target_prompt: str
    results: dict[str, MethodResult]
    seconds: float
    summary: str


def run_demo(
    out: str | Path,
    model: StableDiffusion | None = None,
    scene_index: int = DEMO_SCENE,
    swap: WordSwap = DEMO_EDIT,
    num_steps: int = DEMO_STEPS,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> DemoReport:
    """Run the demo into folder ``out`` (PNGs, the two inversions, summary.txt); see the module doc."""
    started = time.perf_counter()
    out = check_demo_settings(out, scene_index, num_steps)
    model = model or load_model(SCENE_MODEL_ID)
    check_scene_model_size(model, "The demo")
    out.mkdir(parents=True, exist_ok=True)
    scene = split_scene("test", scene_index, num_objects=2)
    if swap.kind == "shape" and scene.objects[swap.index].shape == swap.new:  # already that shape: another
        swap = replace(swap, new="circle" if swap.new != "circle" else "square")
    target = swap_word(scene, swap)
    image, masks = render(scene)
    oracle, new_masks = render(target)
    image.save(out / "source.png")
    oracle.save(out / "oracle.png")
    word = swap.source_word(scene)
    recommended = recommended_edit_config(EditConfig(), model.settings)  # the model's choice of target tokens
    config = swap_config(scene, swap, model.tokenizer, recommended.target_tokens)  # blends the swapped noun, by position
    edited_region = masks[swap.index] | new_masks[swap.index]
    regions = {"background": ~(masks[0] | masks[1] | edited_region), "other": masks[1 - swap.index]}
    results = {}
    for method, label in METHODS.items():
        log(f"{label}: inverting with {method.upper()} ({num_steps} steps)")
        t0 = time.perf_counter()
        inversion = invert(model, image, scene.marked_caption(), method=method, num_steps=num_steps, progress=progress)
        t1 = time.perf_counter()
        log(f"{label}: editing {word!r} -> {swap.new!r}")
        result = edit(model, inversion, [target.caption], config, progress=progress)
        t2 = time.perf_counter()
        inversion.save(out / f"{method}_inversion")
        edited = result.edits[0]
        edited.save(out / f"{method}_p2p.png")
        results[method] = MethodResult(
            inversion, edited, t1 - t0, t2 - t1,
            background_psnr=psnr(edited, image, regions["background"]),
            other_object_psnr=psnr(edited, image, regions["other"]),
            edited_object_psnr=psnr(edited, oracle, edited_region),
            shares=_noun_shares(inversion, masks),
        )
    nti, dpl = results["nti"].inversion, results["dpl"].inversion
    save_figure(demo_figure(image, oracle, {METHODS[m]: r.edited for m, r in results.items()}, nti, dpl, target.caption),
                out / "demo.png")
    save_figure(comparison_grid(nti, dpl), out / "attention_nti_vs_dpl.png")
    save_figure(word_attention_grid(dpl), out / "attention_dpl_steps.png")
    save_figure(background_view(dpl), out / "background_mask.png")
    seconds = time.perf_counter() - started
    summary = _summary(scene.caption, target.caption, f"{word} -> {swap.new} (Prompt-to-Prompt {config.mode}, "
                       "local blend on the swapped noun)", num_steps, model, results, seconds)
    (out / "summary.txt").write_text(summary)
    return DemoReport(out, scene.caption, target.caption, results, seconds, summary)


def check_demo_settings(out: str | Path, scene_index: int, num_steps: int) -> Path:
    """The demo's settings checked (before any model is loaded); returns the output folder."""
    checks.count("The number of steps", num_steps)
    checks.count("The scene number", scene_index, 0)
    if scene_index >= SPLIT_SIZE:
        raise SettingError(f"The scene number must be below {SPLIT_SIZE} (the test split's size), got {scene_index}")
    return checks.output_folder("The demo's output folder", out)


def _noun_shares(inversion: Inversion, masks) -> dict[str, list[float]]:
    """Each noun's attention mass on its own object, on the other object and on the background."""
    objects = [torch.from_numpy(m) for m in masks]
    return {f"{word['word']} ({k + 1})": attention_shares(word_map(inversion, word["positions"]),
                                                          [objects[k], objects[1 - k]]).tolist()
            for k, word in enumerate(inversion.words)}


def _summary(source: str, target: str, what: str, steps: int, model: StableDiffusion,
             results: dict[str, MethodResult], seconds: float) -> str:
    dpl = results["dpl"].inversion
    rows = [f"| {METHODS[m]} | {r.background_psnr:.2f} | {r.other_object_psnr:.2f} | {r.edited_object_psnr:.2f} "
            f"| {r.inversion_seconds:.1f} | {r.edit_seconds:.1f} |" for m, r in results.items()]
    return "\n".join([
        f"dpl demo: model {model.model_id} on {model.device}, {steps} DDIM steps, guidance 7.5",
        f"source prompt: {source}",
        f"target prompt: {target}",
        f"edit: {what}",
        "",
        ("PSNR in dB: background and other object against the source (higher: less leakage), "
         "edited object against the renderer's oracle (higher: closer to the intended edit)."),
        "",
        "| method | background PSNR | other object PSNR | edited object PSNR vs oracle | inversion s | edit s |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        saturation(dpl.dpl_log, dpl.settings["dpl"]["max_iterations"]),
        "",
        ("Where each noun's attention lies (step-averaged cross-attention, share of its mass; "
         "leakage is mass off its own object):"),
        "",
        "| method | noun | own object | other object | background |",
        "|---|---|---|---|---|",
        *[f"| {METHODS[m]} | {noun} | {own:.3f} | {other:.3f} | {background:.3f} |"
          for m, r in results.items() for noun, (own, other, background) in r.shares.items()],
        "",
        f"total time: {seconds:.1f} s",
        ("files: demo.png (edits and noun maps), attention_nti_vs_dpl.png, attention_dpl_steps.png, "
         "background_mask.png, source.png, oracle.png, nti_p2p.png, dpl_p2p.png, nti_inversion/, dpl_inversion/ "
         "(edit them further with `dpl edit`)"),
        "",
    ])
