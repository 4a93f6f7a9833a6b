"""Decode one image file (path, bytes or file object) into an upright 8-bit RGB PIL image.

Every failure a crawled corpus throws at a loader (missing, empty, corrupt, truncated, not an
image, decompression bomb, unsupported mode) surfaces as one exception type, `ImageLoadError`,
whose message starts with the file's name, so a data job can log it and skip the sample.

Colour rules (`to_rgb`), fixed so that training and inference see the same pixels:
  * RGB is returned unchanged.
  * Anything carrying transparency (RGBA, LA, PA, RGBa, La, P with a `transparency` key or an
    RGBA palette, L with a `transparency` key) is
    alpha-composited onto WHITE. This is HF `MllamaImageProcessor`'s `convert_to_rgb`, our parity
    reference. (Meta's `chat_format` calls plain `Image.convert("RGB")`, which drops alpha and shows
    whatever colour hides under transparent pixels, often black; we do not copy that.)
  * Other 8-bit modes (L, 1, P, CMYK, YCbCr, HSV, ...) use PIL's own conversion, identical to HF's.
    CMYK is converted naively (no ICC colour management, like HF and Meta).
  * 16-bit and 32-bit integer modes (I;16*, I) are read as 16-bit samples, the range Pillow decodes
    16-bit PNG/TIFF/PGM into: clip to [0, 65535], scale by 255/65535, round, grey to RGB.
    PIL's own conversion would clip at 255 and turn nearly every pixel white (so does HF's).
  * Float (F) is read as intensity in [0, 1]: NaN -> 0, clip, scale by 255, round.
EXIF orientation is applied first (`ImageOps.exif_transpose`), so (width, height) is the upright size.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's hard limit at its default settings (2 * Image.MAX_IMAGE_PIXELS = 2 * 89_478_485): beyond it
# PIL raises DecompressionBombError. Kept as our own constant so a library that edits the PIL global
# does not silently change what this loader accepts.
DEFAULT_MAX_PIXELS = 178_956_970

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageLoadError(ValueError):
    """An image could not be loaded. `str(err)` is "<name>: <reason>"."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # keep it picklable across DataLoader / multiprocessing workers
        return (type(self), (self.name, self.reason))


def _source_name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    file_name = getattr(source, "name", None)
    return str(file_name) if file_name is not None else "<file object>"


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """I;16*/I/F -> RGB with the fixed ranges documented in the module docstring."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        grey = np.rint(np.clip(arr, 0.0, 1.0) * 255.0)
    else:
        grey = np.rint(np.clip(arr.astype(np.float64), 0.0, 65535.0) / 257.0)  # 65535 / 257 == 255
    grey = grey.astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB by the module's colour rules (no EXIF handling here).

    Returns `img` itself when it is already RGB, otherwise a new image of the same size.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(img)
    # has_transparency_data also catches P images whose palette carries alpha (no "transparency" key).
    if mode in _ALPHA_MODES or img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Load an image fully into memory, upright (EXIF applied) and in RGB.

    Args:
        source: a path, the encoded bytes (e.g. a webdataset sample's "jpg" field) or a binary
            file object (PIL reads it from the start; it is not closed).
        max_pixels: reject images with width * height above this, checked from the header before
            any pixel is decoded. Values above PIL's own hard limit (2 * `Image.MAX_IMAGE_PIXELS`)
            cannot take effect: PIL refuses those first, and that is reported the same way.
        name: what error messages call the source; defaults to the path, the file object's
            `name`, or "<bytes>".

    Returns:
        PIL image, mode "RGB", independent of the source (the file is closed, bytes not referenced).

    Raises:
        ImageLoadError: missing/unreadable/empty file, unknown format, corrupt or truncated data,
            decompression bomb, or a mode that cannot be converted to RGB.
    """
    label = _source_name(source, name)
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(label, "empty data (0 bytes)")
        fp: str | os.PathLike | BinaryIO = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(os.fsdecode(source))
        try:
            if path.stat().st_size == 0:
                raise ImageLoadError(label, "empty file (0 bytes)")
        except FileNotFoundError:
            raise ImageLoadError(label, "file not found") from None
        except OSError as e:
            raise ImageLoadError(label, f"cannot read file ({e.strerror or e})") from e
        if path.is_dir():
            raise ImageLoadError(label, "is a directory, not an image file")
        fp = path
    else:
        fp = source

    try:
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that; our own limit below decides,
        # so the warning is silenced here rather than left for the caller's log.
        # catch_warnings edits process-global filters; racing threads could at worst show or hide
        # this one warning, never change what is accepted.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(fp)
        with opened as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    label,
                    f"image has {width}x{height} = {width * height} pixels, above the limit of "
                    f"{max_pixels} pixels (possible decompression bomb)",
                )
            # Decode everything now, inside the try: a truncated file must fail here, not in a
            # later resize deep inside the data pipeline.
            img.load()
            upright = ImageOps.exif_transpose(img)
        rgb = to_rgb(upright)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(label, f"decompression bomb refused by PIL ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(label, "not a recognised image format (PIL cannot identify it)") from e
    except FileNotFoundError as e:
        raise ImageLoadError(label, "file not found") from e
    except Exception as e:  # PIL decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ImageLoadError(label, f"cannot decode or convert image ({reason})") from e
    return rgb


def load_image_bytes(
    data: bytes | bytearray | memoryview, *, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """`load_image` for encoded bytes (webdataset samples); `name` (e.g. the sample key) labels errors."""
    return load_image(data, max_pixels=max_pixels, name=name)
