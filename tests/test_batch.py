"""PIE-Bench's layout, `dpl batch` (resume, failures, two accelerate or worker processes) and `dpl metrics`, on a
PIE-format mini dataset made here (rendered scenes, 2 DDIM steps, the bundled model)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpl_edit.batch.metrics import (
    StructureDistance,
    at_source_size,
    published_means,
    region_psnr,
    tables,
    unedited_part,
)
from dpl_edit.batch.piebench import decode_mask, edit_path, encode_mask, read_dataset
from dpl_edit.batch.processes import Worker, run_workers, threads_per_process
from dpl_edit.batch.runner import (
    METHOD_FOLDERS,
    PIE_GUIDANCE,
    check_same_run,
    pie_edit_config,
    record_path,
    run_batch,
    run_settings,
)
from dpl_edit.cli import build_parser, main
from dpl_edit.cli.batch import worker_argv
from dpl_edit.errors import DplEditError
from dpl_edit.published import PIE_BENCH_P2P
from dpl_edit.registry import load_model
from dpl_edit.scenes.export import export_scenes

STEPS = 2


def pie_decode(encoded, shape=(512, 512)):
    """PIE-Bench's mask_decode (run_editing_p2p.py / evaluate.py), written out from its description."""
    length = shape[0] * shape[1]
    flat = np.zeros((length,))
    for i in range(0, len(encoded), 2):
        for j in range(min(encoded[i + 1], length - encoded[i])):
            flat[encoded[i] + j] = 1
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def test_masks_decode_as_pie_bench_and_round_trip():
    rng = np.random.default_rng(0)
    mask = np.zeros((512, 512), dtype=bool)
    for _ in range(6):  # blobs and stripes, some touching the border
        y, x, h, w = rng.integers(0, 512, 4)
        mask[y : y + h // 3, x : x + w // 3] = True
    mask |= rng.random((512, 512)) < 0.01
    rle = encode_mask(mask)
    assert np.array_equal(decode_mask(rle), pie_decode(rle).astype(bool))
    inner = (slice(1, -1), slice(1, -1))
    assert np.array_equal(decode_mask(rle)[inner], mask[inner])
    assert decode_mask([10, 5, 262140, 100])[511, 511] and decode_mask([]).sum() == 4 * 511  # runs clipped; border
    with pytest.raises(DplEditError, match="pairs"):
        decode_mask([1, 2, 3])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pie")
    assert export_scenes(folder, "test", (2,), 2) == 6
    return folder


def test_scene_export_is_a_pie_bench_folder(dataset):
    items = read_dataset(dataset)
    assert [i.editing_type_id for i in items] == ["1", "6", "8"] * 2
    shape = items[0]
    assert shape.original_prompt.count("[") == 1 and "[" in shape.editing_prompt
    assert shape.marked_prompt() == shape.dpl_prompt and "{" in shape.marked_prompt()
    assert len(shape.blended_word) == 2 and shape.blended_word[0] in shape.source_prompt
    with Image.open(dataset / "annotation_images" / shape.image_path) as image:
        mask = decode_mask(shape.mask_rle, image.size[::-1])
    assert 0 < mask[1:-1, 1:-1].mean() < 0.5  # an object before and after its swap
    distractor = decode_mask(shape.distractor_rle, mask.shape, border=False)
    assert distractor.any() and not (distractor & mask).any() and not items[2].distractor_rle  # ground: none
    assert read_dataset(dataset, types={"8"}, start=0, stop=3)[0].editing_type_id == "8"
    config = pie_edit_config(shape, {})
    assert (config.mode, config.cross_replace_steps, config.self_replace_steps) == ("refine", 0.4, 0.6)
    assert config.reweight == {shape.blended_word[1]: 2.0} and config.blend == shape.blended_word
    # as PIE-Bench's run_editing_p2p.py: the first two words, whatever follows
    longer = dataclasses.replace(shape, blended_word=("teddy", "bear", "dog"))
    assert pie_edit_config(longer, {}).blend == ("teddy", "bear") and pie_edit_config(longer, {}).reweight == {"bear": 2.0}


def test_scenes_are_exported_over_an_earlier_export_only(tmp_path, capsys):
    """A PIE-Bench folder's own mapping_file.json is never replaced by an export (nor its images mixed
    with scenes); an earlier export is."""
    assert export_scenes(tmp_path / "scenes", "test", (2,), 1) == 3
    assert export_scenes(tmp_path / "scenes", "test", (3,), 1) == 3  # replaced
    assert main(["scenes", "export", str(tmp_path / "scenes"), "--objects", "3", "--count", "1"]) == 0
    assert capsys.readouterr().out == f"Wrote 3 edits of 1 test scene to {tmp_path / 'scenes'}\n"
    assert {item.image_path.split("/")[1] for item in read_dataset(tmp_path / "scenes")} == {"test_3obj_0000.png"}
    pie = tmp_path / "pie"
    pie.mkdir()
    mapping = json.dumps({"000000000001": {"image_path": "0_random_140/000000000001.jpg", "original_prompt": "a [cat]",
                                           "editing_prompt": "a [dog]", "editing_type_id": "0", "mask": []}})
    for text in (mapping, "not json"):
        (pie / "mapping_file.json").write_text(text)
        with pytest.raises(DplEditError, match="holds a dataset that `dpl scenes export` did not write"):
            export_scenes(pie, "test", (2,), 1)
        assert main(["scenes", "export", str(pie), "--count", "1"]) == 2
        assert "did not write" in capsys.readouterr().err
        assert (pie / "mapping_file.json").read_text() == text and not (pie / "annotation_images").exists()


def test_a_method_named_twice_runs_once():
    from dpl_edit.cli.batch import methods_of

    args = build_parser("batch").parse_args(["batch", "data", "--out", "out", "--methods", "nti, dpl,nti"])
    assert methods_of(args) == ["nti", "dpl"]


def test_brackets_become_dpl_words_without_a_dpl_prompt(tmp_path):
    (tmp_path / "mapping_file.json").write_text(json.dumps({"7": {
        "image_path": "a.jpg", "original_prompt": "a [cat] sitting on a [mat]", "editing_prompt": "a [dog] sitting",
        "editing_type_id": "1", "blended_word": "cat dog", "mask": []}}))
    assert read_dataset(tmp_path)[0].marked_prompt() == "a {cat} sitting on a {mat}"
    (tmp_path / "mapping_file.json").write_text(json.dumps({"8": {
        "image_path": "a.jpg", "original_prompt": "a [] cat on a [ mat ]", "editing_prompt": "a [red] cat on a mat",
        "editing_type_id": "2", "blended_word": "", "mask": []}}))
    item = read_dataset(tmp_path)[0]
    assert item.marked_prompt() == "a  cat on a { mat }" and item.source_prompt == "a  cat on a  mat "
    (tmp_path / "mapping_file.json").write_text(json.dumps({"7": {"image_path": "a.jpg"}}))
    with pytest.raises(DplEditError, match="lacks a field"):
        read_dataset(tmp_path)
    for mapping, message in (([1], "holds no JSON object of items by key \\(found list\\)"),
                             ({"7": 3}, "Entry '7' of .* is no JSON object of PIE-Bench's fields \\(found int\\)")):
        (tmp_path / "mapping_file.json").write_text(json.dumps(mapping))
        with pytest.raises(DplEditError, match=message):
            read_dataset(tmp_path)
    with pytest.raises(DplEditError, match="No mapping_file.json"):
        read_dataset(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def model():
    return load_model("scenes")


def test_batch_writes_pie_layout_resumes_and_records_failures(dataset, model, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(dataset, broken)
    items = read_dataset(broken)
    (broken / "annotation_images" / items[4].image_path).write_bytes(b"not an image")
    out = tmp_path / "out"
    seen = []
    summary = run_batch(model, broken, items, ["nti", "dpl"], out, num_steps=STEPS, progress=False,
                        on_inversion=lambda method, group, image, inversion: seen.append((method, len(group))))
    assert (summary.done, summary.skipped, summary.failed) == (10, 0, 2)
    assert seen == [("nti", 3), ("dpl", 3), ("nti", 2), ("dpl", 2)]  # one inversion per scene and method
    for item in items:
        for method in ("nti", "dpl"):
            record = json.loads(record_path(out, method, item).read_text())
            assert record["status"] == ("failed" if item is items[4] else "done"), record
            assert (record["model"], record["dtype"], record["variant"]) == ("scenes", "float32", None)
            if item is not items[4]:
                assert edit_path(out, METHOD_FOLDERS[method], item).is_file()
    failed = json.loads(record_path(out, "nti", items[4]).read_text())
    assert "Could not read" in failed["reason"]
    done = json.loads(record_path(out, "dpl", items[0]).read_text())
    assert done["dpl_steps_at_cap"] >= 0 and done["settings"]["mode"] == "refine" and done["versions"]["torch"]
    assert done["inversion_shared_by"] == 3 and done["inversion_s"] > 0 and done["edit_s"] > 0

    record_path(out, "dpl", items[1]).unlink()  # killed after writing the image, before its record
    record_path(out, "dpl", items[2]).write_text("[]")  # a record that is no JSON object: redone, not a crash
    again = run_batch(model, broken, items, ["nti", "dpl"], out, num_steps=STEPS, progress=False)
    assert (again.done, again.skipped, again.failed) == (2, 8, 2)

    # a resumed run with other settings, of any method, would mix two runs in one folder: refused before any work
    with pytest.raises(DplEditError, match=rf"holds dpl edits of another run \(steps {STEPS}; records.dpl.*"
                                           rf"where this run has steps {STEPS + 1}: give the same settings"):
        run_batch(model, broken, items, ["npi"], out, num_steps=STEPS + 1, progress=False)
    assert main(["batch", str(broken), "--out", str(out), "--steps", str(STEPS + 1), "--processes", "2"]) == 2
    assert f"where this run has steps {STEPS + 1}" in capsys.readouterr().err  # said before any worker starts
    ours = run_settings(model, STEPS, PIE_GUIDANCE)
    check_same_run(out, ours)
    for other, said in (({"dtype": "bfloat16"}, "dtype float32"), ({"variant": "fp16"}, "variant None"),
                        ({"model": "tiny:0"}, "model scenes"), ({"guidance": 5.0}, "guidance 7.5")):
        with pytest.raises(DplEditError, match=f"another run \\({said};"):
            check_same_run(out, {**ours, **other})
    for path in (out / "records").rglob("*.json"):  # records of before the precision was recorded
        record = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("dtype", "variant")}))
    check_same_run(out, {**ours, "dtype": "bfloat16", "variant": "fp16"})
    (tmp_path / "sd" / "unet").mkdir(parents=True)  # one model folder named two ways is one model
    (tmp_path / "sd-run" / "records" / "nti").mkdir(parents=True)
    (tmp_path / "sd-run" / "records" / "nti" / "x.json").write_text(json.dumps({**ours, "model": str(tmp_path / "sd")}))
    check_same_run(tmp_path / "sd-run", {**ours, "model": str(tmp_path / "sd" / "unet" / "..")})
    check_same_run(out, ours, items)
    other = dataclasses.replace(items[0], editing_prompt="another [target]")  # another dataset, the same key
    with pytest.raises(DplEditError, match=f"another item under key {items[0].key} .*target_prompt 'a "):
        check_same_run(out, ours, [other])


def test_dpl_with_a_negative_or_direct_null_step_is_a_batch_method_of_its_own(model, tmp_path, capsys):
    """``dpl-negative`` and ``dpl-direct``: DPL's token steps ended by negative-prompt or direct inversion
    (``invert(method="dpl", null=...)``), each in its own PIE-Bench folder, scored by ``dpl metrics``."""
    data = tmp_path / "data"
    export_scenes(data, "test", (2,), 1)
    items = [item for item in read_dataset(data) if item.editing_type_id == "1"]
    out = tmp_path / "out"
    seen = {}
    summary = run_batch(model, data, items, ["dpl-negative", "dpl-direct"], out, num_steps=STEPS, progress=False,
                        on_inversion=lambda method, group, image, inversion: seen.update({method: inversion}))
    assert (summary.done, summary.failed) == (2, 0)
    assert {m: (inv.method, inv.null, len(inv.dpl_log)) for m, inv in seen.items()} == {
        "dpl-negative": ("dpl", "negative", STEPS), "dpl-direct": ("dpl", "direct", STEPS)}
    for method in ("dpl-negative", "dpl-direct"):
        assert edit_path(out, METHOD_FOLDERS[method], items[0]).is_file()
        assert json.loads(record_path(out, method, items[0]).read_text())["dpl_steps_at_cap"] >= 0
    assert main(["metrics", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| dpl-negative |" in table and "| dpl-direct |" in table


def test_lockstep_batches_write_what_one_image_at_a_time_does(model, one_at_a_time, tmp_path):
    """``batch_size=3``: the images of a chunk are inverted together (an unreadable one fails alone);
    with the UNet called per image the edits are those of ``batch_size=1`` to the byte."""
    data = tmp_path / "data"
    export_scenes(data, "test", (2,), 3)
    items = [item for item in read_dataset(data) if item.editing_type_id == "1"]  # one edit per scene
    (data / "annotation_images" / items[1].image_path).write_bytes(b"not an image")
    one = run_batch(model, data, items, ["nti"], tmp_path / "one", num_steps=STEPS, progress=False)
    sizes = list(one_at_a_time)
    three = run_batch(model, data, items, ["nti"], tmp_path / "three", num_steps=STEPS, progress=False,
                      batch_size=3)
    assert (one.done, one.failed) == (three.done, three.failed) == (2, 1)
    assert max(sizes) == 1 and 2 in one_at_a_time[len(sizes):]  # the two readable images, in lockstep
    for item in (items[0], items[2]):
        a, b = (edit_path(tmp_path / out, METHOD_FOLDERS["nti"], item).read_bytes() for out in ("one", "three"))
        assert a == b
        record = json.loads(record_path(tmp_path / "three", "nti", item).read_text())
        assert record["inverted_with"] == 2 and record["inversion_s"] > 0
    assert "Could not read" in json.loads(record_path(tmp_path / "three", "nti", items[1]).read_text())["reason"]


def test_a_batch_the_lockstep_inversion_cannot_take_inverts_each_image_alone(dataset, model, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise DplEditError("a prompt this batch cannot take")

    monkeypatch.setattr("dpl_edit.batch.runner.invert_many", refuse)
    items = read_dataset(dataset)
    summary = run_batch(model, dataset, items, ["ddim"], tmp_path, num_steps=STEPS, progress=False, batch_size=2)
    assert (summary.done, summary.failed) == (6, 0)
    assert "inverted_with" not in json.loads(record_path(tmp_path, "ddim", items[0]).read_text())


def test_an_inversion_or_edit_that_fails_fails_its_own_items_only(dataset, model, tmp_path, monkeypatch):
    """The lockstep batch refused, one image's own inversion fails (its 3 items) and one item's edit
    fails: each is recorded with its reason, and the other image's other items are done."""
    from dpl_edit.batch import runner

    items = read_dataset(dataset)  # 2 images, 3 edits each
    bad_prompt, bad_target = items[0].marked_prompt(), items[4].target_prompt
    invert, edit = runner.invert, runner.edit

    def refuse(*args, **kwargs):
        raise DplEditError("a prompt this batch cannot take")

    def failing_invert(model, image, prompt, **kwargs):
        if prompt == bad_prompt:
            raise ValueError("this image's inversion failed")
        return invert(model, image, prompt, **kwargs)

    def failing_edit(model, inversion, targets, config, **kwargs):
        if targets == [bad_target]:
            raise DplEditError("this edit failed")
        return edit(model, inversion, targets, config, **kwargs)

    monkeypatch.setattr(runner, "invert_many", refuse)
    monkeypatch.setattr(runner, "invert", failing_invert)
    monkeypatch.setattr(runner, "edit", failing_edit)
    summary = run_batch(model, dataset, items, ["ddim"], tmp_path, num_steps=STEPS, progress=False, batch_size=2)
    assert (summary.done, summary.failed) == (2, 4)
    reasons = {item.key: json.loads(record_path(tmp_path, "ddim", item).read_text()).get("reason") for item in items}
    assert [reasons[item.key] for item in items] == [
        "ValueError: this image's inversion failed"] * 3 + [None, "DplEditError: this edit failed", None]
    edits = [edit_path(tmp_path, METHOD_FOLDERS["ddim"], item).is_file() for item in items]
    assert edits == [False, False, False, True, False, True]


def test_a_batch_that_does_not_fit_in_memory_inverts_each_image_alone(dataset, model, tmp_path, monkeypatch, caplog):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("dpl_edit.batch.runner.invert_many", out_of_memory)
    items = read_dataset(dataset)
    with caplog.at_level(logging.WARNING, logger="dpl_edit.batch.runner"):
        summary = run_batch(model, dataset, items, ["ddim"], tmp_path, num_steps=STEPS, progress=False, batch_size=2)
    assert (summary.done, summary.failed) == (6, 0)
    assert "did not fit in the device's memory" in caplog.text and "--batch-size" in caplog.text


@pytest.mark.slow  # worker processes and accelerate's launcher, each importing torch: a minute on one thread
def test_accelerate_and_worker_processes_write_what_one_process_does(dataset, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["batch", str(dataset), "--model", "scenes", "--methods", "nti", "--steps", str(STEPS),
              "--device", "cpu", "--quiet", "--range", "0:4"]

    def run(*prefix, out, extra=()):
        done = subprocess.run([sys.executable, *prefix, "-m", "dpl_edit.cli", *common, "--out", str(tmp_path / out),
                               *extra], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run(out="one")
    two = run("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", out="two")
    assert "process 1 of 2" in two and "process 2 of 2" in two
    workers = run(out="workers", extra=("--processes", "2"))
    assert "2 processes: 4 done, 0 skipped (already done), 0 failed" in workers
    assert not list((tmp_path / "workers").glob(".claims-*"))  # the claims folder goes with the run
    again = run(out="workers", extra=("--processes", "2"))
    assert "2 processes: 0 done, 4 skipped (already done), 0 failed" in again
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    assert len(files) == 4
    for other in ("two", "workers"):
        assert files == sorted(p.relative_to(tmp_path / other) for p in (tmp_path / other).rglob("*.png"))
        for name in files:
            a = np.asarray(Image.open(tmp_path / "one" / name), dtype=np.int16)
            b = np.asarray(Image.open(tmp_path / other / name), dtype=np.int16)
            assert np.abs(a - b).max() <= 1, (other, name)  # the same computation; at most a rounding apart


def test_workers_claim_each_chunk_once(tmp_path):
    workers = [Worker(index, 3, tmp_path) for index in range(3)]
    taken = [[chunk for chunk in range(10) if worker.claim(chunk)] for worker in workers]
    assert taken == [list(range(10)), [], []]
    assert not Worker(1, 3, tmp_path).claim(4) and Worker(1, 3, tmp_path).claim(10)
    assert threads_per_process(1) >= threads_per_process(2) >= threads_per_process(10_000) == 1


def test_a_worker_gets_the_same_batch_as_its_parent(tmp_path):
    argv = ["batch", "DATA", "--out", "OUT", "--methods", "dpl", "--types", "1,6", "--range", "3:9", "--steps", "7",
            "--batch-size", "2", "--processes", "3", "--target-tokens", "keep", "--model", "scenes", "--device", "cpu",
            "--dtype", "bfloat16", "--variant", "fp16", "--compile", "--no-cuda-graphs", "--seed", "5"]
    args = build_parser("batch").parse_args(argv)
    batch = next(a for a in build_parser("batch")._actions if isinstance(a, argparse._SubParsersAction)).choices["batch"]
    options = {a.dest for a in batch._actions if a.option_strings} - {"help", "quiet", "worker", "claims"}
    assert {k for k in options if getattr(args, k) != batch.get_default(k)} == options  # every option is given
    worker = build_parser("batch").parse_args(worker_argv(args, Worker(1, 3, tmp_path)))
    assert (worker.worker, worker.claims, worker.quiet) == ("1/3", tmp_path, True)
    skip = {"processes", "worker", "claims", "quiet"}
    assert {k: v for k, v in vars(worker).items() if k not in skip} == {k: v for k, v in vars(args).items() if k not in skip}


@pytest.mark.parametrize("stop, sigint", [
    (signal.SIGINT, signal.default_int_handler),
    pytest.param(signal.SIGTERM, signal.SIG_IGN, marks=pytest.mark.slow),  # (the same workers stopped again)
], ids=["ctrl-c", "kill of a background job"])
def test_an_interrupted_parent_stops_its_workers(dataset, tmp_path, stop, sigint):
    """The interrupt reaches the parent alone (not a terminal's Ctrl-C, which reaches them all): it passes
    it on as a SIGTERM, which a worker takes as a Ctrl-C even where SIGINT is ignored, as in a shell script's
    background job (whose children inherit that; there only a SIGTERM reaches the parent), and waits for
    them. The parent's SIGINT is set here, not inherited from whatever started the tests."""
    previous = signal.signal(signal.SIGINT, sigint)  # a handler becomes the default in the child, SIG_IGN stays
    try:
        parent = subprocess.Popen(
            [sys.executable, "-m", "dpl_edit.cli", "batch", str(dataset), "--model", "scenes", "--methods", "dpl",
             "--steps", "50", "--device", "cpu", "--quiet", "--out", str(tmp_path), "--processes", "2"],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".claims-*/chunk-*")) and time.monotonic() < deadline:  # the workers have begun
        time.sleep(0.2)
    parent.send_signal(stop)
    started = time.monotonic()
    try:
        _, err = parent.communicate(timeout=120)  # by design it ends within about 65 s (the workers killed at 60)
    except subprocess.TimeoutExpired:  # leave what explains a hang
        states = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,wchan:24,args", "-p", str(parent.pid), "--ppid",
                                 str(parent.pid)], check=False, capture_output=True, text=True).stdout
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)], check=False)
        parent.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's Python stack to its stderr
        _, err = parent.communicate(timeout=30)
        pytest.fail(f"the interrupted parent had not ended after 120 s\n{states}\nits stderr:\n{err}")
    assert parent.returncode == 130, err
    assert err.count("interrupted") == 1 and not list(tmp_path.glob(".claims-*"))
    assert time.monotonic() - started < 30  # the workers stopped when told, not killed at 60 s


def test_worker_processes_are_refused_under_accelerate(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["batch", str(dataset), "--out", str(tmp_path), "--processes", "2", "--model", "scenes"]) == 2
    assert "accelerate launch" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_failed_workers_say_so_once(tmp_path, capsys):
    # both workers fail alike (no such dataset): one copy of their error, then what failed
    with pytest.raises(DplEditError, match=r"worker processes 1, 2 of 2 stopped early.*0 items done"):
        run_workers(lambda worker: ["batch", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quiet",
                                    "--worker", f"{worker.index}/2", "--claims", str(worker.claims)],
                    2, tmp_path / "out", left=lambda: 1, total=1, progress=False)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing" in errors[0]
    assert not list((tmp_path / "out").glob(".claims-*"))


def test_unedited_part_metrics_mask_as_pie_bench():
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pixels = np.asarray(a).copy()
    pixels[20:40, 20:40] = 0  # changed inside the mask only
    b = Image.fromarray(pixels)
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:44, 16:44] = True
    scores = unedited_part(a, b, mask)
    assert math.isinf(scores["psnr_unedit_part"]) and scores["mse_unedit_part"] == 0
    assert scores["ssim_unedit_part"] == pytest.approx(1.0)
    mask[:] = False
    scores = unedited_part(a, b, mask)
    x, y = np.asarray(a, dtype=np.float32) / 255, pixels.astype(np.float32) / 255
    mse = float(np.mean((x - y) ** 2))
    assert scores["mse_unedit_part"] == pytest.approx(mse, rel=1e-5)
    assert scores["psnr_unedit_part"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert region_psnr(b, b, mask | True) == pytest.approx(120.0)
    assert all(math.isnan(v) for v in unedited_part(a, b, np.ones((64, 64), dtype=bool)).values())


def test_an_edit_is_compared_with_its_source_at_the_source_s_size():
    """Our edits are at the model's size (SD 2.x: 768 against PIE-Bench's 512; the scene model: 64),
    PIE-Bench's own outputs a strip of panels with the edit last; anything else is refused."""
    rng = np.random.default_rng(0)
    source, edit = (Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2))
    assert at_source_size(edit, source) is edit
    strip = Image.new("RGB", (24, 8))
    strip.paste(source, (8, 0))
    strip.paste(edit, (16, 0))
    assert np.array_equal(np.asarray(at_source_size(strip, source)), np.asarray(edit))
    for side in (12, 4, 16):  # a model of another size than the dataset's images (16: a multiple, not a strip)
        larger = edit.resize((side, side), Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(at_source_size(larger, source)),
                              np.asarray(larger.resize((8, 8), Image.Resampling.LANCZOS)))
    with pytest.raises(DplEditError, match="10x8, its source image 8x8"):
        at_source_size(Image.new("RGB", (10, 8)), source, "10x8")


def test_a_square_edit_of_a_wide_source_is_compared_with_the_square_that_was_inverted():
    """dpl batch inverts a non-square image's centre square (fit="crop"): the metrics crop the source,
    its mask and its oracle the same way; a strip of the source's panels and a square source stay whole."""
    from dpl_edit.batch.metrics import cropped, inverted_square
    from dpl_edit.images import fit_square

    rng = np.random.default_rng(0)
    source, oracle = (Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)) for _ in range(2))
    mask = rng.random((8, 12)) > 0.5
    square = Image.new("RGB", (16, 16))
    box = inverted_square(square, source)
    cropped_source, region, truth = (cropped(box, picture) for picture in (source, mask, oracle))
    assert np.array_equal(np.asarray(cropped_source), np.asarray(fit_square(source, 8, "crop")))
    assert np.array_equal(np.asarray(truth), np.asarray(oracle)[:, 2:10]) and np.array_equal(region, mask[:, 2:10])
    assert np.array_equal(np.asarray(at_source_size(square, cropped_source)), np.zeros((8, 8, 3)))
    for edited, src in ((Image.new("RGB", (36, 8)), source), (square, source.crop((0, 0, 8, 8)))):
        box = inverted_square(edited, src)
        assert box is None and cropped(box, src) is src and cropped(box, mask) is mask and cropped(box, None) is None


def random_dino(folder):
    """A small random ViT with DINO ViT-B/8's patch size and input size, saved as transformers does."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def random_clip(folder):
    """A small random CLIP model and its processor (the real CLIP tokenizer), saved as transformers does."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dpl_edit.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(text_config={**tower, "vocab_size": 49408},
                        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    processor.save_pretrained(folder)
    return processor


def test_structure_distance_is_the_key_self_similarity_of_dino_s_last_layer(tmp_path):
    distance = StructureDistance(random_dino(tmp_path / "dino"))
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert distance(a, a) == 0 and distance(a, b) > 0
    pixels = torch.from_numpy(np.asarray(a, dtype=np.float32)).permute(2, 0, 1)[None]  # 0..255, as PIE-Bench
    pixels = torch.nn.functional.interpolate(pixels, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    vit = distance.model
    with torch.no_grad():
        hidden = vit((pixels - mean) / std, output_hidden_states=True).hidden_states[-2]
        last = vit.layers[-1]
        keys = last.attention.k_proj(last.layernorm_before(hidden))[0]
    cosine = torch.nn.functional.cosine_similarity(keys[:, None], keys[None], dim=-1)
    assert torch.allclose(distance.self_similarity(a), cosine, atol=1e-5)
    assert keys.shape[0] == 1 + (224 // 8) ** 2


def test_metrics_command_runs_without_weights_and_names_them(dataset, model, tmp_path, capsys):
    items = read_dataset(dataset)[:3]
    run_batch(model, dataset, items, ["nti"], tmp_path, num_steps=STEPS, progress=False)
    assert main(["metrics", str(tmp_path), "--dataset", str(dataset), "--methods", "nti", "--range", "0:3",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "psnr unedit part" in printed and "psnr edit part vs oracle" in printed and "--dino" in printed
    assert "psnr distractors" in printed
    means = json.loads((tmp_path / "metrics.json").read_text())["means"]
    assert means["all"]["nti"]["items"] == 3 and set(means) == {"all", "1", "6", "8"}
    assert main(["metrics", str(tmp_path), "--dataset", str(dataset), "--dino", str(tmp_path / "none")]) == 2
    assert "DINO ViT-B/8" in capsys.readouterr().err
    markdown, _ = tables({"rows": [{"key": "k", "method": "dpl", "editing_type_id": "1", "missing": True}],
                          "notes": []})
    assert "0 (+1 missing)" in markdown
    # a damaged edit image counts as missing and is named; a scene dataset with every edit missing is
    # still a scene table (no PIE-Bench published rows)
    (edit_path(tmp_path, METHOD_FOLDERS["nti"], items[0])).write_bytes(b"cut short")
    assert main(["metrics", str(tmp_path), "--dataset", str(dataset), "--methods", "nti", "--range", "0:3"]) == 0
    printed = capsys.readouterr().out
    assert "| all | nti | 2 (+1 missing) |" in printed and "1 edit image(s) could not be read" in printed
    assert "test_2obj_0000.png" in printed and "published" not in printed
    for item in items:
        edit_path(tmp_path, METHOD_FOLDERS["nti"], item).unlink()
    assert main(["metrics", str(tmp_path), "--dataset", str(dataset), "--methods", "nti", "--range", "0:3"]) == 0
    assert "| all | nti | 0 (+3 missing) |" in (printed := capsys.readouterr().out) and "published" not in printed


def test_metrics_finds_the_dataset_in_the_run_s_records(dataset, model, tmp_path, capsys):
    """`dpl metrics OUT` without --dataset scores against the folder the records name, and says so
    (without --methods, the methods it holds edits of); records that name none, several or a folder
    that is gone are refused with what to give."""
    items = read_dataset(dataset)[:1]
    run_batch(model, dataset, items, ["nti"], tmp_path / "run", num_steps=STEPS, progress=False)
    record = record_path(tmp_path / "run", "nti", items[0])
    assert json.loads(record.read_text())["dataset"] == str(Path(dataset).resolve())
    assert main(["metrics", str(tmp_path / "run"), "--range", "0:1", "--quiet"]) == 0  # the methods it holds
    captured = capsys.readouterr()
    assert f"Dataset: {Path(dataset).resolve()} (from the run's records)" in captured.err
    assert "| all | nti | 1 |" in captured.out and "dpl" not in captured.out
    saved = json.loads(record.read_text())
    for change, message in [(lambda r: r.pop("dataset"), "do not name the dataset"),
                            (lambda r: r.update(dataset=str(tmp_path / "moved")), "no longer there"),
                            (lambda r: r.update(dataset=str(tmp_path)), None)]:
        edited = dict(saved)
        change(edited)
        record.write_text(json.dumps(edited))
        if message is None:  # a second record naming another folder
            twin = record.with_name("other.json")
            twin.write_text(json.dumps(saved))
            message = "name 2 datasets"
        assert main(["metrics", str(tmp_path / "run"), "--methods", "nti", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "--dataset" in err


def test_metrics_with_weights_score_every_edit_and_count_missing_ones(dataset, model, tmp_path, capsys):
    items = read_dataset(dataset)[:2]
    run_batch(model, dataset, items, ["nti"], tmp_path / "run", num_steps=STEPS, progress=False)
    edit_path(tmp_path / "run", METHOD_FOLDERS["nti"], items[1]).unlink()  # one edit lost
    random_dino(tmp_path / "dino")
    random_clip(tmp_path / "clip")
    assert main(["metrics", str(tmp_path / "run"), "--dataset", str(dataset), "--methods", "nti", "--range", "0:2",
                 "--dino", str(tmp_path / "dino"), "--clip", str(tmp_path / "clip"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "structure distance x10^3" in printed and "clip similarity target image edit part" in printed
    assert "| all | nti | 1 (+1 missing) |" in printed
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    scored, missing = result["rows"]
    assert missing == {"key": items[1].key, "method": "nti", "editing_type_id": items[1].editing_type_id,
                       "oracle": True, "missing": True}  # (an exported scene: it has the renderer's edit)
    for name in ("structure_distance", "clip_similarity_target_image", "clip_similarity_target_image_edit_part"):
        assert math.isfinite(scored[name]) and scored[name] >= 0, name


def test_clip_similarity_is_torchmetrics_clip_score_of_a_local_folder(tmp_path):
    from transformers import CLIPModel

    from dpl_edit.batch.metrics import ClipSimilarity

    processor = random_clip(tmp_path)
    clip = ClipSimilarity(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32] = True
    model = CLIPModel.from_pretrained(tmp_path).eval()
    for pixels, score in [(np.asarray(image), clip(image, "a red circle")),
                          (np.uint8(np.asarray(image) * mask[..., None]), clip(image, "a red circle", mask))]:
        inputs = processor(text=["a red circle"], images=[pixels], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        assert score == pytest.approx(100 * max(cosine, 0), abs=1e-3)


def torchvision_squeezenet_state(seed=0):
    """A state dict in torchvision's squeezenet1_1 names (features + the 1000-class classifier)."""
    from dpl_edit.batch.lpips import squeezenet1_1_features

    torch.manual_seed(seed)
    features = squeezenet1_1_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.1.weight"] = torch.randn(1000, 512, 1, 1) * 0.01
    state["classifier.1.bias"] = torch.zeros(1000)
    return state


def test_squeezenet_has_torchvision_s_published_size_and_names():
    from dpl_edit.batch.lpips import SQUEEZENET_PARAMETERS

    state = torchvision_squeezenet_state()
    assert sum(v.numel() for v in state.values()) == SQUEEZENET_PARAMETERS == 1_235_496
    assert {"features.0.weight", "features.3.squeeze.weight", "features.12.expand3x3.bias"} <= set(state)
    assert state["features.12.expand3x3.weight"].shape == (256, 64, 3, 3)


def test_lpips_is_torchmetrics_lpips_squeeze_on_pie_bench_s_masked_inputs(monkeypatch, tmp_path):
    """torchmetrics' own _LPIPS (its scaling, normalisation, linear layers and sums), given our backbone
    through a stand-in torchvision, against ours: full 512 x 512 images, PIE-Bench's masking."""
    import types

    import torchmetrics.functional.image.lpips as tm_lpips

    from dpl_edit.batch.lpips import Lpips, squeezenet1_1_features
    from dpl_edit.batch.metrics import unedited_lpips

    torch.save(torchvision_squeezenet_state(), tmp_path / "squeezenet1_1-b8a52dc0.pth")
    ours = Lpips.from_file(tmp_path)

    backbone = squeezenet1_1_features()
    backbone.load_state_dict(ours.features.state_dict())
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(squeezenet1_1=lambda weights=None: types.SimpleNamespace(features=backbone))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setattr(tm_lpips, "_TORCHVISION_AVAILABLE", True)
    reference = tm_lpips._LPIPS(pretrained=True, net="squeeze", pnet_rand=True)

    rng = np.random.default_rng(3)
    source = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    edited = Image.fromarray(np.clip(np.asarray(source) + rng.normal(0, 30, (512, 512, 3)), 0, 255).astype(np.uint8))
    mask = np.zeros((512, 512), dtype=bool)
    mask[100:300, 150:400] = True
    keep = 1 - mask[..., None].astype(np.float32)
    as_pie = [torch.tensor(np.asarray(im).astype(np.float32) / 255 * keep).permute(2, 0, 1)[None] * 2 - 1
              for im in (source, edited)]
    with torch.no_grad():
        expected = reference(*as_pie).item()
    assert expected > 0
    assert unedited_lpips(ours, source, edited, mask) == pytest.approx(expected, rel=1e-5)
    assert unedited_lpips(ours, source, source, mask) == 0


def test_lpips_weights_flag_and_clear_errors(dataset, model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DPL_LPIPS", raising=False)
    items = read_dataset(dataset)[:1]
    run_batch(model, dataset, items, ["nti"], tmp_path, num_steps=STEPS, progress=False)
    common = ["metrics", str(tmp_path), "--dataset", str(dataset), "--methods", "nti", "--range", "0:1", "--quiet"]
    assert main(common) == 0
    assert "--lpips FILE" in capsys.readouterr().out
    weights = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(torchvision_squeezenet_state(), weights)
    assert main([*common, "--lpips", str(weights)]) == 0
    means = json.loads((tmp_path / "metrics.json").read_text())["means"]
    assert means["all"]["nti"]["lpips_unedit_part"] > 0
    assert "lpips unedit part x10^3" in capsys.readouterr().out
    assert main([*common, "--lpips", str(tmp_path / "missing.pth")]) == 2
    assert "SqueezeNet 1.1 weights not found" in capsys.readouterr().err
    (tmp_path / "broken.pth").write_text("not a state dict")
    assert main([*common, "--lpips", str(tmp_path / "broken.pth")]) == 2
    assert "Could not load SqueezeNet 1.1 weights" in capsys.readouterr().err


def test_scene_benchmark_runs_through_batch_and_metrics(tmp_path):
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "scenes.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    run = subprocess.run([sys.executable, str(script), "--scenes", "1", "--steps", str(STEPS), "--methods", "nti,dpl",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    table = (tmp_path / "scenes.md").read_text()
    assert "| ddim | 1 |" in table and "| dpl | 1 |" in table  # localisation rows (NTI keeps DDIM's maps)
    assert "| all | dpl | 3 |" in table and "psnr distractors" in table
    assert (tmp_path / "dpl+p2p" / "annotation_images").is_dir() and (tmp_path / "localisation.png").is_file()


def test_a_pie_bench_table_shows_the_published_rows_of_its_methods_and_a_scene_table_none():
    row = {"method": "nti", "editing_type_id": "1", "psnr_unedit_part": 25.0, "structure_distance": 0.02}
    rows = [{**row, "key": "a"}, {**row, "key": "a", "method": "dpl", "psnr_unedit_part": 26.0}]
    markdown, means = tables({"rows": rows, "notes": []})
    assert "| all | nti, published (SD 1.4) | 700 | 13.44 | 27.03 |" in markdown  # structure x10^3, then PSNR
    assert "dpl, published" not in markdown and set(means) == {"all", "1"}
    assert published_means({"rows": rows}) == {"nti": {"items": 700, **PIE_BENCH_P2P["nti"]}}
    scenes = [{**each, "psnr_edit_part_vs_oracle": 12.0} for each in rows]
    assert "published" not in tables({"rows": scenes, "notes": []})[0] and published_means({"rows": scenes}) == {}
