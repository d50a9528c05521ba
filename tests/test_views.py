"""Attention views, the localisation curve, and `dpl invert --method dpl` / `dpl attention` / `dpl localisation`."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from dpl_edit.cli import main
from dpl_edit.localisation import attention_shares, best_iou, iou_curve, mean_iou
from dpl_edit.tokenizer import clip_tokenizer
from dpl_edit.views import inversion_words


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


def _two_objects():
    own, other = torch.zeros(64, 64, dtype=torch.bool), torch.zeros(64, 64, dtype=torch.bool)
    own[8:24, 8:24] = True  # 256 px
    other[36:60, 32:56] = True  # 576 px
    return own, other


def test_attention_shares_on_constructed_maps():
    own, other = _two_objects()
    on_other = torch.zeros(16, 16)
    on_other[10:14, 9:13] = 1.0  # inside the other object's 16x16 cells, away from its edge
    assert attention_shares(on_other, [own, other]).tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    uniform = attention_shares(torch.ones(16, 16), [own, other])
    assert uniform.tolist() == pytest.approx([256 / 4096, 576 / 4096, 1 - 832 / 4096], abs=1e-6)


def test_best_iou_tells_a_map_on_its_object_from_a_map_elsewhere():
    own, _ = _two_objects()
    on_own = torch.zeros(16, 16)
    on_own[2:6, 2:6] = 1.0
    on_other = torch.zeros(16, 16)
    on_other[9:15, 8:14] = 1.0
    area = own.float().mean().item()
    assert best_iou(iou_curve(on_own, own)) > 0.7 > 5 * area
    assert best_iou(iou_curve(on_other, own)) < 0.01 and mean_iou(iou_curve(on_other, own)) < 0.01
    assert iou_curve(on_other, own)[0] == pytest.approx(area)  # threshold 0.0: the trivial end, left out


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


def test_dpl_invert_attention_and_localisation_commands(scene, capsys, caplog):
    common = ["--model", "tiny", "--steps", "3", "--quiet"]
    dpl, nti = scene / "dpl", scene / "nti"
    assert main(["invert", str(scene / "scene.png"), "--prompt", "a {circle} and a {square} on grass",
                 "--method", "dpl", "--dpl-iterations", "2", "--out", str(dpl), *common]) == 0
    printed = capsys.readouterr().out + caplog.text
    # the saturation summary, once: as the warning where most steps ran to the cap, else printed
    assert printed.count("steps at the 2-iteration cap; last step L_at") == 1, printed
    assert main(["invert", str(scene / "scene.png"), "--prompt", "a circle and a square on grass",
                 "--out", str(nti), *common]) == 0
    assert main(["attention", str(dpl), "--compare", str(nti)]) == 0
    for name in ("attention_words.png", "attention_background.png", "attention_comparison.png", "dpl_log.png"):
        with Image.open(dpl / name) as image:
            assert image.size[0] > 100
    assert main(["attention", str(nti), "--quiet"]) == 0
    assert (nti / "attention_words.png").is_file()
    capsys.readouterr()
    assert main(["localisation", str(nti), str(dpl), "--mask", f"circle={scene / 'circle.png'}",
                 "--mask", f"square={scene / 'square.png'}", "--out", str(scene / "loc.png")]) == 0
    table = capsys.readouterr().out
    assert table.count("| nti nti") == 2 and table.count("| dpl dpl") == 2
    assert "mass on own mask" in table and "best IoU 0.1-1" in table
    assert (scene / "loc.png").is_file()
    # masks of a wider picture whose centre square was inverted (--fit crop): the same numbers
    for word in ("circle", "square"):
        mask = Image.open(scene / f"{word}.png").convert("L")
        wide = Image.new("L", (mask.width + 40, mask.height), 0)
        wide.paste(mask, (20, 0))
        wide.save(scene / f"{word}_wide.png")
    assert main(["localisation", str(nti), str(dpl), "--mask", f"circle={scene / 'circle_wide.png'}",
                 "--mask", f"square={scene / 'square_wide.png'}", "--out", str(scene / "loc.png")]) == 0
    assert capsys.readouterr().out == table
    assert main(["localisation", str(nti), "--mask", f"circle={scene / 'circle.png'}", "--out",
                 str(scene / "loc.png")]) == 0  # one mask: no other mask to hold any mass
    assert "| nti nti circle | " in (alone := capsys.readouterr().out) and " | - | " in alone and "nan" not in alone
    assert main(["localisation", str(nti), "--mask", f"tree={scene / 'circle.png'}"]) == 2
    assert "no word 'tree'" in capsys.readouterr().err
    # views that cannot be drawn are one error line: another prompt to compare with, an image lost
    other = scene / "other"
    assert main(["invert", str(scene / "scene.png"), "--prompt", "a circle beside a square", "--method", "ddim",
                 "--out", str(other), *common]) == 0
    assert main(["attention", str(dpl), "--compare", str(other), "--out", str(scene / "views")]) == 2
    assert "different prompts ('a circle beside a square' vs 'a {circle} and a {square} on grass')" in \
        capsys.readouterr().err
    (nti / "source.png").unlink()
    assert main(["attention", str(nti)]) == 2
    assert "has no source.png; invert the image again" in capsys.readouterr().err


def test_the_words_shown_are_whole_words_and_a_repeated_one_is_named_by_its_occurrence():
    """An NTI inversion's rows are the prompt's whole words (a word of two tokens is one row), a
    DPL inversion's its learned words; a word shown twice is named word@N as --blend names it (the
    N-th whole-word occurrence in the prompt), or by its tokens where they do not spell it."""
    tokenizer = clip_tokenizer()

    def shown(prompt, words=()):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids[1:-1])
        return inversion_words(SimpleNamespace(prompt_tokens=tokens, words=[
            {"word": word, "positions": positions} for word, positions in words]))

    assert shown("a purple rectangle and a yellow rectangle on brick") == [
        ("a@1", [1]), ("purple", [2]), ("rectangle@1", [3, 4]), ("and", [5]), ("a@2", [6]), ("yellow", [7]),
        ("rectangle@2", [8, 9]), ("on", [10]), ("brick", [11])]
    assert shown("a square, a red square and a square", [("square", [6]), ("Square", [9])]) == [
        ("square@2", [6]), ("Square@3", [9])]  # the first square is not learned: still counted
    assert shown("a teddy bear and a teddy bear", [("teddy bear", [2, 3]), ("teddy bear", [6, 7])]) == [
        ("teddy bear@1", [2, 3]), ("teddy bear@2", [6, 7])]
    assert shown("a cat and a dog", [("cat", [2]), ("dog", [5])]) == [("cat", [2]), ("dog", [5])]
    assert shown("a square and a square", [("square", [1]), ("square", [5])]) == [
        ("square (token 1)", [1]), ("square@2", [5])]  # positions that do not spell the word


def test_localisation_names_a_repeated_word_by_its_occurrence(scene, capsys):
    folder = scene / "twice"
    assert main(["invert", str(scene / "scene.png"), "--prompt", "a red square and a blue square", "--method", "ddim",
                 "--model", "tiny", "--steps", "2", "--quiet", "--out", str(folder)]) == 0
    capsys.readouterr()
    assert main(["localisation", str(folder), "--mask", f"square={scene / 'square.png'}"]) == 2
    assert "'square' is in its prompt 'a red square and a blue square' more than once; name the one the mask is " \
        "of (square@1, square@2)" in capsys.readouterr().err
    out = scene / "twice.png"
    assert main(["localisation", str(folder), "--mask", f"square@2={scene / 'square.png'}",
                 "--mask", f"square@1={scene / 'circle.png'}", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| twice ddim square@2 | " in table and "| twice ddim square@1 | " in table
    assert main(["localisation", str(folder), "--mask", f"tree={scene / 'circle.png'}", "--out", str(out)]) == 2
    assert "its words: a@1, red, square@1, and, a@2, blue, square@2" in capsys.readouterr().err


def test_edit_grid_draws_each_target_s_edited_words_and_leaves_no_empty_frames(image):
    """Columns: source, reconstruction, edit, then the target's edited words' maps; a row with fewer
    edited words than the widest leaves the rest blank, and a target that edits nothing (the
    source again) adds no column."""
    from dpl_edit import edit, invert
    from dpl_edit.images import to_pil
    from dpl_edit.random_models import tiny_model
    from dpl_edit.views import edit_grid

    model = tiny_model(seed=0)
    inversion = invert(model, to_pil(image), "a cat and a dog", method="ddim", num_steps=2, progress=False)
    result = edit(model, inversion, ["a cat and a dog", "a cat and a tiger", "a lion and a tiger"], progress=False)
    axes = edit_grid(result, inversion.source_image).axes
    assert len(axes) == 3 * 5
    shown = [[ax.axison for ax in axes[5 * row : 5 * row + 5]] for row in range(3)]
    assert shown == [[True] * 3 + [False] * 2, [True] * 4 + [False], [True] * 5]
    assert [ax.get_title() for ax in axes[13:15]] == ["lion", "tiger"]
    same = edit(model, inversion, "a cat and a dog", progress=False)
    assert len(edit_grid(same, inversion.source_image).axes) == 3
