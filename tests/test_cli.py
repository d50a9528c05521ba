"""The `dpl` command end to end on the tiny model."""

import pytest
from PIL import Image

from dpl_edit.cli import main


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
    assert Image.open(out / "reconstruction.png").size == (128, 128)
    assert "PSNR" in capsys.readouterr().out


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


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["invert", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompt", "--out", "--method", "--model", "--device", "--dtype", "--seed", "--fit", "--steps"):
        assert option in text
