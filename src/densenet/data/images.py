"""Reading one image file, whatever its mode, or failing with a message that names the file.

``load_image(path)`` returns a fully decoded ``PIL.Image.Image`` in mode RGB (or L when asked), so a
data set, ``densenet predict`` and the tests all see the same pixels:

- grayscale (L, 1) is replicated to three channels; 16-bit images (I;16, I, from 16-bit PNG/TIFF) are
  scaled to 8 bits (v * 255 / 65535, rounded), not clipped at 255 as ``Image.convert`` would;
  32-bit float (F) is read as 0..1 when its maximum is at most 1, else as 0..255;
- images with transparency (RGBA, LA, PA, palette with a transparent colour) are composited on white:
  what a viewer shows on a white page. Dropping alpha instead would expose whatever colour the
  transparent pixels happen to store, often black, so a logo on a transparent background would become
  a logo on black;
- CMYK (and YCbCr, LAB, HSV) go through Pillow's conversion to RGB;
- the EXIF orientation tag is applied, so a phone photo is upright as viewers show it;
- a multi-frame file (GIF, TIFF) gives its first frame.

The image is decoded in full here (``Image.load``), with Pillow's ``LOAD_TRUNCATED_IMAGES`` off while
it does, so a truncated JPEG is an error at read time, not a grey band fed silently to the network.
A missing file, a folder, a 0-byte file, a text file named .png or a truncated file raise
``DenseNetError("cannot read image PATH: REASON")``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from densenet.errors import DenseNetError
from densenet.files import printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_WHITE = {"RGB": (255, 255, 255), "L": 255}


def load_image(path: str | os.PathLike, mode: Literal["RGB", "L"] = "RGB") -> Image.Image:
    """The image at ``path``, decoded in full and converted to ``mode`` ("RGB", or "L" for grayscale)."""
    if mode not in _WHITE:
        raise ValueError(f"load_image mode must be 'RGB' or 'L', not {mode!r}")
    path = Path(path)
    _check_file(path)
    try:
        with _strict_truncation(), _quiet_pillow(), Image.open(path) as img:
            img.load()
            img = _upright(img)
            return _convert(img, mode)
    except UnidentifiedImageError as exc:
        kind = _format_name(path)
        if kind in ("JPEG", "PNG"):  # the right magic bytes, then garbage
            raise _error(path, f"damaged {kind} (its header cannot be decoded)") from exc
        raise _error(path, f"not an image file (Pillow cannot identify its format; is it really a "
                           f"{path.suffix or 'image'} file?)") from exc
    except Image.DecompressionBombError as exc:
        raise _error(path, f"too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow's decoders report a damaged file with any of these, depending on the format.
        raise _error(path, _reason(path, exc)) from exc


def _check_file(path: Path) -> None:
    """The common ways a path is not an image, named before Pillow gives a vaguer message."""
    if path.is_dir():
        raise _error(path, "it is a folder, not an image file")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except OSError as exc:
        raise _error(path, exc.strerror or str(exc)) from None
    if size == 0:
        raise _error(path, "empty file (0 bytes)")


def _error(path: Path, reason: str) -> DenseNetError:
    return DenseNetError(f"cannot read image {printable(path)}: {reason}")


def _reason(path: Path, exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, PermissionError):
        return "permission denied"
    kind = _format_name(path)
    if "truncated" in detail.lower() or isinstance(exc, EOFError):
        return f"truncated {kind} ({detail})"
    return f"damaged or unsupported {kind} ({detail})"


def _format_name(path: Path) -> str:
    """The file's real format from its first bytes (a .png may hold a JPEG), else its extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head.startswith(b"\x89PNG"):
        return "PNG"
    return path.suffix.lstrip(".").upper() + " file" if path.suffix else "image"


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Pillow fills a truncated image with grey when LOAD_TRUNCATED_IMAGES is set (some libraries set it)."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


@contextlib.contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Pillow's warnings say nothing a user can act on once the image decodes: a large image "could be
    decompression bomb DOS attack" (below twice the limit; above it, it is an error we report), corrupt EXIF
    (the pixels are kept as stored), palette transparency "should be converted to RGBA" (we convert it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):  # a broken EXIF block: keep the pixels as stored
        return img


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode``: 16-bit and float scaled to 8 bits, transparency composited on white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:  # a single transparent colour (tRNS)
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    out = img.convert(mode)
    return out if out is not img else img.copy()


def _to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel 16-bit, 32-bit integer or float image as 8-bit L, scaled rather than clipped."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        values = np.nan_to_num(values) * scale
    else:  # I;16* and I (Pillow's mode for 16-bit PNG/TIFF): the 16-bit range maps onto 0..255
        values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
