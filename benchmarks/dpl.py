"""Time one DPL token iteration (text encoder + UNet forward to the maps + losses + backward +
AdamW step) three ways, and optionally a whole DPL inversion:

- ours, early exit: the UNet forward stops after the last 16x16 cross-attention layer;
- ours, full forward: the same without the early exit;
- authors' style: full forward with the weights their code leaves trainable (the UNet's but for
  self-attention: `authors.py`) and the whole token-embedding table as the AdamW parameter (their
  code optimises the table and restores the other rows after each step).

    python benchmarks/dpl.py --scale tiny
    python benchmarks/dpl.py --scale sd14 --device cuda --full-inversion
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from authors import authors_trainable
from timing import machine, timed

from dpl_edit.attention import attention_hook, attention_layers, select_layers
from dpl_edit.diffusion import DDIMSchedule
from dpl_edit.inversion import DynamicPromptConfig, ddim_inversion, dynamic_prompt_inversion
from dpl_edit.inversion.dynamic_prompt import TokenLosses
from dpl_edit.prompts import parse_marked_prompt
from dpl_edit.random_models import sd14_sized_model, tiny_model

PROMPT = "a {cat} and a {dog} on the grass"


def ours(model, losses_at: TokenLosses, z, vectors):
    param = vectors.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01)

    def step():
        losses = losses_at(z, 501, param)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def authors_style(model, losses_at: TokenLosses, z, marked):
    table = model.text_encoder.get_input_embeddings()
    original = table.weight.detach().clone()
    optimizer = torch.optim.AdamW([table.weight], lr=1e-3, weight_decay=0.01)
    token_ids = torch.tensor([marked.token_ids], device=model.device)
    keep = torch.ones(table.weight.shape[0], dtype=torch.bool, device=model.device)
    keep[token_ids[0, marked.positions]] = False

    def step():
        states = model.text_encoder(token_ids).last_hidden_state
        losses = losses_at.losses_of(_maps(model, losses_at, z, states))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        with torch.no_grad():
            table.weight[keep] = original[keep]  # restore every row but the dynamic tokens

    return step


def _maps(model, losses_at: TokenLosses, z, states):
    with attention_hook(model.unet, losses_at.layers, losses_at.store):
        model.predict(z, 501, states)
    maps = losses_at.store.step_maps("cross", losses_at.config.cross_resolution)[0]
    losses_at.store.end_step()
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "sd14"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--full-inversion", action="store_true", help="also time a whole 50-step DPL inversion")
    parser.add_argument("--json")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = (tiny_model() if args.scale == "tiny" else sd14_sized_model()).to(device, dtype)
    marked = parse_marked_prompt(PROMPT, model.tokenizer)
    layers = select_layers(attention_layers(model.unet), kinds=["cross"], resolutions=[16])
    background = torch.zeros(16, 16)
    background[:, :6] = 1
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, model.latent_size, model.latent_size, generator=g).to(device, dtype)
    vectors = model.token_embedding(torch.tensor(marked.token_ids, device=device)[marked.positions]).float()

    early = TokenLosses(model, marked, layers, background, DynamicPromptConfig())
    full = TokenLosses(model, marked, layers, background, DynamicPromptConfig(early_exit=False))
    rows = {
        "ours, early exit": timed(ours(model, early, z, vectors), device, args.iterations, warmup=2),
        "ours, full forward": timed(ours(model, full, z, vectors), device, args.iterations, warmup=2),
    }
    with authors_trainable(model):
        rows["authors' style (weights trainable, whole table)"] = timed(
            authors_style(model, full, z, marked), device, args.iterations
        )

    inversion_s = None
    if args.full_inversion:
        schedule = DDIMSchedule.from_scheduler(model.scheduler, 50)
        cond = model.encode_tokens(torch.tensor([marked.token_ids], device=device))
        start = time.perf_counter()
        pivot = ddim_inversion(model, z, cond, schedule, progress=False).pivot
        dynamic_prompt_inversion(model, marked, pivot, model.encode_prompt(""), background, layers, schedule, 7.5,
                                 progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        inversion_s = time.perf_counter() - start

    print(f"\nDPL token iteration: scale={args.scale}, {args.dtype}, {machine(device)}, torch {torch.__version__}\n")
    base = rows["ours, early exit"]
    print("| variant | ms / iteration | / ours, early exit |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / base:.2f}x |")
    if inversion_s is not None:
        print(f"\nWhole DPL inversion (50 steps, <= 21 token + 10 null iterations per step): {inversion_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scale": args.scale, "device": machine(device), "ms": {k: 1000 * v for k, v in rows.items()},
                       "inversion_s": inversion_s}, f, indent=2)


if __name__ == "__main__":
    main()
