import numpy as np
import pytest
import torch
from PIL import Image

from dpl_edit import ImageLoadError, load_image
from dpl_edit.images import to_pil, to_tensor


def _save(tmp_path, image, name="x.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_crop_takes_the_centre_square(tmp_path):
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, 100:200] = 255  # white centre square, black sides
    image = load_image(_save(tmp_path, Image.fromarray(array)), 64, fit="crop")
    assert image.size == (64, 64) and np.asarray(image).min() > 240


def nti_load_512(path, size=512):
    """Null-text inversion's load_512 (no margins), from its description: the centre square of the
    array, PIL's default resize."""
    image = np.array(Image.open(path))[:, :, :3]
    h, w, _ = image.shape
    if h < w:
        image = image[:, (w - h) // 2 : (w - h) // 2 + h]
    elif w < h:
        image = image[(h - w) // 2 : (h - w) // 2 + w]
    return np.array(Image.fromarray(image).resize((size, size)))


@pytest.mark.parametrize("shape", [(300, 517, 3), (517, 300, 3), (512, 512, 3), (1024, 1024, 3)])
def test_crop_and_resize_equal_nti_s_and_the_dpl_authors_loaders(tmp_path, shape):
    """fit="crop" is null-text inversion's load_512 and fit="resize" the DPL authors' plain resize
    (Image.open(...).convert("RGB").resize((512, 512))), pixel for pixel, at SD's 512."""
    array = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    path = _save(tmp_path, Image.fromarray(array))
    assert np.array_equal(np.asarray(load_image(path, 512, fit="crop")), nti_load_512(path))
    authors = np.asarray(Image.open(path).convert("RGB").resize((512, 512)))
    assert np.array_equal(np.asarray(load_image(path, 512, fit="resize")), authors)


def test_resize_stretches_and_pad_letterboxes(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (200, 100), (0, 0, 0)))
    assert np.asarray(load_image(path, 64, fit="resize")).max() == 0
    padded = np.asarray(load_image(path, 64, fit="pad"))
    assert padded[0, 32].min() == 255 and padded[32, 32].max() == 0


def test_modes_and_exif_orientation(tmp_path):
    for mode in ("L", "P", "RGBA", "I;16", "CMYK"):
        image = Image.new(mode, (40, 30))
        assert load_image(_save(tmp_path, image, f"m.{'tif' if mode == 'CMYK' else 'png'}"), 32).mode == "RGB"
    # 16-bit greyscale keeps its brightness: full scale is 65535, whatever the image's own maximum
    for mode in ("I;16", "I"):
        dark = Image.fromarray(np.array([[0, 32896], [4112, 8224]], dtype=np.uint16 if mode == "I;16" else np.int32))
        assert dark.mode == mode
        read = np.asarray(load_image(_save(tmp_path, dark, f"g.{'png' if mode == 'I;16' else 'tif'}"), 2))
        assert read[..., 0].tolist() == [[0, 128], [16, 32]] and (read == read[..., :1]).all()
    # float greyscale (a 32-bit TIFF): 0-1 as numpy and skimage write it, 0-255 once a value exceeds 1
    for values, want in (([[0, 0.5], [0.0625, 1]], [[0, 128], [16, 255]]), ([[0, 128], [16, 300]], [[0, 128], [16, 255]])):
        read = np.asarray(load_image(_save(tmp_path, Image.fromarray(np.array(values, np.float32)), "f.tif"), 2))
        assert read[..., 0].tolist() == want
    tall = Image.new("RGB", (20, 40), (255, 0, 0))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = _save(tmp_path, tall, "r.jpg", exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (20, 40)
    assert load_image(path, 32, fit="pad").getpixel((16, 2)) == (255, 255, 255)  # now wide: padded top


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(tmp_path / "bad.png", 32)
    with pytest.raises(ImageLoadError, match="No image file"):
        load_image(tmp_path / "none.png", 32)
    with pytest.raises(ImageLoadError, match="Unknown fit"):
        load_image(tmp_path / "bad.png", 32, fit="squash")


def test_an_image_too_large_to_open_is_said(tmp_path, monkeypatch):
    """PIL refuses to decode an image of over twice MAX_IMAGE_PIXELS (about 179 megapixels)."""
    path = _save(tmp_path, Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="is too large to open safely"):
        load_image(path, 32)


def test_a_mask_is_made_square_as_its_image_was(tmp_path):
    """``load_mask`` crops, stretches or pads (with background) a non-square mask as ``--fit`` did the
    image, at the mask's own resolution."""
    from dpl_edit.localisation import load_mask

    array = np.zeros((4, 6), dtype=np.uint8)  # 6 wide, 4 high; the object is columns 2-3
    array[:, 2:4] = 255
    path = _save(tmp_path, Image.fromarray(array))
    crop = load_mask(path, "crop")
    assert crop.shape == (4, 4) and crop[:, 1:3].all() and not crop[:, [0, 3]].any()
    pad = load_mask(path, "pad")
    assert pad.shape == (6, 6) and pad[1:5, 2:4].all() and pad.sum() == 8
    assert load_mask(path, "resize").shape == (6, 6) and load_mask(path, "resize")[:, 2:4].all()


def test_masks_of_0_and_1_16_bit_masks_and_empty_masks(tmp_path):
    """A 0/1 mask (a boolean array saved with PIL) and a 16-bit one read as the 0/255 mask; a mask
    with no object, or none left after the crop, is an error rather than an IoU of 0."""
    from dpl_edit.localisation import load_mask

    array = np.zeros((4, 6), dtype=np.uint8)
    array[1:3, 2:4] = 1
    want = load_mask(_save(tmp_path, Image.fromarray(array * 255), "white.png"))
    assert want.sum() == 4
    assert torch.equal(load_mask(_save(tmp_path, Image.fromarray(array), "ones.png")), want)
    assert torch.equal(load_mask(_save(tmp_path, Image.fromarray(array.astype(bool)), "bool.png")), want)
    assert torch.equal(load_mask(_save(tmp_path, Image.fromarray(array.astype(np.uint16) * 65535), "16.png")), want)
    # a cut-out (the object opaque in any colour, the rest transparent) is its opaque pixels; an
    # opaque RGBA mask is read by its brightness
    cutout = np.zeros((4, 6, 4), dtype=np.uint8)
    cutout[1:3, 2:4] = (30, 60, 200, 255)
    assert torch.equal(load_mask(_save(tmp_path, Image.fromarray(cutout, "RGBA"), "cutout.png")), want)
    opaque = np.dstack([array * 255] * 3 + [np.full_like(array, 255)])
    assert torch.equal(load_mask(_save(tmp_path, Image.fromarray(opaque, "RGBA"), "opaque.png")), want)
    grey_cutout = np.dstack([np.full_like(array, 40), array * 255])
    assert torch.equal(load_mask(_save(tmp_path, Image.fromarray(grey_cutout, "LA"), "la.png")), want)
    with pytest.raises(ImageLoadError, match="no object pixels"):
        load_mask(_save(tmp_path, Image.fromarray(np.zeros((4, 6), dtype=np.uint8)), "empty.png"))
    side = np.zeros((4, 8), dtype=np.uint8)
    side[:, 0] = 255  # the object is outside the centred square
    with pytest.raises(ImageLoadError, match="no object pixels in the centred square"):
        load_mask(_save(tmp_path, Image.fromarray(side), "side.png"), "crop")
    assert load_mask(tmp_path / "side.png", "pad").sum() == 4


def test_tensor_round_trip():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    tensor = to_tensor(image)
    assert tensor.shape == (1, 3, 8, 8) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(to_pil(tensor)), np.asarray(image))


def test_invert_reads_pil_images_of_any_mode_and_numpy_pictures_as_a_file_is_read(model, image, tmp_path):
    """The Python API takes what the command line reads from a file the same way: an RGBA image's
    transparency on white (not PIL's convert, which leaves it black), a 16-bit image from its full
    scale, numpy pictures uint8 or float 0-1; the source kept is RGB, so it saves as PNG."""
    from dpl_edit import invert
    from dpl_edit.images import from_array

    rgb = to_pil(image)
    half = Image.fromarray(np.concatenate([np.asarray(rgb), np.full((128, 128, 1), 0, np.uint8)], axis=2))
    half.putpixel((0, 0), (10, 20, 30, 255))
    half.save(tmp_path / "cut-out.png")
    read = load_image(tmp_path / "cut-out.png", 128)
    assert read.getpixel((5, 5)) == (255, 255, 255) and read.getpixel((0, 0)) == (10, 20, 30)
    array, grey = np.asarray(rgb), np.asarray(rgb)[..., 0]
    for given, expected in ((half, read), (array, rgb), (array / 255.0, rgb),
                            (grey, Image.fromarray(np.stack([grey] * 3, axis=2)))):
        inversion = invert(model, given, "a cat", method="ddim", num_steps=1, progress=False)
        assert inversion.source_image.mode == "RGB" and inversion.source_image.tobytes() == expected.tobytes()
    inversion.save(tmp_path / "inv")
    assert from_array(np.full((4, 4, 3), 2.0)).getpixel((0, 0)) == (2, 2, 2)  # above 1: read as 0-255
    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.int64), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageLoadError, match="Expected a picture as a numpy array of shape"):
            from_array(bad)
