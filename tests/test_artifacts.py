import json

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
    for name in ("latent_T", "source_latent", "null_states", "token_vectors"):
        assert torch.equal(getattr(loaded, name), getattr(inversion, name)), name
    for name in ("method", "model_id", "model_fingerprint", "prompt", "token_ids", "num_steps",
                 "guidance_scale", "token_positions", "settings", "versions"):
        assert getattr(loaded, name) == getattr(inversion, name), name
    assert loaded.source_image.tobytes() == inversion.source_image.tobytes()
    assert not list((tmp_path / "inv").glob("*.tmp"))
    assert not list((tmp_path / "inv").glob("*.pkl")) and not list((tmp_path / "inv").glob("*.pt"))


def test_an_inversion_without_an_image_saved_over_one_with_leaves_no_image(inversion, tmp_path):
    import dataclasses

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


def test_saving_into_a_file_is_said_before_writing(inversion, tmp_path):
    (tmp_path / "note.txt").write_text("a file")
    for folder in (tmp_path / "note.txt", tmp_path / "note.txt" / "inv"):
        with pytest.raises(SettingError, match="The inversion's folder .*note.txt"):
            inversion.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt"]
