"""load_image: every common mode becomes RGB (or L) correctly; broken files are errors naming the file."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from densenet.data.images import load_image
from densenet.errors import DenseNetError


def _rgb(path, size=(12, 10)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _jpeg_bytes(size=(64, 48)):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_rgb_round_trips_exactly(tmp_path):
    path = _rgb(tmp_path / "a.png")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (12, 10)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(path)))


def test_grayscale_becomes_three_equal_channels_or_stays_l(tmp_path):
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10) * 3
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    assert rgb.shape == (8, 10, 3) and all(np.array_equal(rgb[..., c], gray) for c in range(3))
    img = load_image(tmp_path / "g.png", mode="L")
    assert img.mode == "L" and np.array_equal(np.asarray(img), gray)


def test_one_bit_image(tmp_path):
    Image.fromarray(np.eye(6, dtype=bool)).save(tmp_path / "b.png")
    rgb = np.asarray(load_image(tmp_path / "b.png"))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16_bit_is_scaled_not_clipped(tmp_path, ext):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(values).save(tmp_path / f"deep.{ext}")
    assert Image.open(tmp_path / f"deep.{ext}").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / f"deep.{ext}"))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]  # Image.convert would clip: [0, 255, 255, 255]
    assert np.asarray(load_image(tmp_path / f"deep.{ext}", mode="L"))[0].tolist() == [0, 1, 128, 255]


def test_32_bit_integer_and_float_images(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    assert np.asarray(load_image(tmp_path / "i.tif", mode="L")).tolist() == [[0, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif", mode="L")).tolist() == [[0, 128, 255]]


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red stays red
    rgba[0, 1] = [0, 0, 0, 0]  # transparent black becomes white, not black
    rgba[1, 0] = [0, 0, 255, 128]  # half-transparent blue is blended with white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    rgb = np.asarray(load_image(tmp_path / "t.png")).astype(int)
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert np.abs(rgb[1, 0] - [127, 127, 255]).max() <= 1
    Image.fromarray(np.array([[[0, 0], [200, 255]]], dtype=np.uint8), mode="LA").save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png", mode="L")).tolist() == [[255, 200]]


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 0]]]
    pal.save(tmp_path / "pt.png", transparency=2)  # colour 2 (black) is transparent: shown as white
    assert np.asarray(load_image(tmp_path / "pt.png")).tolist() == [[[255, 0, 0], [0, 255, 0], [255, 255, 255]]]
    pal.save(tmp_path / "pt.gif", transparency=2)
    assert np.asarray(load_image(tmp_path / "pt.gif"))[0, 2].tolist() == [255, 255, 255]


def test_cmyk_jpeg_and_tiff(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "c.jpg", quality=100)
    cmyk.save(tmp_path / "c.tif")
    for name in ("c.jpg", "c.tif"):
        rgb = np.asarray(load_image(tmp_path / name)).astype(int)
        assert rgb.shape == (4, 4, 3) and np.abs(rgb - [255, 0, 0]).max() <= 3, name


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (2, 4)


def test_the_file_is_read_in_full_and_closed(tmp_path):
    path = _rgb(tmp_path / "a.jpg")
    expected = np.asarray(Image.open(path).convert("RGB"))
    img = load_image(path)
    if Path("/proc/self/fd").is_dir():  # closed: no descriptor of this process is left on the file
        fds = Path("/proc/self/fd")
        assert not [fd for fd in fds.iterdir() if os.path.realpath(fd) == os.path.realpath(path)]
    # Read in full: the file's bytes replaced in place (same inode, so a lazy image's open descriptor would now
    # read garbage, where an unlinked file would have stayed readable) change nothing.
    path.write_bytes(b"\xff\xd8 not a jpeg any more" * 10)
    assert np.array_equal(np.asarray(img), expected)


def test_truncated_jpeg_is_an_error_at_read_time(tmp_path):
    data = _jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DenseNetError, match=r"cannot read image .*cut\.jpg: truncated JPEG"):
        load_image(tmp_path / "cut.jpg")


def test_truncation_is_detected_even_if_another_library_allowed_it(tmp_path, monkeypatch):
    data = _jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DenseNetError, match="truncated JPEG"):
        load_image(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_densenet_never_sets_load_truncated_images():
    import densenet  # noqa: F401
    import densenet.data.images  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path):
    path = _rgb(tmp_path / "cut.png", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DenseNetError, match=r"cannot read image .*cut\.png: (truncated|damaged)"):
        load_image(path)


@pytest.mark.parametrize("case, content, reason", [
    ("text.png", b"this is not an image\n", "not an image file"),
    ("empty.jpg", b"", r"empty file \(0 bytes\)"),
    ("garbage.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 40, "(truncated|damaged)"),
])
def test_broken_files_name_the_file_and_the_cause(tmp_path, case, content, reason):
    (tmp_path / case).write_bytes(content)
    with pytest.raises(DenseNetError, match=rf"^cannot read image .*{case.replace('.', '[.]')}: {reason}"):
        load_image(tmp_path / case)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DenseNetError, match=r"cannot read image .*nope\.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DenseNetError, match=r"cannot read image .*dir\.png: it is a folder"):
        load_image(tmp_path / "dir.png")


def test_bad_mode_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        load_image(_rgb(tmp_path / "a.png"), mode="CMYK")
