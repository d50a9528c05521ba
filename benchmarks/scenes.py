"""The scene benchmark: localisation and editing on two-object test scenes, methods side by side.

(a) Localisation (the paper's Fig. 5a): IoU-vs-threshold curves of each noun's step-averaged map
    with its own object and with the other object, for DDIM (= NTI: null-text inversion leaves
    the conditional branch on the DDIM maps), DPL, and DPL with each loss alone.
(b) Editing: an object-noun, a colour and a background word swap per scene (target rendered by
    the edit oracle), with NTI+P2P, DPL+P2P and the faster inversions: PSNR/SSIM of the unedited
    region against the source, PSNR of the edited region against the oracle, PSNR of the other
    object against the source (the distractor: higher is less damage), reconstruction PSNR.
(c) Time per image: inversion and edit.

    python benchmarks/scenes.py                       # the bundled model; 2 scenes, about 20 min on 2 CPU cores
    python benchmarks/scenes.py --full                # the whole test set used for the numbers (60)
    python benchmarks/scenes.py --model DIR --split validation   # another scene model; for tuning

Writes OUT/scenes.md, OUT/scenes.json and OUT/localisation.png.
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

from dpl_edit import EditConfig, edit, invert, reconstruct
from dpl_edit.editing.plan import swap_mode
from dpl_edit.images import psnr, to_tensor
from dpl_edit.localisation import iou_curve, plot_curves
from dpl_edit.pipeline import model_dpl_config
from dpl_edit.registry import load_model
from dpl_edit.scenes.render import BACKGROUNDS, COLOURS, SHAPES, WordSwap, render, split_scene, swap_word
from dpl_edit.views import word_map

FULL_TEST = 60  # the paper reports on 60 test images
LOCALISATION = {"ddim": ("ddim", None), "dpl": ("dpl", None), "dpl L_at only": ("dpl", ("at",)),
                "dpl L_dj only": ("dpl", ("dj",)), "dpl L_bg only": ("dpl", ("bg",))}
EDITING = {"nti + p2p": ("nti", "optimized"), "dpl + p2p": ("dpl", "optimized"),
           "npi + p2p": ("npi", "optimized"), "direct + p2p": ("direct", "optimized"),
           "dpl (direct) + p2p": ("dpl", "direct")}


def edits_for(scene, rng: np.random.Generator) -> list[WordSwap]:
    """An object-noun swap, a colour swap and a background swap."""
    shape = rng.choice([s for s in SHAPES if s != scene.objects[0].shape])
    colour = rng.choice([c for c in COLOURS if c not in (scene.objects[1].colour,)])
    background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
    return [WordSwap("shape", str(shape), 0), WordSwap("colour", str(colour), 1), WordSwap("background", str(background))]


def region_ssim(a: torch.Tensor, b: torch.Tensor, mask: np.ndarray) -> float:
    """Mean of the SSIM map over a region."""
    _, full = structural_similarity_index_measure(a[None], b[None], data_range=1.0, return_full_image=True)
    return float(full[0].mean(dim=0)[torch.from_numpy(mask)].mean())


def as_unit(image) -> torch.Tensor:
    return (to_tensor(image)[0] + 1) / 2  # (3, H, W) in [0, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="a scene model folder (default: the bundled one)")
    parser.add_argument("--scenes", type=int, default=2, help="two-object scenes (default: 2, about 20 min on 2 CPU cores)")
    parser.add_argument("--full", action="store_true", help=f"all {FULL_TEST} test scenes")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    count = FULL_TEST if args.full else args.scenes
    model = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    curves = defaultdict(list)
    rows = defaultdict(lambda: defaultdict(list))
    for index in range(count):
        scene = split_scene(args.split, index, num_objects=2)
        image, masks = render(scene)
        source = as_unit(image)
        inversions = {}
        for label, (method, losses) in LOCALISATION.items():
            dpl = model_dpl_config(model, **({"losses": losses} if losses else {}))
            started = time.perf_counter()
            inversions[label] = inversion = invert(model, image, scene.marked_caption(), method=method,
                                                   num_steps=args.steps, dpl=dpl, progress=False)
            rows[label]["inversion s"].append(time.perf_counter() - started)
            for k, noun in enumerate(word_map(inversion, word["positions"]) for word in inversion.words):
                curves[f"{label}, own"].append(iou_curve(noun, torch.from_numpy(masks[k])))
                curves[f"{label}, other"].append(iou_curve(noun, torch.from_numpy(masks[1 - k])))
        edits = edits_for(scene, rng)
        for label, (method, null) in EDITING.items():
            inversion = inversions["dpl"] if (method, null) == ("dpl", "optimized") else None
            if inversion is None:
                started = time.perf_counter()
                inversion = invert(model, image, scene.marked_caption(), method=method, null=null,
                                   num_steps=args.steps, progress=False)
                rows[label]["inversion s"].append(time.perf_counter() - started)
            else:
                rows[label]["inversion s"].append(rows["dpl"]["inversion s"][-1])
            rows[label]["reconstruction PSNR"].append(
                psnr(reconstruct(model, inversion, progress=False), image))
            for swap in edits:
                target_scene = swap_word(scene, swap)
                oracle, new_masks = render(target_scene)
                word = swap.source_word(scene)
                config = EditConfig(mode=swap_mode(word, swap.new, model.tokenizer), blend=(word,))
                started = time.perf_counter()
                result = edit(model, inversion, [target_scene.caption], config, progress=False)
                rows[label]["edit s"].append(time.perf_counter() - started)
                edited = as_unit(result.edits[0])
                if swap.kind == "background":
                    changed = ~(masks[0] | masks[1])
                    distractor = None
                else:
                    changed = masks[swap.index] | new_masks[swap.index]
                    distractor = masks[1 - swap.index]
                rows[label]["unedited PSNR"].append(psnr(result.edits[0], image, ~changed))
                rows[label]["unedited SSIM"].append(region_ssim(edited, source, ~changed))
                rows[label]["edited PSNR vs oracle"].append(psnr(result.edits[0], oracle, changed))
                if distractor is not None:
                    rows[label]["distractor PSNR"].append(psnr(result.edits[0], image, distractor))
        print(f"scene {index + 1}/{count} done", flush=True)

    mean_curves = {k: torch.stack(v).mean(dim=0) for k, v in curves.items()}
    plot_curves(mean_curves, args.out / "localisation.png", title=f"{count} {args.split} scenes")
    lines = [f"Scene benchmark: {count} two-object {args.split} scenes, {args.steps} steps, model {args.model}", "",
             "| localisation | mean IoU own object | mean IoU other object | best-threshold IoU own | best other |",
             "|---|---|---|---|---|"]
    for label in LOCALISATION:
        own, other = mean_curves[f"{label}, own"], mean_curves[f"{label}, other"]
        best_own = torch.stack(curves[f"{label}, own"]).amax(dim=1).mean()
        best_other = torch.stack(curves[f"{label}, other"]).amax(dim=1).mean()
        lines.append(f"| {label} | {own.mean():.3f} | {other.mean():.3f} | {best_own:.3f} | {best_other:.3f} |")
    columns = ["reconstruction PSNR", "unedited PSNR", "unedited SSIM", "edited PSNR vs oracle", "distractor PSNR",
               "inversion s", "edit s"]
    lines += ["", "| editing | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in EDITING:
        lines.append(f"| {label} | " + " | ".join(f"{np.mean(rows[label][c]):.3f}" for c in columns) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "scenes.md").write_text(table + "\n")
    (args.out / "scenes.json").write_text(json.dumps(
        {"scenes": count, "split": args.split, "curves": {k: v.tolist() for k, v in mean_curves.items()},
         "editing": {label: {c: float(np.mean(v)) for c, v in cols.items()} for label, cols in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
