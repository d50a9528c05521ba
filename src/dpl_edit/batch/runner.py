"""`dpl batch`: every method on every item of a PIE-Bench folder, resumable, on one or many processes.

Each source image is inverted once per method (items that share an image and its prompts share the
inversion) and each item is edited towards its target prompt with the Prompt-to-Prompt
settings PIE-Bench used for P2P (``run_editing_p2p.py``: refine controller, cross-attention
replaced for 0.4 of the steps, self-attention for 0.6, local blend on the ``blended_word`` pair,
the target word re-weighted by 2, guidance 7.5, 50 DDIM steps). The edit goes to PIE-Bench's
output layout; beside it, ``records/<method>/<key>.json`` says how it went (settings, times, DPL's
steps at the cap, versions, or why it failed). Both are written under temporary names and renamed,
the record last, so a killed run loses at most the image in flight and a rerun skips what is done.
Under ``accelerate launch`` the items are split between the processes (accelerate's
``split_between_processes``); the workers of ``dpl batch --processes`` (:mod:`.processes`) take
the next unclaimed chunk of images in turn. Each process writes only its own items, so the files are
those of one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import checks
from ..artifacts import library_versions, write_atomic
from ..editing import EditConfig, edit, recommended_edit_config
from ..errors import DplEditError
from ..images import load_image
from ..inversion.dynamic_prompt import DynamicPromptConfig, capped_steps
from ..pipeline import invert, invert_many
from .piebench import IMAGES, EditItem, edit_path
from .processes import Worker

logger = logging.getLogger(__name__)

# dpl-edit's method -> the folder PIE-Bench's scripts use for it (its own names where it has one).
METHOD_FOLDERS = {
    "ddim": "ddim+p2p", "nti": "null-text-inversion+p2p", "npi": "negative-prompt-inversion+p2p",
    "direct": "directinversion+p2p", "dpl": "dpl+p2p",
    "dpl-negative": "dpl-negative-prompt-inversion+p2p", "dpl-direct": "dpl-directinversion+p2p",
}
# DPL's token steps ended by another null step than null-text inversion's (`dpl invert --method dpl --null ...`)
DPL_NULL_METHODS = {"dpl-negative": "negative", "dpl-direct": "direct"}
PIE_CROSS_STEPS, PIE_SELF_STEPS, PIE_REWEIGHT, PIE_GUIDANCE, PIE_STEPS = 0.4, 0.6, 2.0, 7.5, 50


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    process: int = 0
    processes: int = 1

    def line(self) -> str:
        who = f"process {self.process + 1} of {self.processes}: " if self.processes > 1 else ""
        return f"{who}{self.done} done, {self.skipped} skipped (already done), {self.failed} failed"


def pie_edit_config(item: EditItem, model_settings: dict, target_tokens: str | None = None) -> EditConfig:
    """PIE-Bench's P2P settings for an item (and ``target_tokens``, else the model's recommendation). As
    its ``run_editing_p2p.py``, the blend words are the first two words of ``blended_word`` and the
    second is re-weighted."""
    blend, reweight = (), {}
    if len(item.blended_word) >= 2:
        source_word, target_word = item.blended_word[:2]
        blend, reweight = (source_word, target_word), {target_word: PIE_REWEIGHT}
    config = EditConfig(mode="refine", cross_replace_steps=PIE_CROSS_STEPS, self_replace_steps=PIE_SELF_STEPS,
                        blend=blend, reweight=reweight, **({"target_tokens": target_tokens} if target_tokens else {}))
    return recommended_edit_config(config, model_settings, chosen=["target_tokens"] if target_tokens else [])


def record_path(out: str | Path, method: str, item: EditItem) -> Path:
    return Path(out) / "records" / method / f"{item.key}.json"


def run_settings(model, num_steps: int, guidance_scale: float) -> dict:
    """What makes one run's edits comparable, as each record keeps it: model, precision, weight
    variant, DDIM steps and guidance."""
    return {"model": model.model_id, "dtype": checks.dtype_name(model.dtype), "variant": model.variant,
            "steps": num_steps, "guidance": guidance_scale}


def check_same_run(out: str | Path, settings: dict, items: Sequence[EditItem] = ()) -> None:
    """A :class:`DplEditError` where ``out`` holds records (done or failed, of any method) of another run:
    another model, precision, weight variant, step count or guidance, which a resumed run, or a run of
    another method to be compared with them (``dpl metrics``), would mix with its own. Only the
    :func:`run_settings` in ``settings`` are judged (a parent of worker processes knows no model), and
    only where a record has them (one from before a setting was recorded is not judged on it). A
    record under the key of one of ``items`` must be that item's (its image and prompts): another
    dataset's, whose keys collide with this one's, would be skipped as done."""
    records = _records(out)
    for path, record in records.items():
        differ = [name for name in settings if name in record and name != "model" and record[name] != settings[name]]
        if "model" in settings and "model" in record and not _same_model(record["model"], settings["model"]):
            differ.insert(0, "model")
        if differ:
            theirs = ", ".join(f"{name} {record[name]}" for name in differ)
            ours = ", ".join(f"{name} {settings[name]}" for name in differ)
            raise DplEditError(f"{out} holds {path.parent.name} edits of another run ({theirs}; "
                               f"{path.relative_to(out)}) where this run has {ours}: give the same settings to go "
                               "on with that run, or another --out folder")
    methods = {path.parent.name for path in records}
    for item in items:
        ours = {"image_path": item.image_path, "source_prompt": item.source_prompt, "target_prompt": item.target_prompt}
        for path in sorted(record_path(out, method, item) for method in methods):
            record = records.get(path, {})
            differ = [name for name, value in ours.items() if name in record and record[name] != value]
            if differ:
                raise DplEditError(f"{out} holds an edit of another item under key {item.key} "
                                   f"({path.relative_to(out)}: {differ[0]} {record[differ[0]]!r}, where this "
                                   f"dataset's is {ours[differ[0]]!r}): give another --out folder for this dataset")


def _records(out: str | Path) -> dict[Path, dict]:
    """Every readable record of a batch folder, by path."""
    records = {path: _read_record(path) for path in sorted((Path(out) / "records").glob("*/*.json"))}
    return {path: record for path, record in records.items() if record is not None}


def recorded_dataset(out: str | Path) -> Path:
    """The dataset folder a batch run's records name (what ``dpl metrics`` scores against when no
    ``--dataset`` is given); refused where they name none (records of an older version, or none at
    all), several, or one that is no longer there."""
    named = sorted({record["dataset"] for record in _records(out).values() if isinstance(record.get("dataset"), str)})
    if not named:
        raise DplEditError(f"The records of {out} do not name the dataset they were run on: give it with --dataset")
    if len(named) > 1:
        raise DplEditError(f"The records of {out} name {len(named)} datasets ({', '.join(named)}): "
                           "give the one to score against with --dataset")
    if not Path(named[0]).is_dir():
        raise DplEditError(f"{out} was run on {named[0]}, which is no longer there: give its folder with --dataset")
    return Path(named[0])


def _read_record(path: Path) -> dict | None:
    """A record, or None where it cannot be read or is no JSON object (its item is redone as not done)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _same_model(a: str, b: str) -> bool:
    """One model id: equal, or two paths to one folder."""
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def is_done(out: str | Path, method: str, item: EditItem) -> bool:
    path = record_path(out, method, item)
    if not path.is_file() or not edit_path(out, METHOD_FOLDERS[method], item).is_file():
        return False
    return (_read_record(path) or {}).get("status") == "done"


def image_groups(dataset: str | Path, items: Sequence[EditItem]) -> list[list[EditItem]]:
    """The items grouped by source image (its bytes) and prompts, in first-seen order: one inversion per
    method serves every edit of a group (PIE-Bench has one edit per image; an exported scene has three)."""
    groups: dict[tuple, list[EditItem]] = {}
    for item in items:
        try:
            digest = hashlib.sha256((Path(dataset) / IMAGES / item.image_path).read_bytes()).hexdigest()
        except OSError:
            digest = f"unreadable {item.key}"  # fails on its own, with its reason
        groups.setdefault((digest, item.source_prompt, item.marked_prompt()), []).append(item)
    return list(groups.values())


def run_batch(model, dataset: str | Path, items: Sequence[EditItem], methods: Sequence[str], out: str | Path,
              num_steps: int = PIE_STEPS, guidance_scale: float = PIE_GUIDANCE, split: bool = True,
              progress: bool = True, on_inversion: Callable | None = None, target_tokens: str | None = None,
              dpl: DynamicPromptConfig | None = None, batch_size: int = 1,
              worker: Worker | None = None) -> BatchSummary:
    """Invert each of this process's source images once per method and edit all its items; returns the
    counts. ``batch_size`` images are inverted at once, in lockstep (:func:`invert_many`: the same
    inversions, with batched UNet calls). ``on_inversion(method, items, image, inversion)``, if given,
    sees each fresh inversion; ``target_tokens`` and ``dpl`` replace the model's recommended settings.
    A ``worker`` of ``dpl batch --processes`` does the chunks of ``batch_size`` images it claims."""
    unknown = set(methods) - set(METHOD_FOLDERS)
    if unknown:
        raise DplEditError(f"Unknown methods {sorted(unknown)}; choose from {', '.join(METHOD_FOLDERS)}")
    checks.count("batch_size", batch_size)
    check_same_run(out, run_settings(model, num_steps, guidance_scale), items)
    groups = image_groups(dataset, items)
    if worker is None:
        mine, summary = _share(groups, split, cpu=model.device.type == "cpu")
    else:
        mine, summary = groups, BatchSummary(process=worker.index, processes=worker.count)
    bar = tqdm(total=sum(len(group) for group in mine), desc="Items", unit="item", disable=not progress)
    for first in range(0, len(mine), batch_size):
        if worker is not None and not worker.claim(first // batch_size):
            continue
        chunk = mine[first : first + batch_size]
        for method in methods:
            todo = [[item for item in group if not is_done(out, method, item)] for group in chunk]
            summary.skipped += sum(len(group) - len(left) for group, left in zip(chunk, todo, strict=True))
            for record in _run_groups(model, Path(dataset), [left for left in todo if left], method, Path(out),
                                      num_steps, guidance_scale, on_inversion, target_tokens, dpl):
                summary.done += record["status"] == "done"
                summary.failed += record["status"] == "failed"
            bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=summary.failed)
        bar.update(sum(len(group) for group in chunk))
    bar.close()
    if worker is not None:
        worker.report({"done": summary.done, "skipped": summary.skipped, "failed": summary.failed})
    return summary


def _run_groups(model, dataset: Path, groups: list[list[EditItem]], method: str, out: Path, num_steps: int,
                guidance: float, on_inversion: Callable | None, target_tokens: str | None,
                dpl: DynamicPromptConfig | None) -> list[dict]:
    """One inversion of each group's image (all of them in lockstep), then each item's edit; a record per
    item. An image that does not load fails its own items; if the lockstep inversion fails, each image is
    inverted alone, so that a bad one fails only its own items."""
    base = {"method": method, "dataset": str(dataset.resolve()), **run_settings(model, num_steps, guidance),
            "versions": library_versions()}
    records = [[{"key": item.key, "image_path": item.image_path, "editing_type_id": item.editing_type_id,
                 "source_prompt": item.source_prompt, "target_prompt": item.target_prompt, **base} for item in group]
               for group in groups]
    prompts = [group[0].marked_prompt() for group in groups]  # braces only name words (for maps); DPL learns them
    images: list[Image.Image | None] = []
    for group, group_records in zip(groups, records, strict=True):
        try:
            images.append(load_image(dataset / IMAGES / group[0].image_path, model.image_size, fit="crop"))
        except (DplEditError, OSError, ValueError) as err:  # a bad image is recorded and the run goes on
            images.append(None)
            _fail(out, method, group, group_records, err)
    loaded = [k for k, image in enumerate(images) if image is not None]
    inversions, seconds = _invert(model, [images[k] for k in loaded], [prompts[k] for k in loaded], method,
                                  num_steps, guidance, dpl)
    for k, inversion, inversion_s in zip(loaded, inversions, seconds, strict=True):
        group, group_records = groups[k], records[k]
        if isinstance(inversion, Exception):
            _fail(out, method, group, group_records, inversion)
            continue
        if on_inversion is not None:
            on_inversion(method, group, images[k], inversion)
        shared = {"marked_prompt": prompts[k], "inversion_s": inversion_s, "inversion_shared_by": len(group)}
        if "batch" in inversion.settings:
            shared["inverted_with"] = inversion.settings["batch"]  # images inverted in lockstep
        if inversion.dpl_log:
            shared["dpl_steps_at_cap"] = capped_steps(inversion.dpl_log, inversion.settings["dpl"]["max_iterations"])
        for item, record in zip(group, group_records, strict=True):
            started = time.perf_counter()
            try:
                config = pie_edit_config(item, model.settings, target_tokens)
                result = edit(model, inversion, [item.target_prompt], config, progress=False)
                target = edit_path(out, METHOD_FOLDERS[method], item)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
                result.edits[0].save(tmp, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))
                tmp.replace(target)
                record.update(status="done", settings=asdict(config), **shared,
                              edit_s=round(time.perf_counter() - started, 3))
            except (DplEditError, OSError, ValueError) as err:
                record.update(status="failed", reason=f"{type(err).__name__}: {err}")
            _write_record(out, method, item, record)
    return [record for group_records in records for record in group_records]


def _invert(model, images: list[Image.Image], prompts: list[str], method: str, num_steps: int, guidance: float,
            dpl: DynamicPromptConfig | None) -> tuple[list, list[float]]:
    """Each image's inversion (or the error that stopped it) and its seconds (a lockstep batch's time is
    shared out evenly between its images)."""
    how = {"method": "dpl", "null": DPL_NULL_METHODS[method]} if method in DPL_NULL_METHODS else {"method": method}
    if len(images) > 1:
        started = time.perf_counter()
        try:
            inversions = invert_many(model, images, prompts, **how, num_steps=num_steps,
                                     guidance_scale=guidance, dpl=dpl, progress=False)
            share = round((time.perf_counter() - started) / len(images), 3)
            return inversions, [share] * len(images)
        except (DplEditError, OSError, ValueError):
            pass  # one image or prompt the batch cannot take: each alone, each with its own outcome
        except torch.OutOfMemoryError:
            logger.warning("A lockstep batch of %d images did not fit in the device's memory; they are inverted "
                           "one at a time (a smaller --batch-size avoids the retry).", len(images))
        if model.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed batch held (its traceback is gone by now)
    inversions, seconds = [], []
    for image, prompt in zip(images, prompts, strict=True):
        started = time.perf_counter()
        try:
            inversions.append(invert(model, image, prompt, **how, num_steps=num_steps,
                                     guidance_scale=guidance, dpl=dpl, progress=False))
        except (DplEditError, OSError, ValueError) as err:
            inversions.append(err)
        seconds.append(round(time.perf_counter() - started, 3))
    return inversions, seconds


def _fail(out: Path, method: str, items: list[EditItem], records: list[dict], err: Exception) -> None:
    for item, record in zip(items, records, strict=True):
        record.update(status="failed", reason=f"{type(err).__name__}: {err}")
        _write_record(out, method, item, record)


def _write_record(out: Path, method: str, item: EditItem, record: dict) -> None:
    path = record_path(out, method, item)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1))


def _share(items: list, split: bool, cpu: bool) -> tuple[list, BatchSummary]:
    """This process's share of ``items`` (here: image groups) under `accelerate launch` or torchrun (all of them otherwise); ``cpu``:
    CPU processes (gloo), which accelerate only sees when asked."""
    if not split:
        return items, BatchSummary()
    try:
        from accelerate import PartialState
    except ImportError:
        return items, BatchSummary()
    state = PartialState(cpu=cpu)
    if state.num_processes == 1:
        return items, BatchSummary()
    with state.split_between_processes(items) as mine:
        return list(mine), BatchSummary(process=state.process_index, processes=state.num_processes)

