"""Support masks and ground truths read by data/io's reader: a cut-off mask file is a one-line error naming it
(`svfseg predict` and the serve uploads alike); 16-bit, palette and colour masks read as they always were."""
import numpy as np
import pytest
from PIL import Image

from conftest import error_line
from svfseg.cli import main
from svfseg.data.io import DataError, read_image, read_mask
from svfseg.predict import read_binary_mask, read_mask_array
from svfseg.serve.classes import mask_classes
from svfseg.serve.inputs import (ServeError, SupportSlot, check_queries, read_ground_truth,
                                 read_supports)

H, W = 40, 48


def _blob() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - 20) ** 2 + (xx - 24) ** 2) < 11 ** 2


@pytest.fixture
def files(tmp_path):
    """An RGB image, its 0/255 mask, and the mask cut off before its IEND chunk and in the middle of its pixels."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    Image.fromarray(_blob().astype(np.uint8) * 255).save(tmp_path / "m.png")
    data = (tmp_path / "m.png").read_bytes()
    (tmp_path / "noend.png").write_bytes(data[:-12])  # the pixels all there, the file's end missing
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    return tmp_path


@pytest.mark.parametrize("cut", ["noend.png", "half.png"])
def test_predict_refuses_a_cut_off_mask_naming_it(files, cut, capsys):
    # Every input is read before the checkpoint is loaded: the missing checkpoint is never reached.
    out = files / "out"
    assert main(["predict", "--checkpoint", str(files / "missing.pt"), "--support", str(files / "s.png"),
                 str(files / cut), "--query", str(files / "s.png"), "--out", str(out)]) == 1
    line = error_line(capsys, "predict")
    assert f"{files / cut}: cannot read it as a mask image (expected a complete image, found a truncated PNG" in line
    assert not out.exists()


@pytest.mark.parametrize("cut", ["noend.png", "half.png"])
def test_serve_refuses_a_cut_off_mask_naming_it(files, cut):
    with pytest.raises(ServeError, match=rf"support 1 mask \({cut}\): cannot read it as a mask image \(expected a "
                                         rf"complete image, found a truncated PNG") as e:
        read_supports([SupportSlot(str(files / "s.png"), str(files / cut))])
    assert "\n" not in str(e.value) and str(files) not in str(e.value)  # the name the user knows, not the temp path
    (files / "s_gt.png").write_bytes((files / cut).read_bytes())
    with pytest.raises(ServeError, match=r"ground truth of s \(s_gt.png\): cannot read it as a mask image .*"
                                         r"truncated PNG"):
        read_ground_truth([str(files / "s_gt.png")], check_queries([str(files / "s.png")]))
    assert mask_classes(str(files / cut)) == []  # the picker stays hidden; Run says what is wrong
    with pytest.raises(DataError, match=rf"{cut}: expected a complete image, found a truncated PNG"):
        read_mask(files / cut)


def test_16_bit_palette_colour_and_rotated_masks_read_as_stored(tmp_path):
    blob = _blob()
    # 16-bit: the stored values, not scaled to 8 bits (an image would be)
    Image.fromarray(blob.astype(np.uint16) * 1000).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")
    assert sorted(np.unique(read_mask(tmp_path / "m16.png")).tolist()) == [0, 1000]
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "m16.png", mask_class=1000), blob)
    Image.fromarray(blob.astype(np.uint16)).save(tmp_path / "m16_01.png")
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "m16_01.png"), blob)
    # a 16-bit binary mask at full scale (0/65535): PNG (I;16) and big-endian TIFF (I;16B), read as stored
    Image.fromarray(blob.astype(np.uint16) * 65535).save(tmp_path / "m16_full.png")
    big_endian = (blob.astype(np.uint16) * 65535).astype(">u2")
    Image.frombytes("I;16B", (W, H), big_endian.tobytes()).save(tmp_path / "m16_full.tif")
    for name in ("m16_full.png", "m16_full.tif"):
        assert sorted(np.unique(read_mask(tmp_path / name)).tolist()) == [0, 65535], name
        np.testing.assert_array_equal(read_binary_mask(tmp_path / name), blob)
    # palette: the indices, not the colours (index 1 is dark red, luminance 38)
    pal = Image.fromarray(blob.astype(np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "pal.png"), blob.astype(np.int64))
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "pal.png"), blob)
    # colour: luminance (white 255, pure red 76)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[blob] = 255
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    lum = read_mask(tmp_path / "rgb.png")
    assert lum.dtype == np.int64 and lum[0, 0] == 76 and (lum[blob] == 255).all()
    # a mask is never rotated by an EXIF orientation (an image is): it is the image's pixels as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(blob.astype(np.uint8) * 255).save(tmp_path / "rot.png", exif=exif)
    np.testing.assert_array_equal(read_mask(tmp_path / "rot.png"), blob.astype(np.int64) * 255)
    # predict's reader and the serve uploads say the same as data/io
    for name in ("m16.png", "pal.png", "rgb.png", "rot.png"):
        np.testing.assert_array_equal(read_mask_array(tmp_path / name), read_mask(tmp_path / name))
    _, masks = read_supports([SupportSlot(str(tmp_path / "rgb.png"), str(tmp_path / "m16_01.png"))])
    np.testing.assert_array_equal(masks[0], blob)


def test_sizes_are_width_x_height_in_predict_and_serve(tmp_path, capsys):
    # A 112-wide, 86-high image (as every image viewer calls it) and a 60-wide, 40-high mask: numpy's (H, W)
    # order would say "40x60" and "86x112", the transposed sizes.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (86, 112, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    small = np.zeros((40, 60), np.uint8)
    small[10:30, 10:50] = 255
    Image.fromarray(small).save(tmp_path / "m.png")
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), "--support", str(tmp_path / "s.png"),
                 str(tmp_path / "m.png"), "--query", str(tmp_path / "s.png"), "--out", str(tmp_path / "out")]) == 1
    line = error_line(capsys, "predict")
    assert f"{tmp_path / 'm.png'}: mask is 60x40 but its support image is 112x86 (width x height)" in line
    with pytest.raises(ServeError, match=r"support 1 mask \(m.png\): mask is 60x40 but its support image is 112x86 "
                                         r"\(width x height\)"):
        read_supports([SupportSlot(str(tmp_path / "s.png"), str(tmp_path / "m.png"))])


def test_a_file_that_is_no_image_is_one_plain_line(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"not an image")
    for read, what in ((read_mask, "a mask image file"), (read_image, "an RGB image file")):
        with pytest.raises(DataError) as e:
            read(tmp_path / "notes.png")
        assert str(e.value) == (f"{tmp_path / 'notes.png'}: expected {what}, found a file that cannot be decoded as "
                                f"an image")
