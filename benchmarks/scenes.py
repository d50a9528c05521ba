"""The scene benchmark: `dpl scenes export` + `dpl batch` + `dpl metrics` (the one evaluation path,
PIE-Bench's P2P settings), plus the localisation that only rendered scenes can measure.

1. Export COUNT test (or validation) scenes of two or three objects as a PIE-Bench folder (OUT/data):
   three word swaps per scene (a shape, a colour, the ground), with edit masks, the renderer's true
   edits and the other objects' masks (the distractors).
2. `dpl batch` with the chosen editing methods: one inversion per scene and method, each swap edited
   with PIE-Bench's P2P settings; edits and records under OUT (PIE-Bench's layout; a rerun resumes).
3. Localisation (the paper's Fig. 5a, and a direct leakage measure) from the same inversions: for each
   noun's step-averaged map, the share of its mass on its own object, on the other objects and on the
   background (exact masks) and IoU-vs-threshold curves with its own object and with the others.
   NTI's maps are DDIM's (null-text inversion leaves the conditional branch on the DDIM maps).
   `--ablations` adds DPL with each loss alone (inverted for localisation only).
4. `dpl metrics`: unedited-part PSNR / LPIPS / MSE / SSIM as PIE-Bench, the edited part against the
   oracle and the distractors against the source, per edit type; inversion and edit times.

    python benchmarks/scenes.py                                   # the bundled model; 2 scenes
    python benchmarks/scenes.py --scenes 16 --methods nti,dpl     # NTI+P2P vs DPL+P2P
    python benchmarks/scenes.py --objects 3 --scenes 8            # three-object scenes
    python benchmarks/scenes.py --methods nti,npi,direct --no-blend  # P2P without its local blend
    python benchmarks/scenes.py --model DIR --split validation    # another scene model; for tuning

Writes OUT/scenes.md (localisation, then the metrics table), OUT/scenes.json, OUT/localisation.png,
and dpl metrics' OUT/metrics.md and metrics.json. Choose settings on the validation split, never the
test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from dpl_edit import invert
from dpl_edit.artifacts import write_atomic
from dpl_edit.batch.metrics import evaluate, tables, write_tables
from dpl_edit.batch.piebench import read_dataset
from dpl_edit.batch.runner import METHOD_FOLDERS, record_path, run_batch
from dpl_edit.editing.plan import TARGET_TOKENS
from dpl_edit.inversion.dynamic_prompt import capped_steps
from dpl_edit.localisation import attention_shares, best_iou, iou_curve, mean_iou, plot_curves
from dpl_edit.losses import SPANS
from dpl_edit.pipeline import model_dpl_config
from dpl_edit.registry import load_model
from dpl_edit.scenes.export import export_scenes, exported_scene
from dpl_edit.scenes.render import render
from dpl_edit.views import word_map

FULL_TEST = 60  # the paper reports on 60 test images
# batch method -> localisation row (NTI keeps DDIM's maps)
LOCALISED = {"ddim": "ddim", "nti": "ddim", "dpl": "dpl", "dpl-negative": "dpl-negative", "dpl-direct": "dpl-direct"}
ABLATIONS = {"dpl L_at only": ("at",), "dpl L_dj only": ("dj",), "dpl L_bg only": ("bg",)}


def localise(inversion, scene) -> list[dict]:
    """Per noun: mass shares (own, other objects, background) and the IoU curves."""
    _, masks = render(scene)
    masks = [torch.from_numpy(m) for m in masks]
    rows = []
    for k, word in enumerate(inversion.words[: len(masks)]):
        noun = word_map(inversion, word["positions"])
        others = torch.stack([m for j, m in enumerate(masks) if j != k]).any(dim=0)
        share = attention_shares(noun, [masks[k], others])
        rows.append({"word": k, "shares": [float(v) for v in share], "own curve": iou_curve(noun, masks[k]).tolist(),
                     "other curve": iou_curve(noun, others).tolist()})
    return rows


def localisation_file(out: Path, label: str, image_path: str) -> Path:
    return out / "localisation" / label / Path(image_path).with_suffix(".json").name


def save_localisation(out: Path, label: str, image_path: str, inversion) -> None:
    """One file per (row, scene), so that a resumed run keeps what it measured."""
    scene = exported_scene(image_path)
    capped = (capped_steps(inversion.dpl_log, inversion.settings["dpl"]["max_iterations"])
              if inversion.dpl_log else None)
    path = localisation_file(out, label, image_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"caption": scene.caption, "capped steps": capped, "words": localise(inversion, scene)}))


def localisation_table(out: Path, labels: list[str]) -> tuple[list[str], dict]:
    header = ("| localisation | scenes | mass on own object | mass on other objects | mass on background | mean IoU own "
              "| mean IoU other | best IoU own | best IoU other | DPL steps at the cap |")
    lines = [header, "|---" * 10 + "|"]
    curves = {}
    for label in labels:
        files = sorted((out / "localisation" / label).glob("*.json"))
        if not files:
            continue
        scenes = [json.loads(f.read_text()) for f in files]
        words = [w for s in scenes for w in s["words"]]
        share = np.mean([w["shares"] for w in words], axis=0)
        own = torch.tensor([w["own curve"] for w in words])
        other = torch.tensor([w["other curve"] for w in words])
        curves[f"{label}, own"], curves[f"{label}, other"] = own.mean(dim=0), other.mean(dim=0)
        capped = [s["capped steps"] for s in scenes if s["capped steps"] is not None]
        lines.append(f"| {label} | {len(scenes)} | {share[0]:.3f} | {share[1]:.3f} | {share[2]:.3f} "
                     f"| {mean_iou(own).mean():.3f} | {mean_iou(other).mean():.3f} | {best_iou(own).mean():.3f} "
                     f"| {best_iou(other).mean():.3f} | {np.mean(capped) if capped else float('nan'):.1f} |")
    return lines, curves


def times_table(out: Path, items, methods: list[str]) -> list[str]:
    lines = ["| method | inversion s per scene | edit s per swap | DPL steps at the cap |", "|---|---|---|---|"]
    for method in methods:
        records = [json.loads(p.read_text()) for p in (record_path(out, method, item) for item in items) if p.is_file()]
        records = [r for r in records if r.get("status") == "done"]
        if not records:
            continue
        inversions = {r["image_path"].split("/")[-1]: r["inversion_s"] for r in records}
        capped = [r["dpl_steps_at_cap"] for r in records if "dpl_steps_at_cap" in r]
        lines.append(f"| {method} | {np.mean(list(inversions.values())):.1f} | {np.mean([r['edit_s'] for r in records]):.1f} "
                     f"| {np.mean(capped) if capped else float('nan'):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scenes", help="a scene model folder (default: the bundled one)")
    parser.add_argument("--scenes", type=int, default=2, help="scenes (default: 2)")
    parser.add_argument("--full", action="store_true", help=f"all {FULL_TEST} test scenes")
    parser.add_argument("--objects", type=int, default=2, choices=[2, 3], help="objects per scene (default: 2)")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="scenes inverted at once, in lockstep (dpl batch --batch-size; default: 1)")
    parser.add_argument("--methods", default="ddim,nti,dpl",
                        help=f"comma-separated editing methods of {','.join(METHOD_FOLDERS)} (default: ddim,nti,dpl)")
    parser.add_argument("--ablations", action="store_true", help="localisation of DPL with each loss alone")
    parser.add_argument("--target-tokens", choices=TARGET_TOKENS,
                        help="which learned DPL vectors the targets keep (default: the model's recommendation)")
    parser.add_argument("--span", choices=SPANS, help="DPL's re-softmax span (default: the model's recommendation)")
    parser.add_argument("--no-blend", action="store_true",
                        help="edit without PIE-Bench's local blend (and so without its re-weighting of the new word)")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHOD_FOLDERS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHOD_FOLDERS)}")
    model = load_model(args.model)
    count = FULL_TEST if args.full else args.scenes
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    export_scenes(data, args.split, (args.objects,), count)
    items = read_dataset(data)
    if args.no_blend:  # PIE-Bench blends and re-weights only where an item names its blend words
        items = [dataclasses.replace(item, blended_word=()) for item in items]
    dpl = model_dpl_config(model, **({"balancing_span": args.span} if args.span else {}))

    def on_inversion(method, group, image, inversion):
        if method in LOCALISED:
            save_localisation(args.out, LOCALISED[method], group[0].image_path, inversion)

    started = time.perf_counter()
    summary = run_batch(model, data, items, methods, args.out, num_steps=args.steps, split=False,
                        on_inversion=on_inversion, target_tokens=args.target_tokens, dpl=dpl,
                        batch_size=args.batch_size)
    if args.ablations:
        for index, item in enumerate(items[::3]):  # one item per scene
            scene = exported_scene(item.image_path)
            for label, losses in ABLATIONS.items():
                if localisation_file(args.out, label, item.image_path).is_file():
                    continue
                inversion = invert(model, render(scene)[0], scene.marked_caption(), method="dpl", num_steps=args.steps,
                                   dpl=model_dpl_config(model, losses=losses), progress=False)
                save_localisation(args.out, label, item.image_path, inversion)
            print(f"ablations: scene {index + 1}/{count}", flush=True)
    print(f"dpl batch: {summary.line()} ({time.perf_counter() - started:.0f} s)")

    labels = list(dict.fromkeys(LOCALISED[m] for m in methods if m in LOCALISED)) + (list(ABLATIONS) if args.ablations else [])
    localisation, curves = localisation_table(args.out, labels)
    if curves:
        plot_curves(curves, args.out / "localisation.png", title=f"{count} {args.split} scenes")
    result = evaluate(data, args.out, items, methods)
    write_tables(result, args.out)
    metrics, means = tables(result)
    settings = "PIE-Bench's P2P settings" + (" without the local blend" if args.no_blend else "")
    header = (f"Scene benchmark: {count} {args.objects}-object {args.split} scenes (3 swaps each), {args.steps} steps, "
              f"model {args.model}, {settings}, span {args.span or 'the model default'}, "
              f"target tokens {args.target_tokens or 'the model default'}")
    text = "\n".join([header, "", *localisation, "", *times_table(args.out, items, methods), "", metrics])
    (args.out / "scenes.md").write_text(text)
    (args.out / "scenes.json").write_text(json.dumps(
        {"scenes": count, "objects": args.objects, "split": args.split, "steps": args.steps, "model": args.model,
         "span": args.span, "target_tokens": args.target_tokens, "blend": not args.no_blend, "methods": methods,
         "curves": {k: v.tolist() for k, v in curves.items()}, "metrics": means}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    main()
