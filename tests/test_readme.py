"""The README's Python examples run as written: one after the other, as one script, on the tiny
model (in place of Stable Diffusion v1.4, which cannot be downloaded here) with one inversion step,
in a folder holding a ``cat.jpg``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

import dpl_edit
from dpl_edit import pipeline, registry

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

    monkeypatch.setattr(registry, "load_model", load_model)
    monkeypatch.setattr(dpl_edit, "load_model", load_model, raising=False)
    monkeypatch.setattr(pipeline, "invert_many", invert_many)
    monkeypatch.chdir(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)  # not square: the crop
    Image.fromarray(pixels).save("cat.jpg")
    exec(compile("\n".join(python_examples()), str(README), "exec"), {})
    assert loaded == ["CompVis/stable-diffusion-v1-4"]
    assert {"cat-inv", "reconstruction.png", "edit.png"} <= {p.name for p in tmp_path.iterdir()}
