"""Decoding and checking one encoded image: the pixel-level half of the pre-flight scan.

Everything here works on the encoded bytes, so the scan and the training-time reopen (`open_image`) run the
same code and a sample that passed the scan decodes the same way later.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

# Modes holding one channel of more than 8 bits. PIL's own convert("L"/"RGB") clips these at 255 (a 16-bit
# PNG comes out nearly white), so they are rescaled by hand in `_gray_to_8bit`.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Modes carrying an alpha channel: composited on white, as a transparent icon is meant to be seen.
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
# EXIF orientations 5-8 rotate by 90 degrees, so the stored width and height swap.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class BadImage(Exception):
    """A sample the scan must drop. str() is "category: detail"; the category groups the summary counts."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category


@dataclass(frozen=True)
class ImageInfo:
    """What the scan keeps of an image: its size as trained (after EXIF transpose) and how it is converted."""

    size: tuple[int, int]
    conversion: str | None  # e.g. "mode P -> RGB"; None when the image is plain RGB already


@contextlib.contextmanager
def strict_truncation() -> Iterator[None]:
    """Make Pillow raise on truncated files for the scan, whatever another library set globally.

    Some libraries set `ImageFile.LOAD_TRUNCATED_IMAGES = True`, after which a half-downloaded JPEG loads
    silently with a grey bottom; the scan must see those.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open_loaded(data: bytes) -> Image.Image:
    """Open and fully decode `data`, turning every Pillow failure into a BadImage with a category."""
    if not data:
        raise BadImage("empty file", "0 bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image", "Pillow cannot identify it (corrupt, or not an image file)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage("too large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder error means the file is unusable
        raise BadImage("corrupt image", f"{type(exc).__name__}: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Exception as exc:  # noqa: BLE001
        category = "truncated image" if "truncated" in str(exc).lower() else "corrupt image"
        raise BadImage(category, f"decoding failed: {type(exc).__name__}: {exc}") from None
    return image


def _verify(data: bytes) -> None:
    """Pillow's verify(): checks what decoding alone does not (PNG chunk CRCs). Needs its own open."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).verify()
    except UnidentifiedImageError:
        raise BadImage("not an image", "Pillow cannot identify it (corrupt, or not an image file)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage("too large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise BadImage("corrupt image", f"verify failed: {type(exc).__name__}: {exc}") from None


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1 when absent or unreadable: a broken EXIF block should not drop the image)."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001
        return 1


def conversion_label(image: Image.Image) -> str | None:
    """How `to_rgb` changes this image, for the scan report; None when nothing changes."""
    has_transparency = image.mode in _ALPHA_MODES or "transparency" in image.info
    if image.mode == "RGB" and not has_transparency:
        return None
    label = f"mode {image.mode} -> RGB"
    if has_transparency:
        label += " on white"
    if image.mode in _WIDE_GRAY_MODES:
        label += " (scaled to 8 bits)"
    return label


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """Rescale a 16-bit / 32-bit / float grayscale image to 8 bits (PIL's convert would clip at 255).

    I;16*: full 16-bit range, divided by 257 (65535 -> 255). I: 16-bit PNGs open as I in some Pillow versions,
    so values above 255 are taken as 16-bit; otherwise kept. F: [0, 1] floats are scaled by 255, else clipped.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        values = values / 257.0
    elif image.mode == "I":
        values = np.clip(values, 0, 65535) / 257.0 if values.max(initial=0) > 255 else values
    elif values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    gray = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray)  # 2-D uint8 -> mode L


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: wide grayscale rescaled, transparency composited on white, the rest converted."""
    if image.mode in _WIDE_GRAY_MODES:
        return _gray_to_8bit(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Palette images with Transparency ... should be converted"
            rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def inspect_image(data: bytes) -> ImageInfo:
    """Check one encoded image the way training will use it; raise BadImage if it cannot be trained on.

    verify() and a full decode both run (each catches failures the other misses), then the conversion to RGB
    is tried for odd modes, so a sample that passes here will decode at training time.
    """
    if not data:
        raise BadImage("empty file", "0 bytes")
    _verify(data)
    image = _open_loaded(data)
    width, height = image.size
    if _orientation(image) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    label = conversion_label(image)
    if label is not None:
        try:
            to_rgb(image)
        except Exception as exc:  # noqa: BLE001
            raise BadImage("unsupported mode", f"cannot convert mode {image.mode} to RGB: {exc}") from None
    return ImageInfo(size=(width, height), conversion=label)


def decode_rgb(data: bytes) -> Image.Image:
    """Decode `data` as trained: EXIF-transposed RGB. Raises BadImage if it does not decode."""
    image = _open_loaded(data)
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)
