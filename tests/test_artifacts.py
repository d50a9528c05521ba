import dataclasses
import json
import re

import pytest
import torch

from dpl_edit import Inversion, InversionFileError, SettingError, invert
from dpl_edit.images import to_pil
from dpl_edit.random_models import tiny_model


@pytest.fixture(scope="module")
def inversion(model):
    g = torch.Generator().manual_seed(3)
    image = to_pil(torch.rand(1, 3, 128, 128, generator=g) * 2 - 1)
    return invert(model, image, "a cat and a dog", method="nti", num_steps=4, progress=False)


def test_round_trip_is_bit_identical(inversion, tmp_path):
    inversion.token_vectors = torch.randn(4, 2, 32)
    inversion.token_positions = [2, 5]
    inversion.save(tmp_path / "inv")
    loaded = Inversion.load(tmp_path / "inv")
    assert inversion.trajectory is not None  # (NTI's: what its null-text steps sampled)
    for name in ("latent_T", "source_latent", "null_states", "token_vectors", "trajectory"):
        assert torch.equal(getattr(loaded, name), getattr(inversion, name)), name
    for name in ("method", "model_id", "model_fingerprint", "prompt", "token_ids", "num_steps",
                 "guidance_scale", "token_positions", "settings", "versions"):
        assert getattr(loaded, name) == getattr(inversion, name), name
    assert loaded.source_image.tobytes() == inversion.source_image.tobytes()
    assert not list((tmp_path / "inv").glob("*.tmp"))
    assert not list((tmp_path / "inv").glob("*.pkl")) and not list((tmp_path / "inv").glob("*.pt"))


def test_an_inversion_without_an_image_saved_over_one_with_leaves_no_image(inversion, tmp_path):
    inversion.save(tmp_path / "inv")
    dataclasses.replace(inversion, source_image=None).save(tmp_path / "inv")
    assert Inversion.load(tmp_path / "inv").source_image is None



def test_an_image_of_the_user_s_called_source_png_is_never_written_over(inversion, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "source.png").write_bytes(b"the user's picture")
    with pytest.raises(SettingError, match="holds source.png but no inversion"):
        inversion.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "source.png").read_bytes() == b"the user's picture"
    assert not (tmp_path / "photos" / "inversion.safetensors").exists()


def test_refuses_another_model(inversion, model):
    inversion.check_compatible(model)
    with pytest.raises(InversionFileError, match="differs from the loaded model"):
        inversion.check_compatible(tiny_model(seed=1))


def test_damaged_folders_give_clear_errors(inversion, tmp_path):
    with pytest.raises(InversionFileError, match="holds no inversion"):
        Inversion.load(tmp_path)
    folder = inversion.save(tmp_path / "inv")
    data = bytearray((folder / "inversion.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "inversion.safetensors").write_bytes(bytes(data))
    with pytest.raises(InversionFileError, match="does not match"):
        Inversion.load(folder)
    meta = json.loads((folder / "inversion.json").read_text())
    meta["format_version"] = 99
    (folder / "inversion.json").write_text(json.dumps(meta))
    with pytest.raises(InversionFileError, match="format version"):
        Inversion.load(folder)


def _edited(meta: dict, **changes) -> dict:
    meta = {**meta, **changes}
    return {k: v for k, v in meta.items() if v is not _DROP}


_DROP = object()
HAND_EDITS = {  # what an inversion.json edited by hand, damaged or of another version may hold
    "not an object": (lambda meta: [1, 2], "holds no JSON object (found list)"),
    "a field unknown here": (lambda meta: _edited(meta, colour="red"), "unknown fields colour"),
    "a required field missing": (lambda meta: _edited(meta, prompt=_DROP), "(no prompt)"),
    "a field of another type": (lambda meta: _edited(meta, num_steps="four"), "num_steps of the wrong type"),
    "a count given as a flag": (lambda meta: _edited(meta, num_steps=True), "num_steps of the wrong type"),
    "an unknown null": (lambda meta: _edited(meta, null="zero"), "null 'zero' is none of empty, optimized"),
    "more steps than the tensors": (lambda meta: _edited(meta, num_steps=6), "num_steps 6, but null_states has 4 rows"),
    "no hash": (lambda meta: _edited(meta, tensors_sha256=_DROP), "does not match"),
}


@pytest.mark.parametrize("case", HAND_EDITS)
def test_a_hand_edited_or_damaged_inversion_json_is_said_to_be_one(inversion, tmp_path, case):
    """Not a TypeError or KeyError from the dataclass or from deep in an edit (`dpl` called those bugs)."""
    folder = inversion.save(tmp_path / "inv")
    edit, message = HAND_EDITS[case]
    (folder / "inversion.json").write_text(json.dumps(edit(json.loads((folder / "inversion.json").read_text()))))
    with pytest.raises(InversionFileError, match=re.escape(message)):
        Inversion.load(folder)


def test_an_unreadable_source_image_is_said_to_be_one(inversion, tmp_path):
    folder = inversion.save(tmp_path / "inv")
    (folder / "source.png").write_text("not a picture")
    with pytest.raises(InversionFileError, match="source.png is no readable image"):
        Inversion.load(folder)


@pytest.mark.parametrize("failing", ["tensors", "image", "json"])
def test_a_save_that_fails_or_is_interrupted_leaves_the_folder_as_it_was(inversion, tmp_path, monkeypatch, failing):
    """Every file is written under a temporary name before any is renamed into place (the JSON last):
    a Ctrl-C or a full disk while writing leaves the earlier inversion whole and no temporary files."""
    folder = inversion.save(tmp_path / "inv")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"tensors": "dpl_edit.artifacts.save_file", "image": "PIL.Image.Image.save",
              "json": "pathlib.Path.write_text"}[failing]
    monkeypatch.setattr(target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        dataclasses.replace(inversion, prompt="another prompt", latent_T=inversion.latent_T + 1,
                            source_image=inversion.source_image.transpose(0)).save(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert Inversion.load(folder).prompt == inversion.prompt


def test_saving_into_a_file_is_said_before_writing(inversion, tmp_path):
    (tmp_path / "note.txt").write_text("a file")
    for folder in (tmp_path / "note.txt", tmp_path / "note.txt" / "inv"):
        with pytest.raises(SettingError, match="The inversion's folder .*note.txt"):
            inversion.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt"]
