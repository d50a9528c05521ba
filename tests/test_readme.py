"""The README's examples hold: its Python examples run as written (one after the other, as one
script, on the tiny model in place of Stable Diffusion v1.4, which cannot be downloaded here, with
one inversion step, in a folder holding a ``cat.jpg``), and every ``dpl`` command of its shell
examples parses (its options exist and take the values given)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

import dpl_edit
from dpl_edit import pipeline, registry
from dpl_edit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_its_examples():
    examples = python_examples()
    assert len(examples) >= 3
    assert any("load_model(" in code for code in examples)


def test_the_readme_python_examples_run(tmp_path, monkeypatch, model):
    loaded = []

    def load_model(name, device="cpu", dtype=None, **kwargs):
        loaded.append(name)
        return model

    one_step = pipeline.invert_many

    def invert_many(*args, **kwargs):
        return one_step(*args, **{**kwargs, "num_steps": 1, "progress": False})

    # the package's export first: reading it (to restore it after) loads registry's, which must still be the real one
    monkeypatch.setattr(dpl_edit, "load_model", load_model, raising=False)
    monkeypatch.setattr(registry, "load_model", load_model)
    monkeypatch.setattr(pipeline, "invert_many", invert_many)
    monkeypatch.chdir(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)  # not square: the crop
    Image.fromarray(pixels).save("cat.jpg")
    exec(compile("\n".join(python_examples()), str(README), "exec"), {})  # noqa: S102 (the README's own code)
    assert loaded == ["CompVis/stable-diffusion-v1-4"]
    assert {"cat-inv", "reconstruction.png", "edit.png"} <= {p.name for p in tmp_path.iterdir()}


def command_lines() -> list[list[str]]:
    """Every ``dpl`` command of the README's shell examples, as its arguments after ``dpl``."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                starts = [k for k, word in enumerate(words) if word.endswith(("bin/dpl", "dpl_edit.cli")) or word == "dpl"]
                if starts:
                    commands.append(words[starts[0] + 1 :])
    return commands


def test_the_readme_commands_parse():
    commands = command_lines()
    assert len(commands) >= 25 and {"demo", "invert", "edit", "run", "batch", "metrics", "serve"} <= {c[0] for c in commands}
    for argv in commands:
        args = build_parser(argv[0]).parse_args(argv)  # an unknown option or a bad value exits here
        assert args.command == argv[0]
