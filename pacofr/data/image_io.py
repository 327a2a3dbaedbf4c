"""Reading arbitrary photos safely: any size, EXIF orientation, any colour mode, bad files named.

Every failure to read an image (missing, empty, truncated, corrupt, not an image, too many pixels)
raises ``UnreadableImageError`` with the reason, so callers can skip and count it.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File name endings treated as images when a folder is scanned (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
#: Default upper bound on width * height (a decompression-bomb guard): 100 megapixels.
DEFAULT_MAX_PIXELS = 100_000_000


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded into pixels; ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot read image {source}: {reason}")
        self.source = source
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL mode: alpha is composited onto white, 16/32-bit grey is rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a photo into an upright RGB array.

    Args:
        source: a file path, or the encoded bytes.
        max_pixels: refuse images with more than this many pixels (checked from the header,
            before decoding).
    Returns:
        uint8 (H, W, 3) RGB array, EXIF orientation applied, first frame of animations.
    Raises:
        UnreadableImageError: missing, empty, truncated, corrupt, not an image, or too large.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        if isinstance(source, bytes):
            data = source
        else:
            with open(source, "rb") as handle:
                data = handle.read()
    except OSError as err:
        raise UnreadableImageError(name, f"cannot open ({err.strerror or err})") from err
    if not data:
        raise UnreadableImageError(name, "empty file")
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below replaces PIL's warning; PIL's hard error still applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise UnreadableImageError(name, f"{width}x{height} pixels exceeds max_pixels={max_pixels}")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(name, f"too many pixels ({err})") from err
    except UnidentifiedImageError as err:
        raise UnreadableImageError(name, "not a decodable image") from err
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error) as err:
        raise UnreadableImageError(name, f"corrupt or truncated ({err})") from err
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise UnreadableImageError(name, f"decoded to an unusable shape {array.shape}")
    return np.ascontiguousarray(array)


def is_image_name(path: str | os.PathLike) -> bool:
    """Whether a file name ends with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """Every file under ``root``, split into image names and other names.

    Hidden files and folders (starting with ".") are left out, and so is ``exclude`` (e.g. an
    output folder inside the input folder). Symbolic links to folders are not followed.

    Returns:
        (image paths, other paths), both relative to ``root`` with "/" separators, sorted.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    excluded = Path(exclude).resolve() if exclude is not None else None
    images: list[str] = []
    others: list[str] = []
    for relative in _walk(root_path, excluded):
        (images if is_image_name(relative) else others).append(relative)
    return sorted(images), sorted(others)


def _walk(root: Path, excluded: Path | None) -> Iterator[str]:
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs[:] = sorted(d for d in subdirs
                            if not d.startswith(".") and (excluded is None or (here / d).resolve() != excluded))
        for name in files:
            if not name.startswith("."):
                yield (here / name).relative_to(root).as_posix()
