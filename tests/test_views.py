"""Attention views, the localisation curve, and `dpl invert --method dpl` / `dpl attention` / `dpl localisation`."""

import pytest
import torch
from PIL import Image, ImageDraw

from dpl_edit.cli import main
from dpl_edit.localisation import iou_curve


def test_iou_curve_known_values():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :4] = True
    attention = torch.zeros(2, 2)
    attention[0, 0] = 1.0  # upsampled: 1 in the top-left quarter's core, falling off bilinearly
    curve = iou_curve(attention, mask)
    assert curve.shape == (11,)
    assert curve[0] == pytest.approx(16 / 64)  # threshold 0: everything predicted
    assert curve[-1] <= curve[5] and 0 < curve[5] <= 1
    exact = torch.zeros(8, 8)
    exact[:4, :4] = 1
    assert iou_curve(exact, mask, thresholds=[0.5]).item() == 1.0


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    image = Image.new("RGB", (128, 128), (40, 120, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 30, 60, 80), fill=(220, 30, 30))
    draw.rectangle((70, 40, 115, 85), fill=(30, 30, 220))
    image.save(folder / "scene.png")
    for word, box, shape in (("circle", (10, 30, 60, 80), "ellipse"), ("square", (70, 40, 115, 85), "rectangle")):
        mask = Image.new("L", (128, 128), 0)
        getattr(ImageDraw.Draw(mask), shape)(box, fill=255)
        mask.save(folder / f"{word}.png")
    return folder


def test_dpl_invert_attention_and_localisation_commands(scene, capsys):
    common = ["--model", "tiny", "--steps", "3", "--quiet"]
    dpl, nti = scene / "dpl", scene / "nti"
    assert main(["invert", str(scene / "scene.png"), "--prompt", "a {circle} and a {square} on grass",
                 "--method", "dpl", "--dpl-iterations", "2", "--out", str(dpl), *common]) == 0
    assert main(["invert", str(scene / "scene.png"), "--prompt", "a circle and a square on grass",
                 "--out", str(nti), *common]) == 0
    assert main(["attention", str(dpl), "--compare", str(nti)]) == 0
    for name in ("attention_words.png", "attention_background.png", "attention_comparison.png"):
        assert Image.open(dpl / name).size[0] > 100
    assert main(["attention", str(nti), "--quiet"]) == 0
    assert (nti / "attention_words.png").is_file()
    capsys.readouterr()
    assert main(["localisation", str(nti), str(dpl), "--mask", f"circle={scene / 'circle.png'}",
                 "--mask", f"square={scene / 'square.png'}", "--out", str(scene / "loc.png")]) == 0
    table = capsys.readouterr().out
    assert table.count("| nti nti") == 2 and table.count("| dpl dpl") == 2
    assert (scene / "loc.png").is_file()
    assert main(["localisation", str(nti), "--mask", f"tree={scene / 'circle.png'}"]) == 2
    assert "no word 'tree'" in capsys.readouterr().err
