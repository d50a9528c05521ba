"""Time a Prompt-to-Prompt edit (one target, 50 steps) beside a baseline in the same run.

- ours: `dpl_edit.edit` on a saved-style inversion (source + target branches, attention edits on
  every cross-attention layer and on self-attention at 16x16 and below, local blend), twice: with
  the source branch following the inversion's trajectory (NTI, DPL and direct inversions store
  it: 3 UNet rows a step) and sampled (an inversion without one: 4 rows);
- baseline: diffusers' StableDiffusionPipeline sampling the same two prompts as a batch of 2 with
  no attention control (4 rows a step: the floor an edit that samples its source cannot go below).

    python benchmarks/editing.py --scale tiny
    python benchmarks/editing.py --scale scenes
    python benchmarks/editing.py --scale sd14 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from diffusers import StableDiffusionPipeline
from timing import machine, timed

from dpl_edit import EditConfig, Inversion, edit
from dpl_edit.artifacts import library_versions
from dpl_edit.random_models import sd14_sized_model, tiny_model
from dpl_edit.registry import SCENE_MODEL_ID, load_model

MODELS = {"tiny": tiny_model, "scenes": lambda: load_model(SCENE_MODEL_ID), "sd14": sd14_sized_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(MODELS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = MODELS[args.scale]().to(device)
    source, target = "a cat and a dog", "a leopard and a dog"
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(1, 4, model.latent_size, model.latent_size, generator=g).to(device)
    null = model.encode_prompt("")
    inversion = Inversion(
        method="nti", model_id=model.model_id, model_fingerprint=model.fingerprint(), prompt=source,
        token_ids=model.tokenize(source)[0].tolist(), prompt_tokens=[], latent_T=z_T, source_latent=z_T,
        num_steps=args.steps, guidance_scale=7.5, null="optimized",
        null_states=null.expand(args.steps, -1, -1).clone(), versions=library_versions(),
        trajectory=torch.randn(args.steps + 1, *z_T.shape[1:], generator=g).to(device),  # (its values do not matter here)
    )
    sampled = dataclasses.replace(inversion, trajectory=None)
    config = EditConfig(blend=("cat",))
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    edits = [lambda: edit(model, inversion, [target], config, progress=False),
             lambda: edit(model, sampled, [target], config, progress=False)]
    for run in edits:  # warm-up
        run()
    times = [[], []]
    for r in range(args.repeats):  # alternating, the order reversed every other round: this CPU's speed drifts
        for k in ([0, 1] if r % 2 == 0 else [1, 0]):
            times[k].append(timed(edits[k], device, 1, warmup=0))
    ours, ours_sampled = (statistics.median(each) for each in times)
    baseline = timed(lambda: pipe([source, target], latents=z_T.expand(2, -1, -1, -1), num_inference_steps=args.steps,
                                  guidance_scale=7.5, output_type="pil"), device, args.repeats)
    print(f"\nEdit benchmark: scale={args.scale}, {args.steps} steps, float32, {machine(device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads\n")
    print("| what | seconds | / baseline |")
    print("|---|---|---|")
    print(f"| ours: P2P edit (replace + self injection + local blend), decode both, source on its trajectory | "
          f"{ours:.2f} | {ours / baseline:.2f}x |")
    print(f"| ours: the same, source sampled (an inversion without a trajectory) | {ours_sampled:.2f} | "
          f"{ours_sampled / baseline:.2f}x |")
    print(f"| baseline: StableDiffusionPipeline, the two prompts as a batch, no control | {baseline:.2f} | 1.00x |")


if __name__ == "__main__":
    main()
