"""Time the engine: DDIM inversion, null-text inversion and sampling, ours beside a baseline.

Baselines, run in the same process on the same model and inputs:
- sampling: diffusers' StableDiffusionPipeline (output_type="latent");
- DDIM inversion: a loop over diffusers' DDIMInverseScheduler;
- null-text inversion: the same algorithm with the UNet's weights left trainable, as the public
  null-text inversion code leaves them (every backward also computes 860 M weight gradients).

    python benchmarks/engine.py --scale tiny            # CPU, seconds
    python benchmarks/engine.py --scale sd14 --device cuda --dtype float32

Prints a markdown table; --json writes the numbers too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json

import torch
from diffusers import DDIMInverseScheduler, StableDiffusionPipeline
from timing import machine, timed

from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.inversion import NullTextConfig, ddim_inversion, null_text_inversion
from dpl_edit.random_models import sd14_sized_model, tiny_model
from dpl_edit.sampling import sample


@contextlib.contextmanager
def trainable_unet(model):
    model.unet.requires_grad_(True)
    try:
        yield
    finally:
        model.unet.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "sd14"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--nti-iterations", type=int, default=10)
    parser.add_argument("--nti-steps", type=int, default=None,
                        help="time null-text inversion over the first N timesteps only (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = (tiny_model() if args.scale == "tiny" else sd14_sized_model()).to(device, dtype)
    schedule = DDIMSchedule.from_scheduler(model.scheduler, args.steps)
    g = torch.Generator().manual_seed(0)
    z0 = (torch.randn(1, 4, model.latent_size, model.latent_size, generator=g) * 0.8).to(device, dtype)
    cond, null = model.encode_prompt("a cat and a dog"), model.encode_prompt("")
    pivot = ddim_inversion(model, z0, cond, schedule, progress=False).pivot
    nti = NullTextConfig(max_iterations=args.nti_iterations)

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=model.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    inverse = DDIMInverseScheduler.from_config(model.scheduler.config)

    @torch.no_grad()
    def diffusers_inversion():
        inverse.set_timesteps(args.steps)
        z = z0
        for t in inverse.timesteps:
            z = inverse.step(model.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
        return z

    nti_schedule = dataclasses.replace(schedule, timesteps=schedule.timesteps[: args.nti_steps or args.steps])

    def our_nti():
        return null_text_inversion(model, pivot, cond, null, nti_schedule, 7.5, nti, progress=False)

    def baseline_nti():
        with trainable_unet(model):
            return our_nti()

    rows = [
        ("DDIM inversion", lambda: ddim_inversion(model, z0, cond, schedule, progress=False),
         diffusers_inversion, "diffusers DDIMInverseScheduler loop"),
        (f"null-text inversion ({args.nti_iterations} it/step max, {nti_schedule.num_steps} steps)", our_nti, baseline_nti,
         "same loop, UNet weights trainable (public NTI code)"),
        ("sampling (guided)", lambda: sample(model, pivot[0], schedule, cond, null, 7.5, progress=False),
         lambda: pipe(latents=pivot[0], prompt_embeds=cond, negative_prompt_embeds=null,
                      num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent"),
         "diffusers StableDiffusionPipeline"),
    ]
    results = []
    for name, ours, baseline, what in rows:
        slow = "null-text" in name and args.scale == "sd14"  # minutes each: one untimed-warm-up-free run
        repeats, warmup = (1, 0) if slow else (args.repeats, 1)
        ours_s, base_s = timed(ours, device, repeats, warmup), timed(baseline, device, repeats, warmup)
        results.append({"stage": name, "ours_s": ours_s, "baseline_s": base_s, "baseline": what})

    print(f"\nEngine benchmark: scale={args.scale}, {args.steps} steps, {args.dtype}, {machine(device)}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| stage | ours (s) | baseline (s) | baseline / ours | baseline |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['ours_s']:.3f} | {r['baseline_s']:.3f} | "
              f"{r['baseline_s'] / r['ours_s']:.2f}x | {r['baseline']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scale": args.scale, "device": machine(device), "dtype": args.dtype, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
