"""Where a compiled or graphed model's time goes, one stage at a time (issue 11's GPU diagnosis).

Prints, as each is measured: model build, compile() (with its gradient check) or use_cuda_graphs()
(with its capture and check), the UNet's forward and forward+backward to the text states through
``StableDiffusion.predict`` (ms per call; the first calls compile or capture; not compiled, again
with cuDNN's autotuner, with the UNet's weights in the other layout (NCHW or channels_last) and with
both; the eager UNet's forward + backward and the VAE's decode in both layouts), DPL's token step
alone (its 21 iterations: ms per step), then a 1-step NTI and a 1-step DPL inversion twice each,
and a 10-step P2P edit twice. With ``--mode compile`` run it under
``TORCH_LOGS=perf_hints,recompiles,graph_breaks`` to see why CUDA graphs are skipped or a graph
compiles again. Lines are also appended as JSON to ``--json``; ``--profile`` adds, before the edits,
a 1-step DPL inversion profiled by Python function (cProfile: where an inversion's fixed costs go)
and by op (by self time: on CUDA, GPU time; the gaps between are launches).

    TORCH_LOGS=perf_hints,recompiles,graph_breaks python scripts/speed_probe.py --model sd14 --device cuda
    python scripts/speed_probe.py --model sd14 --device cuda --mode cuda-graphs
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from dpl_edit import edit, invert
from dpl_edit.attention import attention_layers, select_layers
from dpl_edit.editing import EditConfig
from dpl_edit.inversion import DynamicPromptConfig
from dpl_edit.inversion.dynamic_prompt import TokenLosses, optimize_tokens
from dpl_edit.prompts import parse_marked_prompt
from dpl_edit.random_models import sd14_sized_model, tiny_model

PROMPT, TARGET = "a {cat} and a {dog}", "a cat and a big tiger"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd14", choices=["sd14", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", choices=["compile", "cuda-graphs", "eager"], default="compile")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--profile", action="store_true",
                        help="after the inversions, profile a 1-step DPL inversion (cProfile by function, then torch.profiler "
                        "by op)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def report(stage: str, seconds: float, calls: int = 1) -> None:
        line = {"stage": stage, "seconds": round(seconds, 3), "ms per call": round(1000 * seconds / calls, 2)}
        print(json.dumps(line), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(line) + "\n")

    def timed(stage: str, work: Callable[[], object], calls: int = 1) -> None:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            work()
        sync()
        report(stage, time.perf_counter() - start, calls)

    start = time.perf_counter()
    model = (sd14_sized_model() if args.model == "sd14" else tiny_model()).to(device, getattr(torch, args.dtype))
    report("build", time.perf_counter() - start)
    if args.mode == "compile":
        timed("compile() and its gradient check", model.compile)
        print(f"compiled={model.compiled} compiled_backward={model.compiled_backward}", flush=True)
    elif args.mode == "cuda-graphs":
        timed("use_cuda_graphs(), its capture and check", model.use_cuda_graphs)
        print(f"graphed={model.graphed_unet is not None}", flush=True)

    side = model.latent_size
    z = torch.randn(1, model.unet.config.in_channels, side, side, device=device)
    latent = z.to(model.dtype)  # as an inversion's latents are (the token step's capture is the one inversions replay)
    states = model.encode_prompt("")
    t = torch.tensor(501, device=device)

    def forward() -> None:
        with torch.no_grad():
            model.predict(z, t, states)

    param = states.detach().clone().requires_grad_(True)

    def forward_backward() -> None:  # as an optimiser step reads it: a fresh gradient each call
        param.grad = None  # (accumulating into the last call's would read a CUDA graph output it overwrote)
        (model.predict(z, t, param) ** 2).mean().backward()

    for calls in (3, 20):  # the first 3 record the graphs
        timed(f"predict, no grad, x{calls}", forward, calls)
        timed(f"predict + backward to the states, x{calls}", forward_backward, calls)
    # The same with cuDNN's autotuner on (it times each convolution's algorithms at the first call of
    # a shape; PyTorch leaves it off) and with the UNet's weights in the other layout (use_cuda_graphs
    # puts them in channels_last, NHWC, the layout of cuDNN's tensor-core convolutions; eager and
    # compiled models keep PyTorch's default NCHW; on this project's CPU channels_last took nothing off
    # the scene model's inversions: README), each captured afresh, then back. Not compiled: new strides
    # would mean minutes of compiling again.
    def layout(benchmark: bool, memory_format: torch.memory_format) -> None:
        torch.backends.cudnn.benchmark = benchmark
        model.unet.to(memory_format=memory_format)
        if model.graphed_unet is not None:  # the captures read the old weights' memory and algorithms
            model.graphed_unet.captures.clear()

    if args.mode != "compile":
        weight = next(p for p in model.unet.parameters() if p.dim() == 4)
        own = torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        other = torch.contiguous_format if own == torch.channels_last else torch.channels_last
        names = {torch.channels_last: "channels_last", torch.contiguous_format: "NCHW"}
        for benchmark, memory_format, label in ((True, own, "cudnn.benchmark"), (False, other, names[other]),
                                                (True, other, f"{names[other]} + cudnn.benchmark")):
            layout(benchmark, memory_format)
            for calls in (3, 20):
                timed(f"predict, no grad, {label}, x{calls}", forward, calls)
                timed(f"predict + backward to the states, {label}, x{calls}", forward_backward, calls)
        # The eager UNet (what runs with --no-cuda-graphs or after a failed capture) and the VAE's decode
        # (eager everywhere) in both layouts: whether channels_last would pay there too
        def eager_forward_backward() -> None:
            param.grad = None
            (model.unet_sample(latent, t, param).float() ** 2).mean().backward()

        def decode() -> None:
            with torch.no_grad():
                model.decode_latents(latent)

        torch.backends.cudnn.benchmark = False
        for memory_format in (own, other):
            model.unet.to(memory_format=memory_format)
            model.vae.to(memory_format=memory_format)
            for calls in (2, 10):
                timed(f"eager predict + backward, {names[memory_format]}, x{calls}", eager_forward_backward, calls)
                timed(f"VAE decode, {names[memory_format]}, x{calls}", decode, calls)
        model.vae.to(memory_format=torch.contiguous_format)
        layout(False, own)

    # DPL's token step alone (the worst case: all 21 AdamW iterations), beside the null iteration's
    # forward + backward above: a token iteration is 52% of a null iteration's arithmetic at SD-1.4 size
    marked = parse_marked_prompt(PROMPT, model.tokenizer)
    config = DynamicPromptConfig()
    background = torch.zeros(config.cross_resolution, config.cross_resolution)
    background[:, : config.cross_resolution // 3] = 1
    losses_at = TokenLosses(model, marked, select_layers(attention_layers(model.unet), kinds=["cross"],
                                                         resolutions=[config.cross_resolution]), background, config)
    vectors = model.token_embedding(torch.tensor(marked.token_ids, device=device)[marked.positions]).float()
    for calls in (1, 3):  # the first captures or compiles the step and checks it against eager
        timed(f"DPL token step, 21 iterations, x{calls}", lambda: optimize_tokens(losses_at, latent, 501, 49, vectors),
              calls)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (model.image_size, model.image_size, 3),
                                                              dtype=np.uint8))
    for method in ("nti", "dpl"):
        for attempt in ("first", "second"):
            timed(f"{method} 1 step ({attempt})",
                  lambda method=method: invert(model, image, PROMPT, method=method, num_steps=1, progress=False))
    if args.profile:
        profile_dpl_step(model, image, device, sync)
    inversion = invert(model, image, PROMPT, method="nti", num_steps=10, progress=False)
    for attempt in ("first", "second"):  # the second replays the first's capture (one edit layout)
        timed(f"P2P edit, 10 steps ({attempt})",
              lambda: edit(model, inversion, [TARGET], EditConfig(mode="refine"), progress=False))


def profile_dpl_step(model, image: Image.Image, device: torch.device, sync: Callable[[], None]) -> None:
    """A 1-step DPL inversion profiled twice: by Python function (cProfile, cumulative: where a
    whole inversion's fixed costs go, captures and the background mask included), then by op
    (torch.profiler; on CUDA by GPU time, the gaps between being launches)."""
    profiler = cProfile.Profile()
    profiler.enable()
    invert(model, image, PROMPT, method="dpl", num_steps=1, progress=False)
    sync()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        invert(model, image, PROMPT, method="dpl", num_steps=1, progress=False)
        sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profile.key_averages().table(sort_by=key, row_limit=20), flush=True)

if __name__ == "__main__":
    main()
