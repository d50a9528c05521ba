"""The scene benchmark: localisation and editing on test scenes of two or three objects, methods side by side.

(a) Localisation (the paper's Fig. 5a, and a direct leakage measure): for each noun's step-averaged
    map, the share of its mass on its own object, on the other objects and on the background
    (exact masks), and IoU-vs-threshold curves with its own object and with the other objects
    (summaries over thresholds 0.1 .. 1.0: at 0.0 every pixel is on). Methods: DDIM (= NTI:
    null-text inversion leaves the conditional branch on the DDIM maps), DPL, and DPL with each
    loss alone.
(b) Editing: an object-noun, a colour and a background word swap per scene (target rendered by
    the edit oracle), blended as Prompt-to-Prompt blends them: a shape swap on the swapped noun, a
    colour swap on the object's noun (by position, not by spelling), a background swap on the
    background word less the object nouns. PSNR/SSIM of the unedited region against the source,
    PSNR of the edited region against the oracle, PSNR of the other objects against the source
    (the distractors: higher is less damage), reconstruction PSNR.
(c) Time per image: inversion and edit; for DPL, the steps that ran out of AdamW iterations.

    python benchmarks/scenes.py                              # the bundled model; 2 scenes
    python benchmarks/scenes.py --scenes 24 --methods ddim,dpl,nti       # NTI+P2P vs DPL+P2P only
    python benchmarks/scenes.py --objects 3 --scenes 12                  # three-object scenes
    python benchmarks/scenes.py --model DIR --split validation           # another scene model; for tuning

Writes OUT/scenes.md and OUT/scenes.json (the tables, the mean curves and one row per scene, edit
and method) and OUT/localisation.png. Settings are chosen on the validation split, never the test split.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional import structural_similarity_index_measure

from dpl_edit import edit, invert, reconstruct
from dpl_edit.editing import EditConfig, recommended_edit_config
from dpl_edit.editing.plan import TARGET_TOKENS
from dpl_edit.images import psnr, to_tensor
from dpl_edit.inversion.dynamic_prompt import capped_steps as dpl_capped_steps
from dpl_edit.localisation import attention_shares, best_iou, iou_curve, mean_iou, plot_curves
from dpl_edit.losses import SPANS
from dpl_edit.pipeline import model_dpl_config
from dpl_edit.registry import load_model
from dpl_edit.scenes.edits import swap_config
from dpl_edit.scenes.export import scene_swaps
from dpl_edit.scenes.render import render, split_scene, swap_word
from dpl_edit.views import word_map

FULL_TEST = 60  # the paper reports on 60 test images
LOCALISATION = {"ddim": ("ddim", None), "dpl": ("dpl", None), "dpl L_at only": ("dpl", ("at",)),
                "dpl L_dj only": ("dpl", ("dj",)), "dpl L_bg only": ("dpl", ("bg",))}
EDITING = {"nti + p2p": ("nti", "optimized"), "dpl + p2p": ("dpl", "optimized"),
           "npi + p2p": ("npi", "optimized"), "direct + p2p": ("direct", "optimized"),
           "dpl (direct) + p2p": ("dpl", "direct")}
METHODS = {"ddim": ["ddim"], "dpl": ["dpl", "dpl + p2p"], "dpl-at": ["dpl L_at only"],
           "dpl-dj": ["dpl L_dj only"], "dpl-bg": ["dpl L_bg only"], "nti": ["nti + p2p"], "npi": ["npi + p2p"],
           "direct": ["direct + p2p"], "dpl-direct": ["dpl (direct) + p2p"]}  # --methods names -> table rows
EDIT_COLUMNS = ["reconstruction PSNR", "unedited PSNR", "unedited SSIM", "edited PSNR vs oracle", "distractor PSNR",
                "inversion s", "edit s"]


def region_ssim(a: torch.Tensor, b: torch.Tensor, mask: np.ndarray) -> float:
    """Mean of the SSIM map over a region."""
    _, full = structural_similarity_index_measure(a[None], b[None], data_range=1.0, return_full_image=True)
    return float(full[0].mean(dim=0)[torch.from_numpy(mask)].mean())


def as_unit(image) -> torch.Tensor:
    return (to_tensor(image)[0] + 1) / 2  # (3, H, W) in [0, 1]


def capped_steps(inversion) -> int | None:
    """DPL steps that ran out of AdamW iterations (None for other methods)."""
    if not inversion.dpl_log:
        return None
    return dpl_capped_steps(inversion.dpl_log, inversion.settings["dpl"]["max_iterations"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="a scene model folder (default: the bundled one)")
    parser.add_argument("--scenes", type=int, default=2, help="scenes (default: 2)")
    parser.add_argument("--full", action="store_true", help=f"all {FULL_TEST} test scenes")
    parser.add_argument("--objects", type=int, default=2, choices=[2, 3], help="objects per scene (default: 2)")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--target-tokens",
                        help=f"comma-separated modes of {','.join(TARGET_TOKENS)}: which learned DPL vectors the "
                        "targets keep; each DPL edit is run once per mode (default: the model's recommendation, "
                        "else keep, the authors')")
    parser.add_argument("--span", choices=SPANS, help="DPL's re-softmax span (default: the model's recommendation)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(chosen) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    model = load_model(args.model)
    if args.target_tokens is None:
        args.target_tokens = recommended_edit_config(EditConfig(), model.settings).target_tokens
    modes = [m.strip() for m in args.target_tokens.split(",") if m.strip()]
    if not modes or set(modes) - set(TARGET_TOKENS):
        parser.error(f"--target-tokens takes a comma-separated subset of {','.join(TARGET_TOKENS)}")
    labels = {label for m in chosen for label in METHODS[m]}
    localisation = [label for label in LOCALISATION if label in labels]
    editing = [(label, mode) for label in EDITING if label in labels
               for mode in (modes if EDITING[label][0] == "dpl" else modes[:1])]
    count = FULL_TEST if args.full else args.scenes
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    curves = defaultdict(list)
    shares = defaultdict(list)
    rows = []
    started_all = time.perf_counter()
    for index in range(count):
        scene = split_scene(args.split, index, num_objects=args.objects)
        image, masks = render(scene)
        source = as_unit(image)
        torch_masks = [torch.from_numpy(m) for m in masks]
        inversions, seconds = {}, {}
        needed = set(localisation) | ({"dpl"} if "dpl + p2p" in editing else set())
        for label in [lab for lab in LOCALISATION if lab in needed]:
            method, losses = LOCALISATION[label]
            dpl = model_dpl_config(model, **({"losses": losses} if losses else {}),
                                   **({"balancing_span": args.span} if args.span else {}))
            started = time.perf_counter()
            inversions[label] = inversion = invert(model, image, scene.marked_caption(), method=method,
                                                   num_steps=args.steps, dpl=dpl, progress=False)
            seconds[label] = time.perf_counter() - started
            if label not in localisation:
                continue
            for k, word in enumerate(inversion.words):
                noun = word_map(inversion, word["positions"])
                others = torch.stack([m for j, m in enumerate(torch_masks) if j != k]).any(dim=0)
                curves[f"{label}, own"].append(iou_curve(noun, torch_masks[k]))
                curves[f"{label}, other"].append(iou_curve(noun, others))
                share = attention_shares(noun, [torch_masks[k], others])
                shares[label].append(share)
                rows.append({"scene": index, "caption": scene.caption, "kind": "localisation", "method": label,
                             "word": k, "own share": float(share[0]), "other share": float(share[1]),
                             "background share": float(share[2]),
                             "best IoU own": float(best_iou(curves[f"{label}, own"][-1])),
                             "best IoU other": float(best_iou(curves[f"{label}, other"][-1])),
                             "capped steps": capped_steps(inversion)})
        edits = scene_swaps(scene, rng)
        for label, mode in editing:
            method, null = EDITING[label]
            name = label if mode == modes[0] else f"{label}, {mode} tokens"
            if (method, null) == ("dpl", "optimized"):
                inversion, inversion_s = inversions["dpl"], seconds["dpl"]
            else:
                started = time.perf_counter()
                inversion = invert(model, image, scene.marked_caption(), method=method, null=null,
                                   num_steps=args.steps, progress=False)
                inversion_s = time.perf_counter() - started
            reconstruction_psnr = psnr(reconstruct(model, inversion, progress=False), image)
            for swap in edits:
                target_scene = swap_word(scene, swap)
                oracle, new_masks = render(target_scene)
                config = swap_config(scene, swap, model.tokenizer, mode)
                started = time.perf_counter()
                result = edit(model, inversion, [target_scene.caption], config, progress=False)
                edit_s = time.perf_counter() - started
                edited = as_unit(result.edits[0])
                objects = np.any(masks, axis=0)
                if swap.kind == "background":
                    changed, distractor = ~objects, None
                else:
                    changed = masks[swap.index] | new_masks[swap.index]
                    distractor = np.any([m for j, m in enumerate(masks) if j != swap.index], axis=0) & ~changed
                rows.append({
                    "scene": index, "caption": scene.caption, "kind": swap.kind, "new": swap.new, "method": name,
                    "blend": list(config.blend), "subtract": list(config.subtract),
                    "reconstruction PSNR": reconstruction_psnr,
                    "unedited PSNR": psnr(result.edits[0], image, ~changed),
                    "unedited SSIM": region_ssim(edited, source, ~changed),
                    "edited PSNR vs oracle": psnr(result.edits[0], oracle, changed),
                    "distractor PSNR": None if distractor is None else psnr(result.edits[0], image, distractor),
                    "inversion s": inversion_s, "edit s": edit_s, "capped steps": capped_steps(inversion),
                })
        print(f"scene {index + 1}/{count} done ({time.perf_counter() - started_all:.0f} s)", flush=True)
        write_results(args, count, localisation, curves, shares, rows)


def write_results(args, count, localisation, curves, shares, rows) -> None:
    """The tables (markdown), the curves plot and the JSON, from everything measured so far."""
    done = len({r["scene"] for r in rows})
    mean_curves = {k: torch.stack(v).mean(dim=0) for k, v in curves.items()}
    if mean_curves:
        plot_curves(mean_curves, args.out / "localisation.png", title=f"{done} {args.split} scenes")
    editing = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "localisation"))
    lines = [(f"Scene benchmark: {done} of {count} {args.objects}-object {args.split} scenes, {args.steps} steps, "
             f"model {args.model}, span {args.span or 'the model default'}, target tokens {args.target_tokens}"), ""]
    if localisation:
        lines += [("| localisation | mass on own object | mass on other objects | mass on background "
                  "| mean IoU own | mean IoU other | best IoU own | best IoU other | DPL steps at the cap |"),
                  "|---" * 9 + "|"]
        for label in localisation:
            share = torch.stack(shares[label]).mean(dim=0)
            own, other = torch.stack(curves[f"{label}, own"]), torch.stack(curves[f"{label}, other"])
            capped = [r["capped steps"] for r in rows if r["kind"] == "localisation" and r["method"] == label
                      and r["word"] == 0 and r["capped steps"] is not None]
            lines.append(f"| {label} | {share[0]:.3f} | {share[1]:.3f} | {share[2]:.3f} | {mean_iou(own).mean():.3f} "
                         f"| {mean_iou(other).mean():.3f} | {best_iou(own).mean():.3f} | {best_iou(other).mean():.3f} "
                         f"| {np.mean(capped) if capped else float('nan'):.1f} |")
    if editing:
        lines += ["", "| editing | " + " | ".join(EDIT_COLUMNS) + " |", "|---" * (len(EDIT_COLUMNS) + 1) + "|"]
        for label in editing:
            mine = [r for r in rows if r["method"] == label and r["kind"] != "localisation"]
            values = [np.mean([r[c] for r in mine if r[c] is not None]) for c in EDIT_COLUMNS]
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines += ["", "| editing by kind | " + " | ".join(EDIT_COLUMNS[1:5]) + " |", "|---" * 5 + "|"]
        for kind in ("shape", "colour", "background"):
            for label in editing:
                mine = [r for r in rows if r["method"] == label and r["kind"] == kind]
                values = [np.mean([r[c] for r in mine if r[c] is not None] or [np.nan]) for c in EDIT_COLUMNS[1:5]]
                lines.append(f"| {kind}: {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    table = "\n".join(lines)
    (args.out / "scenes.md").write_text(table + "\n")
    (args.out / "scenes.json").write_text(json.dumps(
        {"scenes": done, "objects": args.objects, "split": args.split, "steps": args.steps, "model": args.model,
         "span": args.span, "target_tokens": args.target_tokens, "curves": {k: v.tolist() for k, v in mean_curves.items()},
         "rows": rows}, indent=1))
    if done == count:
        print("\n" + table)


if __name__ == "__main__":
    main()
