"""Attention views of saved inversions as PNG grids (the paper's Fig. 1, 3, 4 and 5b).

- :func:`word_attention_grid`: each word's cross-attention over the source image, averaged over
  all steps and over step ranges (rows: words; columns: step ranges).
- :func:`background_view`: the self-attention clusters and the background mask (DPL only).
- :func:`comparison_grid`: two inversions of the same image side by side (e.g. NTI vs DPL).
- :func:`demo_figure`: source, target and edits over the nouns' maps from two inversions.
- :func:`dpl_log_view`: DPL's losses against their thresholds and its AdamW steps, per timestep.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import checks
from .artifacts import Inversion
from .errors import DplEditError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

StepRange = tuple[int, int]  # [start, stop) step indices, 0 the noisiest


def default_step_ranges(num_steps: int) -> list[StepRange]:
    """All steps, then the first fifth, the next three tenths and the last half."""
    a, b = max(1, num_steps // 5), max(2, num_steps // 2)
    return [(0, num_steps), (0, a), (a, b), (b, num_steps)]


def inversion_words(inversion: Inversion) -> list[tuple[str, list[int]]]:
    """(label, token positions) of the words to show: the dynamic words, else the prompt's whole
    words. A word the list holds more than once is labelled with its occurrence in the prompt, as
    ``--blend`` names it (``rectangle@2``), or where that cannot be read, with its token positions."""
    whole = prompt_words(inversion.prompt_tokens)
    words = [(w["word"], list(w["positions"])) for w in inversion.words] or whole
    texts = [word.lower() for word, _ in words]
    labels = []
    for word, positions in words:
        if texts.count(word.lower()) > 1:
            occurrence = _occurrence(word, positions, whole)
            where = f"token {positions[0]}" if len(positions) == 1 else f"tokens {positions[0]}-{positions[-1]}"
            word = f"{word}@{occurrence}" if occurrence else f"{word} ({where})"
        labels.append((word, positions))
    return labels


def prompt_words(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The whole words of a prompt's BPE tokens (``Inversion.prompt_tokens``: a word ends with a token
    that ends in ``</w>``), each with its token positions (the first token is position 1)."""
    words, piece, positions = [], "", []
    for position, token in enumerate(tokens, start=1):
        piece, positions = piece + token, [*positions, position]
        if token.endswith("</w>"):
            words.append((piece[: -len("</w>")], positions))
            piece, positions = "", []
    if positions:  # a prompt cut off inside a word
        words.append((piece, positions))
    return words


def _occurrence(word: str, positions: Sequence[int], whole: list[tuple[str, list[int]]]) -> int | None:
    """Which occurrence (from 1) of ``word`` in the prompt the words at ``positions`` are, counting
    whole-word runs of the same text as ``--blend``'s word@N does; None where ``positions`` are not
    whole words that spell ``word``."""
    inside = [k for k, (_, covered) in enumerate(whole) if set(covered) <= set(positions)]
    if not inside or sorted(p for k in inside for p in whole[k][1]) != sorted(positions):
        return None
    run = [whole[k][0] for k in inside]
    if "".join(run) != "".join(word.lower().split()):
        return None
    return sum([text for text, _ in whole[start : start + len(run)]] == run for start in range(inside[0] + 1))


def word_map(inversion: Inversion, positions: Sequence[int], steps: StepRange | None = None) -> torch.Tensor:
    """The step-averaged cross-attention map (res, res) of a word (the sum of its token columns)."""
    if inversion.cross_maps is None:
        raise DplEditError("This inversion holds no attention maps; invert it again with this version.")
    start, stop = steps or (0, inversion.num_steps)
    maps = inversion.cross_maps[start:stop].float().mean(dim=0)  # (n, res, res)
    return maps[[p - 1 for p in positions]].sum(dim=0)


def overlay(image: np.ndarray, attention: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """An RGB float image (H, W, 3) in [0, 1]: the map, upsampled and scaled to [0, 1] (min to max), over the image."""
    height, width = image.shape[:2]
    heat = F.interpolate(attention[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    heat = ((heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)).numpy()
    from matplotlib import colormaps

    colours = colormaps["jet"](heat)[..., :3]
    return (1 - alpha) * image + alpha * colours


def word_attention_grid(inversion: Inversion, step_ranges: Sequence[StepRange] | None = None) -> Figure:
    """Rows: words; columns: the source image, then the word's map over each step range."""
    ranges = list(step_ranges or default_step_ranges(inversion.num_steps))
    words = inversion_words(inversion)
    image = _source(inversion)
    fig, axes = _subplots(len(words), len(ranges) + 1, figsize=(2.2 * (len(ranges) + 1), 2.3 * len(words)),
                          squeeze=False)
    for row, (word, positions) in enumerate(words):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(word, fontsize=12)
        for col, steps in enumerate(ranges, start=1):
            axes[row, col].imshow(overlay(image, word_map(inversion, positions, steps)))
            if row == 0:
                axes[row, col].set_title("all steps" if steps == (0, inversion.num_steps) else f"steps {steps[0]}-{steps[1] - 1}", fontsize=10)
    axes[0, 0].set_title("source", fontsize=10)
    _finish(fig, axes, f"{inversion.method.upper()} cross-attention: {inversion.prompt}")
    return fig


def background_view(inversion: Inversion) -> Figure:
    """The source, the self-attention clusters, and the background mask over the source."""
    if inversion.clusters is None or inversion.background_mask is None:
        raise DplEditError('Only DPL inversions have a background mask (invert with method="dpl"; --method dpl on '
                           "the command line).")
    image = _source(inversion)
    height, width = image.shape[:2]
    clusters = F.interpolate(inversion.clusters[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    mask = F.interpolate(inversion.background_mask[None, None].float(), size=(height, width), mode="nearest")[0, 0]
    fig, axes = _subplots(1, 3, figsize=(7, 2.6), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("source", fontsize=10)
    axes[0, 1].imshow(clusters.numpy(), cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    axes[0, 1].set_title("self-attention clusters", fontsize=10)
    axes[0, 2].imshow(image * (0.35 + 0.65 * mask.numpy()[..., None]))
    axes[0, 2].set_title("background mask", fontsize=10)
    _finish(fig, axes, f"clusters {inversion.settings.get('background_clusters')} are background"
            + (" (fallback)" if inversion.settings.get("background_fallback") else ""))
    return fig


def dpl_log_view(inversion: Inversion) -> Figure:
    """Per timestep: each DPL loss (solid) against its gradual threshold (dashed), and the AdamW
    steps taken on the tokens against the cap."""
    if not inversion.dpl_log:
        raise DplEditError("Only DPL inversions made with this version keep a per-step log.")
    log = inversion.dpl_log
    steps = [entry["step"] for entry in log]
    cap = inversion.settings.get("dpl", {}).get("max_iterations")
    fig, axes = _subplots(1, 2, figsize=(9, 3.2))
    for k, colour in zip(log[0]["losses"], ("C0", "C1", "C2")):
        axes[0].plot(steps, [e["losses"][k] for e in log], color=colour, label=f"L_{k}")
        axes[0].plot(steps, [e["thresholds"][k] for e in log], color=colour, linestyle="--", label=f"TH_{k}")
    axes[0].set_xlabel("step (0 = noisiest)")
    axes[0].set_title("losses vs thresholds", fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].bar(steps, [e["iterations"] for e in log], color="C3")
    if cap is not None:
        axes[1].axhline(cap, color="k", linestyle=":", label=f"cap {cap}")
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("step (0 = noisiest)")
    axes[1].set_title("AdamW steps on the tokens", fontsize=10)
    fig.suptitle(f"DPL per step: {inversion.prompt}", fontsize=10)
    return fig


def comparison_grid(first: Inversion, second: Inversion) -> Figure:
    """Step-averaged word maps of two inversions of the same prompt side by side."""
    if first.token_ids != second.token_ids:
        raise DplEditError(
            f"The two inversions have different prompts ({first.prompt!r} vs {second.prompt!r}); "
            "compare inversions of the same image and prompt."
        )
    words = inversion_words(second if second.words else first)
    image = _source(first)
    fig, axes = _subplots(len(words), 3, figsize=(6.6, 2.3 * len(words)), squeeze=False)
    for row, (word, positions) in enumerate(words):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(word, fontsize=12)
        axes[row, 1].imshow(overlay(image, word_map(first, positions)))
        axes[row, 2].imshow(overlay(image, word_map(second, positions)))
    for col, title in enumerate(["source", first.method.upper(), second.method.upper()]):
        axes[0, col].set_title(title, fontsize=10)
    _finish(fig, axes, first.prompt if not second.words else second.prompt)
    return fig


def demo_figure(source, target, edits: dict, first: Inversion, second: Inversion, target_prompt: str) -> Figure:
    """Top row: the source, the target, each method's edit (PIL images); below, each noun's
    step-averaged map from the two inversions (``first``, ``second``), two nouns to a row."""
    images = [("source", source), ("target (renderer)", target), *edits.items()]
    maps = [(f"{word}: {inv.method.upper()}", word_map(inv, positions))
            for word, positions in inversion_words(second) for inv in (first, second)]
    columns = max(len(images), 4)
    rows = 1 + -(-len(maps) // columns)
    fig, axes = _subplots(rows, columns, figsize=(2.1 * columns, 2.5 * rows), squeeze=False)
    for ax, (title, image) in zip(axes[0], images):
        ax.imshow(np.asarray(image))
        ax.set_title(title, fontsize=9)
    base = np.asarray(source, dtype=np.float64) / 255.0
    for ax, (title, attention) in zip(axes[1:].flat, maps):
        ax.imshow(overlay(base, attention))
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{second.prompt}  ->  {target_prompt}", fontsize=10)
    return fig


# What write_attention_views may write: the words' maps, DPL's clusters and mask, its log, a comparison.
ATTENTION_VIEWS = ("attention_words.png", "attention_background.png", "dpl_log.png", "attention_comparison.png")


def write_attention_views(
    folder: str | os.PathLike, compare: str | os.PathLike | None = None, out: str | os.PathLike | None = None
) -> list[Path]:
    """Write the PNG views of the inversion in ``folder`` (and its comparison with ``compare``)."""
    inversion = Inversion.load(folder)
    out = checks.output_folder("The attention views' folder", out or folder)
    out.mkdir(parents=True, exist_ok=True)
    words, background, log, comparison = ATTENTION_VIEWS
    figures = {words: word_attention_grid(inversion)}
    if inversion.clusters is not None:
        figures[background] = background_view(inversion)
    if inversion.dpl_log:
        figures[log] = dpl_log_view(inversion)
    if compare is not None:
        other = Inversion.load(compare)
        pair = (other, inversion) if inversion.method == "dpl" else (inversion, other)
        figures[comparison] = comparison_grid(*pair)
    for name, fig in figures.items():
        save_figure(fig, out / name)
    return [out / name for name in figures]


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write a figure as PNG."""
    fig.savefig(path, dpi=100)


def _subplots(rows: int, columns: int, figsize: tuple[float, float], squeeze: bool = True) -> tuple[Figure, np.ndarray]:
    """A figure and its axes, made without pyplot: no global figure list or backend to switch (a
    notebook importing this keeps its own), and safe in the web page's worker threads. Matplotlib
    loads here, with the first figure (`dpl --help` without it). Laid out by matplotlib's constrained
    layout, which keeps a lower row's titles (a wrapped target prompt) off the images above them,
    where ``tight_layout`` let them overlap."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=squeeze)


def _source(inversion: Inversion) -> np.ndarray:
    if inversion.source_image is None:
        raise DplEditError("The inversion folder has no source.png; invert the image again.")
    return np.asarray(inversion.source_image, dtype=np.float64) / 255.0


def _finish(fig: Figure, axes: np.ndarray, title: str) -> None:
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)


def edit_grid(result, source_image) -> Figure:
    """Rows: targets; columns: source, reconstruction, edit, then the edited words' maps (target branch)."""
    image = np.asarray(source_image, dtype=np.float64) / 255.0
    plan = result.plan
    rows = []
    for j, target in enumerate(plan.targets):
        changed = [p for p in range(1, target.end_position)
                   if plan.mapper[j, p] < 0 or target.token_ids[p] != plan.source.token_ids[plan.mapper[j, p]]]
        rows.append(changed)
    columns = 3 + max(len(r) for r in rows)  # a target that changes no word (the source again) has no maps
    fig, axes = _subplots(len(rows), columns, figsize=(2.2 * columns, 2.4 * len(rows)), squeeze=False)
    for j, (target, changed) in enumerate(zip(plan.targets, rows)):
        axes[j, 0].imshow(image)
        axes[j, 1].imshow(np.asarray(result.reconstruction))
        axes[j, 2].imshow(np.asarray(result.edits[j]))
        axes[j, 2].set_title(_wrap(target.text), fontsize=8)
        for k, position in enumerate(changed):
            axes[j, 3 + k].imshow(overlay(np.asarray(result.edits[j], dtype=np.float64) / 255.0,
                                          result.maps[1 + j, ..., position].cpu()))
            axes[j, 3 + k].set_title(result.target_tokens[j][position].replace("</w>", ""), fontsize=9)
    axes[0, 0].set_title("source", fontsize=9)
    axes[0, 1].set_title("reconstruction", fontsize=9)
    _finish(fig, axes, f"edits of: {plan.source.text}")
    for j, changed in enumerate(rows):
        for ax in axes[j, 3 + len(changed) :]:  # a row with fewer edited words than the widest: blank
            ax.axis("off")
    return fig


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
