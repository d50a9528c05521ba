"""The `dpl` command end to end on the tiny model."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpl_edit import cli
from dpl_edit.cli import COMMANDS, build_parser, common, main


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (300, 200), (200, 50, 50)).save(path)
    return path


def test_invert_then_reconstruct(photo, tmp_path, capsys):
    out = tmp_path / "inv"
    args = ["--model", "tiny", "--steps", "5", "--quiet", "--seed", "0"]
    assert main(["invert", str(photo), "--prompt", "a red wall", "--out", str(out), *args[:-2]]) == 0
    assert (out / "inversion.json").is_file() and (out / "source.png").is_file()
    assert main(["reconstruct", str(out), "--quiet"]) == 0
    with Image.open(out / "reconstruction.png") as image:
        assert image.size == (128, 128)
    assert "PSNR" in capsys.readouterr().out


@pytest.mark.slow  # bfloat16: 35-50 s on a CPU without bfloat16 instructions
def test_an_inversion_is_reconstructed_and_edited_in_its_own_precision(photo, tmp_path, capsys):
    from dpl_edit import Inversion

    out = tmp_path / "inv"
    assert main(["invert", str(photo), "--prompt", "a red wall", "--out", str(out), "--model", "tiny", "--steps", "2",
                 "--dtype", "bfloat16", "--quiet"]) == 0
    assert Inversion.load(out).settings["dtype"] == "bfloat16"
    capsys.readouterr()
    for argv, dtype in ([[], "(bfloat16)"], [["--dtype", "float32"], "(float32)"], [["--model", "tiny"], "(bfloat16)"]):
        assert main(["reconstruct", str(out), "--out", str(tmp_path / "r.png"), *argv]) == 0
        assert dtype in capsys.readouterr().err
    assert main(["edit", str(out), "--target", "a red door", "--out", str(tmp_path / "edits")]) == 0
    assert "(bfloat16)" in capsys.readouterr().err
    inversion = Inversion.load(out)
    inversion.settings["dtype"] = "float16"  # made on a GPU, read on this CPU: float32, said so
    inversion.save(out)
    assert main(["reconstruct", str(out), "--out", str(tmp_path / "r.png"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "made in float16, which runs tens of times slower on a CPU" in err and "(float32)" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["invert", "missing.png", "--prompt", "x", "--out", "o", "--model", "tiny"], "No image file"),
        (["invert", "{photo}", "--prompt", "x " * 90, "--out", "o", "--model", "tiny"], "tokens long"),
        (["invert", "{photo}", "--prompt", "x", "--out", "o", "--model", "/no/model"], "Could not load model"),
        (["invert", "{photo}", "--prompt", "x", "--out", "o", "--model", "tiny", "--device", "cuda:7"], "CUDA"),
        (["reconstruct", "nowhere"], "holds no inversion"),
    ],
)
def test_bad_input_gives_a_message_not_a_traceback(argv, message, photo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{photo}", str(photo)) for a in argv] + ["--quiet"] * (argv[0] == "invert")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_an_interrupt_while_starting_is_one_line_not_a_traceback(monkeypatch, capsys):
    # Ctrl-C while the command's module (and torch) still imports: what an interrupted run says
    def interrupted(name, package=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("dpl_edit.cli.importlib.import_module", interrupted)
    assert main(["demo", "--out", "anywhere"]) == 130
    assert capsys.readouterr().err == "interrupted; nothing was written for the step in progress\n"


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompt", "--out", "--method", "--model", "--device", "--dtype", "--seed", "--fit", "--steps"):
        assert option in text


def test_run_help_names_its_own_default_method_and_caption_option(capsys):
    """`dpl run` inverts with dpl by default and takes the caption as --source: its help says so."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: dpl" in text and "Default: nti" not in text
    assert "braces in --source" in text and "--prompt" not in text
    args = build_parser("run").parse_args(["run", "x.png", "--source", "a {cat}", "--target", "a dog", "--out", "o"])
    assert args.method == "dpl"


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_is_defined_by_the_module_the_table_names(name):
    """`dpl COMMAND ...` parses with the arguments of COMMANDS[name]'s module, which defines the
    command and no command outside the table; every other command is a name and help line."""
    parser = build_parser(name)
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(subparsers.choices) == list(COMMANDS)
    defined = [n for n, p in subparsers.choices.items() if p.add_help]  # the stand-ins have no -h
    assert name in defined and all(COMMANDS[n].module == COMMANDS[name].module for n in defined)
    assert [a.help for a in subparsers._choices_actions] == [c.help for c in COMMANDS.values()]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_argument_of_every_command_has_help(name):
    """`dpl COMMAND --help` explains each argument it lists (nested commands such as `dpl scenes
    export` included); a hidden one is argparse.SUPPRESS."""
    def parsers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield sub
                    yield from parsers(sub)

    (command,) = [p for p in parsers(build_parser(name)) if p.prog == f"dpl {name}"]
    for parser in [command, *parsers(command)]:
        silent = [a.dest for a in parser._actions if not isinstance(a, argparse._SubParsersAction) and not a.help]
        assert silent == [], f"{parser.prog}: no help for {silent}"


def test_the_package_s_public_names_load_on_first_use_from_their_modules():
    """``dpl_edit``'s exports (PEP 562): each is its module's object, and the imports type checkers
    read name the same modules."""
    import ast
    import importlib
    import inspect

    import dpl_edit

    assert dpl_edit.__all__ == list(dpl_edit._EXPORTS)
    for name in dpl_edit.__all__:
        assert getattr(dpl_edit, name) is getattr(importlib.import_module(f"dpl_edit.{dpl_edit._EXPORTS[name]}"), name)
        assert name in dir(dpl_edit)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dpl_edit.nothing  # noqa: B018
    (block,) = [node for node in ast.parse(inspect.getsource(dpl_edit)).body
                if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"]
    typed = {alias.name: node.module.lstrip(".") for node in block.body for alias in node.names}
    assert typed == dpl_edit._EXPORTS


def in_a_fresh_interpreter(code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a new interpreter (offline); it must succeed."""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return done


def test_the_executable_keeps_its_start_up_out_of_the_garbage_collector():
    """`dpl` (and `python -m dpl_edit.cli`) runs `console`, which pauses the collector while the
    command's modules and the model load and freezes them after (see cli/collector.py); the library
    and `main` leave Python's collector as it is. A fresh interpreter, so the test process's own
    collector is not touched."""
    assert '[project.scripts]\ndpl = "dpl_edit.cli:console"\n' in (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "sys.exit(console())" in (Path(cli.__file__).parent / "__main__.py").read_text()
    code = (
        "import gc\n"
        "from dpl_edit.cli import build_parser, collector, common\n"
        "args = build_parser('invert').parse_args(['invert', 'x.png', '--prompt', 'a', '--out', 'o', '--model', 'tiny'])\n"
        "with collector.loading():\n"
        "    pass\n"
        "print('library:', gc.isenabled(), gc.get_freeze_count())\n"
        "collector.start()\n"
        "print('started:', gc.isenabled())\n"
        "collector.settle()\n"
        "print('settled:', gc.isenabled(), gc.get_freeze_count() > 0)\n"
        "model = common.load(args, 'tiny')\n"
        "tracked = {id(o) for o in gc.get_objects()}\n"
        "print('loaded:', gc.isenabled(), id(model.unet) in tracked, id(model.text_encoder) in tracked)\n"
    )
    done = in_a_fresh_interpreter(code)
    assert done.stdout.splitlines() == ["library: True 0", "started: False", "settled: True True",
                                        "loaded: True False False"]


def test_help_and_argument_errors_load_no_torch_or_no_model_libraries():
    """`dpl --help` (0.05 s), `dpl --version` and a missing or unknown command answer before torch is
    imported (1.4-1.8 s on this project's CPU); a command's help and a bad argument answer without
    diffusers, transformers, scikit-learn, matplotlib, SciPy or Gradio (4-5 s of imports): they load
    with a model, a figure, a background mask or the page. A fresh interpreter, so nothing the tests
    loaded counts."""
    code = (
        "import sys\n"
        "from dpl_edit.cli import main\n"
        "def answer(argvs):\n"
        "    for argv in argvs:\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "answer((['--help'], ['--version'], ['nope'], []))\n"
        "print('loaded first:', [name for name in ('torch', 'numpy', 'PIL') if name in sys.modules])\n"
        "answer((['invert', '--help'], ['demo', '--steps', '0']))\n"
        "heavy = ['diffusers', 'transformers', 'sklearn', 'matplotlib', 'scipy', 'gradio']\n"
        "print('loaded then:', [name for name in heavy if name in sys.modules])\n"
    )
    done = in_a_fresh_interpreter(code)
    assert "loaded first: []" in done.stdout and "loaded then: []" in done.stdout
    assert "check-scenes" in done.stdout and "dpl-edit 0.1.0" in done.stdout
    assert "invalid choice: 'nope'" in done.stderr and "required: COMMAND" in done.stderr
    assert "must be at least 1" in done.stderr  # the bad argument's message still comes


def test_list_options_given_again_add_to_the_list():
    """`--blend cat --blend dog` blends both, as `--blend cat dog` does (argparse kept the last)."""
    edit = build_parser("edit").parse_args(["edit", "inv", "--target", "t", "--blend", "cat", "--blend", "dog", "mat",
                                           "--subtract", "a", "--subtract", "b", "--reweight", "x=2", "--reweight",
                                           "y=3", "--cross-steps-word", "x=0.1", "--cross-steps-word", "y=0.2"])
    assert edit.blend == ["cat", "dog", "mat"] and edit.subtract == ["a", "b"]
    assert edit.reweight == ["x=2", "y=3"] and edit.cross_steps_word == ["x=0.1", "y=0.2"]
    invert = build_parser("invert").parse_args(["invert", "i.png", "--prompt", "p", "--out", "o", "--words", "cat",
                                               "--words", "dog"])
    assert invert.words == ["cat", "dog"] and build_parser("invert").parse_args(
        ["invert", "i.png", "--prompt", "p", "--out", "o"]).words == []


def test_an_unknown_option_is_answered_with_its_command_s_usage(capsys):
    """Not with the top parser's `usage: dpl [-h] [--version] COMMAND ...`, which names no option."""
    with pytest.raises(SystemExit) as exited:
        main(["attention", "some/inversion", "--steps", "0-5"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "usage: dpl attention" in err and "--compare" in err
    assert "dpl attention: error: unrecognized arguments: --steps 0-5" in err


def test_run_then_edit_with_several_targets(photo, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model", "tiny", "--steps", "3", "--quiet"]
    assert main(["run", str(photo), "--source", "a {red} wall", "--target", "a blue wall", "--target", "a red door",
                 "--dpl-iterations", "1", "--blend", "red", "--out", str(out), *common]) == 0
    assert (out / "inversion.json").is_file()
    for name in ("edit_1.png", "edit_2.png", "reconstruction.png", "edit_grid.png"):
        assert (out / "edits" / name).is_file()
    assert main(["edit", str(out), "--target", "a big red wall", "--mode", "refine", "--reweight", "big=2",
                 "--cross-steps-word", "big=0.5", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert (tmp_path / "e" / "edit_1.png").is_file()
    record = json.loads((out / "edits" / "edit.json").read_text())
    assert record["targets"] == ["a blue wall", "a red door"] and record["method"] == "dpl"
    assert record["inversion"] == ".." and record["source_prompt"] == "a {red} wall"
    assert record["settings"]["blend"] == ["red"] and record["settings"]["mode"] == "replace"
    # an edit written over an earlier one with more targets leaves none of the earlier one's images
    again = tmp_path / "again"
    again.mkdir()
    (again / "edit_7.png").write_bytes(b"a file of the user's, which no edit.json names")
    for targets in (["--target", "a blue wall", "--target", "a red door"], ["--target", "a red door"]):
        assert main(["edit", str(out), *targets, "--out", str(again), "--quiet"]) == 0
    assert sorted(p.name for p in again.glob("edit_*.png")) == ["edit_1.png", "edit_7.png", "edit_grid.png"]
    assert json.loads((again / "edit.json").read_text())["targets"] == ["a red door"]
    first = (out / "edits" / "edit_1.png").read_bytes()
    capsys.readouterr()
    assert main(["edit", str(out), "--target", "a red door", "--quiet"]) == 0  # a later edit, no --out
    assert (out / "edits" / "edit_1.png").read_bytes() == first and (out / "edits-2" / "edit_1.png").is_file()
    assert main(["edit", str(out), "--target", "a red door", "--quiet"]) == 0 and (out / "edits-3").is_dir()
    capsys.readouterr()
    assert main(["edit", str(out), "--target", "a big red wall", "--quiet"]) == 2
    assert "refine" in capsys.readouterr().err
    assert main(["edit", str(out), "--target", "a red wall", "--reweight", "wall", "--quiet"]) == 2
    assert "WORD=VALUE" in capsys.readouterr().err


def test_an_inversion_redone_in_its_folder_moves_the_old_one_and_its_edits_aside(photo, tmp_path, capsys):
    from dpl_edit import Inversion

    out = tmp_path / "run"
    common = ["--model", "tiny", "--steps", "2", "--quiet", "--out", str(out)]
    assert main(["run", str(photo), "--source", "a red wall", "--target", "a blue wall", "--target",
                 "a red door", "--method", "ddim", *common]) == 0
    assert main(["reconstruct", str(out), "--quiet"]) == 0
    assert main(["attention", str(out), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")
    first = Inversion.load(out)
    capsys.readouterr()
    assert main(["invert", str(photo), "--prompt", "a red wall", "--method", "npi", *common]) == 0  # redone
    assert f"now in {out / 'previous'}/" in capsys.readouterr().out
    kept = Inversion.load(out / "previous")
    assert kept.method == first.method == "ddim" and torch.equal(kept.latent_T, first.latent_T)
    assert {p.name for p in (out / "previous").iterdir()} == {
        "inversion.safetensors", "inversion.json", "source.png", "reconstruction.png", "attention_words.png", "edits"}
    assert {p.name for p in (out / "previous" / "edits").iterdir()} >= {"edit_1.png", "edit_2.png"}
    assert Inversion.load(out).method == "npi" and (out / "notes.txt").read_text() == "mine"
    assert not (out / "edits").exists() and not (out / "reconstruction.png").exists()
    assert main(["run", str(photo), "--source", "a red wall", "--target", "a red door", "--method", "ddim",
                 *common]) == 0  # again: previous-2, and edits of its own
    assert Inversion.load(out / "previous-2").method == "npi" and not (out / "previous-2" / "edits").exists()
    assert sorted(p.name for p in (out / "edits").iterdir() if p.name.startswith("edit_")) == [
        "edit_1.png", "edit_grid.png"]


@pytest.mark.parametrize("method", ["npi", "direct"])
def test_faster_inversions(photo, tmp_path, method):
    out = tmp_path / method
    assert main(["invert", str(photo), "--prompt", "a red wall", "--method", method, "--out", str(out),
                 "--model", "tiny", "--steps", "3", "--quiet"]) == 0
    assert main(["edit", str(out), "--target", "a blue wall", "--quiet"]) == 0


def test_compile_flag_compiles_the_loaded_model(photo, tmp_path, monkeypatch):
    from dpl_edit.models import StableDiffusion

    compiled = []
    monkeypatch.setattr(StableDiffusion, "compile", lambda self, mode=None: compiled.append(self.model_id) or self)
    assert main(["invert", str(photo), "--prompt", "a red wall", "--method", "direct", "--out", str(tmp_path / "c"),
                 "--model", "tiny", "--steps", "2", "--quiet", "--compile"]) == 0
    assert len(compiled) == 1  # (the compiled path itself: tests/test_compile.py)


@pytest.mark.parametrize(("device", "flags", "graphs"), [
    ("cuda", [], True), ("cuda", ["--no-cuda-graphs"], False), ("cuda", ["--compile"], False),
    ("cuda", ["--cuda-graphs"], True), ("cpu", [], False),
])
def test_cuda_graphs_are_the_default_on_cuda(monkeypatch, device, flags, graphs):
    """CUDA graphs are on wherever the device is CUDA, unless --no-cuda-graphs or --compile (the
    device is faked: the CPU has none)."""
    parser = argparse.ArgumentParser()
    common.add_model_options(parser, "tiny")
    asked = {}
    monkeypatch.setattr(common, "pick_device", lambda name: torch.device(device))
    monkeypatch.setattr(common, "load_model", lambda name, **kwargs: asked.update(kwargs))
    common.load(parser.parse_args(["--quiet", *flags]), "tiny")
    assert asked["cuda_graphs"] is graphs


def test_cuda_graphs_flag_needs_cuda(photo, tmp_path, capsys):
    """On this CPU the flag is refused with what to do, before any work (the path itself:
    tests/test_cuda_graphs.py)."""
    assert main(["invert", str(photo), "--prompt", "a red wall", "--out", str(tmp_path / "g"),
                 "--model", "tiny", "--device", "cpu", "--steps", "2", "--quiet", "--cuda-graphs"]) != 0
    err = capsys.readouterr().err
    assert "--cuda-graphs needs a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()
