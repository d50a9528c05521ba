"""Bad input through every command: exit code 2, one `error:` line, no traceback, files on disk
unchanged; the same values through the Python API raise DplEditError with the same message."""

import dataclasses
import errno
import hashlib
import math
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpl_edit import (
    DplEditError,
    EditConfig,
    NullTextConfig,
    PromptError,
    SettingError,
    StableDiffusion,
    edit,
    invert,
    invert_many,
    load_model,
)
from dpl_edit.cli import main
from dpl_edit.demo import run_demo
from dpl_edit.images import to_pil
from dpl_edit.inversion import DynamicPromptConfig
from dpl_edit.scenes.train import TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An image, a plain file, a folder, and a small NTI inversion of the image (tiny model)."""
    root = tmp_path_factory.mktemp("bad")
    g = torch.Generator().manual_seed(0)
    to_pil(torch.rand(1, 3, 128, 128, generator=g) * 2 - 1).save(root / "image.png")
    (root / "note.txt").write_text("not an image, not a folder")
    (root / "folder").mkdir()
    (root / "photos").mkdir()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(root / "photos" / "source.png")  # the user's, not an inversion's
    Image.new("L", (128, 128), 255).save(root / "cat.png")
    assert main(["invert", str(root / "image.png"), "--prompt", "a cat and a dog", "--model", "tiny", "--steps", "2",
                 "--out", str(root / "inv"), "--quiet"]) == 0
    return root


INVERT = ["invert", "{image}", "--prompt", "a {{cat}} and a {{dog}}", "--model", "tiny", "--steps", "2",
          "--out", "{root}/new"]
EDIT = ["edit", "{root}/inv", "--target", "a cat and a tiger", "--out", "{root}/edits"]
RUN = ["run", "{image}", "--source", "a {{cat}} and a {{dog}}", "--target", "a cat and a tiger", "--model", "tiny",
       "--steps", "2", "--out", "{root}/run"]
CASES = {
    "invert guidance nan": (INVERT + ["--guidance", "nan"], "--guidance must be a finite number"),
    "invert guidance inf": (INVERT + ["--guidance", "inf"], "--guidance must be a finite number"),
    "invert guidance negative": (INVERT + ["--guidance", "-1"], "--guidance must be in [0, inf]"),
    "invert guidance text": (INVERT + ["--guidance", "abc"], "invalid float value"),
    "invert zero steps": (INVERT[:-4] + ["--steps", "0", "--out", "{root}/new"], "--steps must be at least 1"),
    "invert negative steps": (INVERT[:-4] + ["--steps", "-3", "--out", "{root}/new"], "--steps must be at least 1"),
    "invert more steps than noise levels": (INVERT[:-4] + ["--steps", "1000", "--out", "{root}/new"],
                                            "--steps must be at most 999 with this model's DDIM scheduler"),
    "invert steps text": (INVERT[:-4] + ["--steps", "ten", "--out", "{root}/new"], "invalid int value"),
    "invert negative dpl iterations": (INVERT + ["--method", "dpl", "--dpl-iterations", "-1"],
                                       "--dpl-iterations must be at least 0"),
    "invert lambda dj nan": (INVERT + ["--lambda-dj", "nan"], "--lambda-dj must be a finite number"),
    "invert lambda bg negative": (INVERT + ["--lambda-bg", "-0.5"], "--lambda-bg must be in [0, inf]"),
    "invert cross res zero": (INVERT + ["--cross-res", "0"], "--cross-res must be at least 1"),
    "invert self res negative": (INVERT + ["--self-res", "-4"], "--self-res must be at least 1"),
    "invert zero nti iterations": (INVERT + ["--nti-iterations", "0"], "--nti-iterations must be at least 1"),
    "invert unknown loss": (INVERT + ["--losses", "xx"], "--losses takes a comma-separated subset"),
    "invert unknown span": (INVERT + ["--span", "all"], "invalid choice"),
    "invert unknown method": (INVERT + ["--method", "magic"], "invalid choice"),
    "invert dpl setting with nti": (INVERT + ["--lambda-dj", "0.1", "--null", "direct"],
                                    "--null, --lambda-dj: no effect with --method nti (a DPL setting"),
    "invert null-text setting with ddim": (INVERT + ["--method", "ddim", "--nti-iterations", "3"],
                                           "--nti-iterations: no effect with --method ddim"),
    "invert out is a file": (INVERT[:-1] + ["{root}/note.txt"], "is a file; give a folder"),
    "invert out inside a file": (INVERT[:-1] + ["{root}/note.txt/inv"], "note.txt is a file, not a folder"),
    "invert out holding a source.png of the user's": (
        INVERT[:-1] + ["{root}/photos"], "photos holds source.png but no inversion (inversion.json); an inversion would"),
    "run out holding a source.png of the user's": (RUN[:-1] + ["{root}/photos"], "holds source.png but no inversion"),
    "invert image is a folder": (["invert", "{root}/folder"] + INVERT[2:], "No image file at"),
    "invert image missing": (["invert", "{root}/missing.png"] + INVERT[2:], "No image file at"),
    "invert model folder missing": (["invert", "{image}", "--prompt", "a cat", "--model", "{root}/no/model", "--out",
                                     "{root}/new"], "there is no folder at"),
    "invert variant of the tiny model": (INVERT + ["--variant", "fp16"], "the tiny model is built in memory"),
    "invert variant the model lacks": (["invert", "{image}", "--prompt", "a cat", "--model", "scenes", "--variant",
                                        "fp16", "--out", "{root}/new"],
                                       "model 'scenes' (the bundled model in "),
    "invert unknown device": (INVERT + ["--device", "gpu"], "Unknown --device 'gpu'; use cpu, cuda, cuda:N or mps"),
    "invert dpl without marks": (["invert", "{image}", "--prompt", "a cat", "--method", "dpl", "--out", "{root}/x"],
                                 "No dynamic word"),
    "edit cross steps above 1": (EDIT + ["--cross-steps", "1.5"], "--cross-steps must be in [0, 1]"),
    "edit cross steps nan": (EDIT + ["--cross-steps", "nan"], "--cross-steps must be a finite number"),
    "edit self steps negative": (EDIT + ["--self-steps", "-0.1"], "--self-steps must be in [0, 1]"),
    "edit blend threshold 2": (EDIT + ["--blend-threshold", "2"], "--blend-threshold must be in [0, 1]"),
    "edit blend start nan": (EDIT + ["--blend-start", "nan"], "--blend-start must be a finite number"),
    "edit reweight nan": (EDIT + ["--reweight", "tiger=nan"], "--reweight 'tiger' must be a finite"),
    "edit reweight malformed": (EDIT + ["--reweight", "tiger"], "--reweight takes WORD=VALUE"),
    "edit reweight named twice": (EDIT + ["--reweight", "tiger=2", "--reweight", "tiger=3"],
                                  "--reweight names 'tiger' twice; give each word once"),
    "edit word steps named twice": (EDIT + ["--cross-steps-word", "tiger=0.2", "tiger=0.3"],
                                    "--cross-steps-word names 'tiger' twice"),
    "edit word steps above 1": (EDIT + ["--cross-steps-word", "tiger=1.2"], "--cross-steps-word 'tiger' must be"),
    "edit out is a file": (EDIT[:-1] + ["{root}/note.txt"], "is a file; give a folder"),
    "edit out inside a file": (EDIT[:-1] + ["{root}/note.txt/edits"], "note.txt is a file, not a folder"),
    "edit no inversion": (["edit", "{root}/folder", "--target", "a dog"], "holds no inversion"),
    "edit blend occurrence zero": (EDIT + ["--blend", "cat@0"], "word@N"),
    "edit blend occurrence missing": (EDIT + ["--blend", "cat@5"], "occurrence(s) of 'cat', not 5"),
    "edit blend setting without blend": (EDIT + ["--subtract", "cat", "--blend-start", "0.5"],
                                         "--subtract, --blend-start: settings of local blending, which no blend"),
    "edit unknown mode": (EDIT + ["--mode", "swap"], "invalid choice"),
    "edit unknown target tokens": (EDIT + ["--target-tokens", "some"], "invalid choice"),
    "run cross steps 3": (RUN + ["--cross-steps", "3"], "--cross-steps must be in [0, 1]"),
    "run guidance nan": (RUN + ["--guidance", "nan"], "--guidance must be a finite number"),
    "run authors preset without null-text": (RUN + ["--method", "dpl", "--null", "negative", "--preset", "authors"],
                                             "--preset: no effect with --method dpl --null negative"),
    "run out is a file": (RUN[:-1] + ["{root}/note.txt"], "is a file; give a folder"),
    # the targets are checked before the inversion (the snapshot shows none was written)
    "run empty target": (RUN[:4] + ["--target", " "] + RUN[6:], "A target prompt is empty"),
    "run target of another length": (RUN[:4] + ["--target", "a cat and a big tiger"] + RUN[6:],
                                     "have different token counts (5 and 6)"),
    "edit empty target": (["edit", "{root}/inv", "--target", "", "--out", "{root}/edits"], "A target prompt is empty"),
    "reconstruct out is a folder": (["reconstruct", "{root}/inv", "--out", "{root}/folder"], "is a folder; give a file"),
    "reconstruct out in a missing folder": (["reconstruct", "{root}/inv", "--out", "{root}/nowhere/r.png"],
                                            "does not exist; create it first"),
    "reconstruct out inside a file": (["reconstruct", "{root}/inv", "--out", "{root}/note.txt/r.png"],
                                      "note.txt is a file, not a folder"),
    "reconstruct out of no image format": (["reconstruct", "{root}/inv", "--out", "{root}/r.txt"],
                                           "the file name must end in .png, .jpg"),
    "reconstruct no inversion": (["reconstruct", "{root}/folder"], "holds no inversion"),
    "demo zero steps": (["demo", "--steps", "0", "--out", "{root}/demo"], "The number of steps must be at least 1"),
    "demo scene beyond the split": (["demo", "--scene", "99999999", "--out", "{root}/demo"],
                                    "The scene number must be below 10000000"),
    "demo negative scene": (["demo", "--scene", "-1", "--out", "{root}/demo"], "expected a scene number"),
    "demo of another model": (["demo", "--model", "tiny", "--out", "{root}/demo"],
                              "The demo is for scene models, which make 64x64 images"),
    "check-scenes of another model": (["check-scenes", "--model", "tiny"], "is for scene models, which make 64x64"),
    "demo out is a file": (["demo", "--out", "{root}/note.txt"], "is a file; give a folder"),
    "demo out inside a file": (["demo", "--out", "{root}/note.txt/demo"], "note.txt is a file, not a folder"),
    "check-scenes zero samples": (["check-scenes", "--model", "scenes", "--samples", "0"], "--samples must be at least 1"),
    "check-scenes negative localisations": (["check-scenes", "--model", "scenes", "--localisations", "-1"],
                                            "--localisations must be at least 1"),
    "train grounding nan": (["train-scenes", "--out", "{root}/train", "--grounding-weight", "nan"],
                            "--grounding-weight must be a finite number"),
    "train zero batch": (["train-scenes", "--out", "{root}/train", "--batch-size", "0"], "--batch-size must be at least 1"),
    "train zero vae batch": (["train-scenes", "--out", "{root}/train", "--vae-batch-size", "0"],
                             "--vae-batch-size must be at least 1"),
    "train negative steps": (["train-scenes", "--out", "{root}/train", "--steps", "-1"], "--steps must be at least 0"),
    "train negative time limit": (["train-scenes", "--out", "{root}/train", "--time-limit", "-5"],
                                  "--time-limit must be in (0, inf]"),
    "train out is a file": (["train-scenes", "--out", "{root}/note.txt"], "is a file; give a folder"),
    "train export is a file": (["train-scenes", "--out", "{root}/train", "--export", "{root}/note.txt"],
                               "note.txt is a file; give a folder"),
    "localisation malformed mask": (["localisation", "{root}/inv", "--mask", "cat"], "--mask takes WORD=FILE"),
    "localisation mask named twice": (["localisation", "{root}/inv", "--mask", "cat={root}/cat.png", "--mask",
                                       "cat={root}/cat.png"], "--mask names 'cat' twice"),
    "localisation missing mask": (["localisation", "{root}/inv", "--mask", "cat={root}/none.png"], "Could not read the mask"),
    "localisation out is a folder": (["localisation", "{root}/inv", "--mask", "cat={root}/cat.png", "--out",
                                      "{root}/folder"], "is a folder; give a file name"),
    "localisation out in a missing folder": (["localisation", "{root}/inv", "--mask", "cat={root}/cat.png", "--out",
                                              "{root}/nowhere/plot.png"], "does not exist; create it first"),
    "localisation out of no plot format": (["localisation", "{root}/inv", "--mask", "cat={root}/cat.png", "--out",
                                            "{root}/plot.txt"], "the file name must end in .png, .pdf, .svg"),
    "attention no inversion": (["attention", "{root}/folder"], "holds no inversion"),
    "attention out inside a file": (["attention", "{root}/inv", "--out", "{root}/note.txt/views"],
                                    "note.txt is a file, not a folder"),
    "metrics of no folder": (["metrics", "{root}/nowhere", "--dataset", "{root}/folder"], "There is no folder"),
    "metrics of no batch folder": (["metrics", "{root}/inv", "--dataset", "{root}/folder"],
                                   "holds no edits of nti, dpl (no null-text-inversion+p2p/, dpl+p2p/)"),
    "batch zero batch size": (["batch", "{root}/folder", "--out", "{root}/batch", "--model", "tiny", "--batch-size", "0"],
                              "--batch-size must be at least 1"),
    "batch zero processes": (["batch", "{root}/folder", "--out", "{root}/batch", "--model", "tiny", "--processes", "0"],
                             "--processes must be at least 1"),
}


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own errors
        return exit.code


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_error_line(case, files, capsys):
    argv, message = CASES[case]
    argv = [a.format(root=files, image=files / "image.png") for a in argv]
    before = _snapshot(files)
    capsys.readouterr()
    assert _run(argv) == 2, case
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] != [] and err.count("error:") == 1, err
    assert "Traceback" not in err and message in err, err
    assert _snapshot(files) == before


@pytest.mark.parametrize("command", ["invert", "run"])
@pytest.mark.parametrize(("image", "message"), [("missing.png", "No image file at"),
                                                ("note.txt", "Could not read")])
def test_the_image_is_read_before_the_model_loads(command, image, message, files, monkeypatch, capsys):
    """A wrong path or a file that is no image is said at once, not after a model's load (tens of
    seconds for Stable Diffusion, minutes with --compile)."""
    def no_model(*args):
        raise AssertionError("the model was loaded before the image was read")

    monkeypatch.setattr("dpl_edit.cli.inversion.load", no_model)
    prompt = ["--prompt", "a {cat}"] if command == "invert" else ["--source", "a {cat}", "--target", "a dog"]
    assert _run([command, str(files / image), *prompt, "--out", str(files / "unwritten")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert not (files / "unwritten").exists()


API_CASES = [
    (lambda: NullTextConfig(max_iterations=0), "null-text max_iterations must be at least 1"),
    (lambda: DynamicPromptConfig(lambda_dj=math.nan), "DPL lambda_dj must be a finite number"),
    (lambda: DynamicPromptConfig(max_iterations=-1), "DPL max_iterations must be at least 0"),
    (lambda: DynamicPromptConfig(cross_resolution=0), "DPL cross_resolution must be at least 1"),
    (lambda: DynamicPromptConfig(losses=("at", "leak")), "losses must be a non-empty subset of ('at', 'dj', 'bg')"),
    (lambda: DynamicPromptConfig(losses=()), "losses must be a non-empty subset"),
    (lambda: DynamicPromptConfig(balancing_span="all"), "balancing_span must be one of ('padded', 'prompt')"),
    (lambda: EditConfig(cross_replace_steps=1.5), "cross_replace_steps must be in [0, 1]"),
    (lambda: EditConfig(blend_start=math.nan), "blend_start must be a finite number"),
    (lambda: EditConfig(reweight={"tiger": math.nan}), "re-weighting factor of 'tiger' must be a finite"),
    (lambda: TrainConfig(grounding_weight=math.nan), "grounding weight must be a finite number"),
    (lambda: run_demo("unused", num_steps=0), "The number of steps must be at least 1"),
    (lambda: load_model("tiny", dtype="bf16"), "dtype must be float32, float16 or bfloat16 (a torch.dtype or its name)"),
    (lambda: load_model("tiny", device="gpu"), "Unknown device 'gpu'; use cpu, cuda, cuda:N or mps"),
    (lambda: StableDiffusion.from_pretrained("unused", dtype=torch.int8), "dtype must be float32, float16 or bfloat16"),
    (lambda: run_demo("unused", scene_index=99999999), "The scene number must be below 10000000"),
]


@pytest.mark.parametrize("index", range(len(API_CASES)))
def test_the_api_raises_the_same_messages(index):
    make, message = API_CASES[index]
    with pytest.raises(SettingError, match=re.escape(message)) as raised:
        make()
    assert isinstance(raised.value, DplEditError) and isinstance(raised.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_on_a_machine_without_it_is_said_before_loading(files, capsys):
    assert _run([a.format(root=files, image=files / "image.png") for a in INVERT] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "error: --device 'cuda' was asked for but this torch build sees no CUDA GPU; use cpu" in err, err
    with pytest.raises(SettingError, match="sees no CUDA GPU"):
        load_model("tiny", device="cuda:1")


def test_invert_checks_guidance_and_steps(model, image):
    for kwargs, message in (({"guidance_scale": math.nan}, "guidance_scale must be a finite number"),
                            ({"num_steps": 0}, "num_steps must be at least 1")):
        with pytest.raises(SettingError, match=message):
            invert(model, to_pil(image), "a cat", progress=False, **kwargs)


def test_invert_checks_its_method_null_preset_and_image(model, image):
    for kwargs, message in (({"method": "sdedit"}, "Unknown inversion method 'sdedit'; choose one of ddim, "),
                            ({"null": "zero"}, "Unknown null strategy 'zero'; choose one of "),
                            ({"preset": "fast"}, "Unknown preset 'fast'; choose one of paper, authors"),
                            ({"image": image}, "Expected a PIL image, a numpy picture or an image file's path, got Tensor"),
                            ({"image": Image.new("RGB", (64, 96))}, "The image is 64x96 but the model takes 128x128")):
        with pytest.raises(DplEditError, match=re.escape(message)):
            invert(model, kwargs.pop("image", to_pil(image)), "a cat", progress=False, **kwargs)


def test_prompts_and_words_that_are_not_text_are_said_to_be(model, image):
    """None, a number or a list holding one where prompts or words go: a PromptError naming what,
    not an AttributeError from deep in the tokenizer (words=None is no words)."""
    picture = to_pil(image)
    for call, message in (
        (lambda: invert(model, picture, None), "Expected the prompt as a string, got None"),
        (lambda: invert(model, picture, "a cat", method="dpl", words=[None]), "Expected words as a string or a list"),
        (lambda: invert_many(model, [picture] * 2, ["a cat", 3]), "Expected prompts as a string or a list"),
        (lambda: edit(model, invert(model, picture, "a cat", num_steps=1, progress=False), ["a dog", None]),
         "Expected target prompts as a string or a list of strings, got ['a dog', None]"),
        (lambda: EditConfig(subtract=[None]), "Expected subtract words as a string or a list of strings"),
    ):
        with pytest.raises(PromptError, match=re.escape(message)):
            call()
    assert invert(model, picture, "a {cat}", method="dpl", words=None, num_steps=1, progress=False).words


def test_settings_may_be_dicts_of_their_config_s_fields(model, image):
    """`edit(..., {"mode": "refine"})`, `invert(..., null_text={...}, dpl={...})`: a dict applies its fields
    over the defaults (the preset's, the model's recommendations); a field the config lacks or
    another type is a SettingError, not an AttributeError."""
    picture = to_pil(image)
    nti = invert(model, picture, "a cat", num_steps=1, progress=False, preset="authors", null_text={"max_iterations": 3})
    assert nti.settings["null_text"] == {**dataclasses.asdict(NullTextConfig.authors()), "max_iterations": 3}
    dpl = invert(model, picture, "a {cat}", method="dpl", num_steps=1, progress=False, dpl={"max_iterations": 2})
    assert dpl.settings["dpl"]["max_iterations"] == 2 and dpl.settings["dpl"]["cross_resolution"] == 16
    assert edit(model, nti, "a dog", {"mode": "refine"}, progress=False).plan.targets
    for call, message in (
        (lambda: edit(model, nti, "a dog", "refine", progress=False),
         "config must be EditConfig(...) or a dict of its settings, got str"),
        (lambda: edit(model, nti, "a dog", {"colour": 1}, progress=False), "config has no setting colour; EditConfig"),
        (lambda: invert(model, picture, "a cat", null_text={"steps": 3}), "null_text has no setting steps"),
        (lambda: invert(model, picture, "a cat", dpl={"max_iterations": -1}), "DPL max_iterations must be at least 0"),
    ):
        with pytest.raises(SettingError, match=re.escape(message)):
            call()


def test_an_unexpected_failure_is_one_line_and_a_log_file(monkeypatch, capsys, files):
    def broken(folder):
        raise RuntimeError("boom")

    monkeypatch.setattr("dpl_edit.cli.inversion.Inversion.load", broken)
    assert main(["reconstruct", str(files / "inv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this is a bug in dpl-edit" in err[0] and "Traceback" not in err[0]
    log = err[0].rsplit(" ", 1)[-1]
    assert "RuntimeError: boom" in Path(log).read_text()


def test_running_out_of_device_memory_is_one_line_that_says_what_to_change(monkeypatch, capsys, files):
    def too_big(folder):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr("dpl_edit.cli.inversion.Inversion.load", too_big)
    assert main(["reconstruct", str(files / "inv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err[0]
    assert "--batch-size" in err[0] and "--no-cuda-graphs" in err[0] and "bug" not in err[0]


def test_a_place_this_user_may_not_write_in_is_said_before_any_work(monkeypatch, capsys, files):
    """The nearest existing folder of --out must be writable (tested with os.access, which a root
    user passes everywhere, so it is made to refuse here)."""
    monkeypatch.setattr("dpl_edit.checks.os.access", lambda path, mode: Path(path) != files)
    before = _snapshot(files)
    assert main(["edit", str(files / "inv"), "--target", "a cat and a tiger", "--out", str(files / "a" / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {files / 'a' / 'b'}: this user may not write in {files}; give another place."]
    assert _snapshot(files) == before


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_a_file_the_system_refuses_is_one_line_not_a_bug(code, words, monkeypatch, capsys, files):
    """A full disk or a read-only place found only while writing (the checks cannot foresee them)."""
    def refused(folder):
        raise OSError(code, os.strerror(code), str(files / "inv" / "inversion.safetensors"))

    monkeypatch.setattr("dpl_edit.cli.inversion.Inversion.load", refused)
    assert main(["reconstruct", str(files / "inv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "inversion.safetensors" in err[0], err
    assert "bug" not in err[0] and "Traceback" not in err[0]


def test_other_os_errors_are_still_bugs(monkeypatch, capsys, files):
    def missing(folder):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "somewhere")

    monkeypatch.setattr("dpl_edit.cli.inversion.Inversion.load", missing)
    assert main(["reconstruct", str(files / "inv")]) == 1
    assert "this is a bug in dpl-edit" in capsys.readouterr().err


def test_the_command_line_names_its_options_only_where_a_message_opens_with_settings():
    """The library's setting names become the command's options in a message's opening only: a
    prompt or path quoted later keeps its words, even one that is a setting's name."""
    from dpl_edit.cli.common import named_as_options
    from dpl_edit.errors import PromptError

    names = {"subtract": "--subtract", "blend_start": "--blend-start", "batch size": "--batch-size",
             "vae batch size": "--vae-batch-size"}
    for message, expected in (
        ("subtract, blend_start: settings of blending (subtract)", "--subtract, --blend-start: settings of blending (subtract)"),
        ("vae batch size must be at least 1, got 0", "--vae-batch-size must be at least 1, got 0"),
        ("The word 'subtract' is in none of the target prompts", "The word 'subtract' is in none of the target prompts"),
        ("subtracted", "subtracted"),
    ):
        with pytest.raises(PromptError) as raised, named_as_options(names):
            raise PromptError(message)
        assert str(raised.value) == expected
