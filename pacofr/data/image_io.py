"""Reading arbitrary photos safely: any size, EXIF orientation, any colour mode, bad files named.

Every failure to read an image (missing, empty, truncated, corrupt, not an image, too many pixels,
too many bytes, not a regular file) raises ``UnreadableImageError`` with the reason, so callers
can skip and count it. Only regular files are ever opened for reading (never a FIFO, which would
block, or a device such as ``/dev/zero``, which never ends), also through symbolic links.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File name endings treated as images when a folder is scanned (compared lower-case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
#: Default upper bound on width * height (a decompression-bomb guard): 100 megapixels.
DEFAULT_MAX_PIXELS = 100_000_000
#: Default upper bound on an image file's size in bytes: 512 MiB.
DEFAULT_MAX_BYTES = 512 * 2**20


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


def read_regular_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file ``path`` (symbolic links followed) and its ``stat``.

    The file is opened without blocking and checked before a byte is read, so a FIFO or a device
    behind the name is refused, never waited on or read without end.

    Raises:
        UnreadableImageError: cannot be opened, not a regular file, or larger than ``max_bytes``.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise UnreadableImageError(name, f"cannot open ({err.strerror or err})") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableImageError(name, f"not a regular file ({_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise UnreadableImageError(name, f"{info.st_size} bytes exceeds max_bytes={max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise UnreadableImageError(name, f"cannot read ({err.strerror or err})") from err
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UnreadableImageError(name, f"grew past max_bytes={max_bytes} while being read")
    return data, info


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "a special file"


def load_image(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode a photo into an upright RGB array.

    Args:
        source: a file path (a regular file, see :func:`read_regular_file`), or the encoded bytes.
        max_pixels: refuse images with more than this many pixels (checked from the header,
            before decoding).
        max_bytes: refuse files larger than this (checked before reading).
    Returns:
        uint8 (H, W, 3) RGB array, EXIF orientation applied, first frame of animations.
    Raises:
        UnreadableImageError: missing, empty, truncated, corrupt, not an image, too large, or
            not a regular file.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else read_regular_file(source, max_bytes)[0]
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


@dataclasses.dataclass
class FolderScan:
    """What :func:`scan_sources` found: paths relative to the root, "/"-separated, sorted.

    ``images``/``others``: regular files (or links to them) with / without an image name;
    ``special``: anything else that is not a folder (FIFOs, devices, sockets, broken links, links
    to those); ``unreadable_folders``: folders that could not be listed (their contents unknown).
    """

    images: list[str] = dataclasses.field(default_factory=list)
    others: list[str] = dataclasses.field(default_factory=list)
    special: list[str] = dataclasses.field(default_factory=list)
    unreadable_folders: list[str] = dataclasses.field(default_factory=list)


def scan_sources(root: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> FolderScan:
    """Every entry under ``root``, sorted into a :class:`FolderScan`.

    Hidden files and folders (starting with ".") are left out, and so is ``exclude`` (e.g. an
    output folder inside the input folder). Symbolic links to folders are not followed.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    excluded = Path(exclude).resolve() if exclude is not None else None
    scan = FolderScan()
    pending = [root_path]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            scan.unreadable_folders.append(folder.relative_to(root_path).as_posix())
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            relative = path.relative_to(root_path).as_posix()
            try:
                if entry.is_dir(follow_symlinks=False):
                    if excluded is None or path.resolve() != excluded:
                        pending.append(path)
                elif entry.is_file():
                    (scan.images if is_image_name(relative) else scan.others).append(relative)
                elif not entry.is_dir():  # a link to a folder is not followed, and not counted
                    scan.special.append(relative)
            except OSError:
                scan.special.append(relative)
    for names in (scan.images, scan.others, scan.special, scan.unreadable_folders):
        names.sort()
    return scan


def scan_folder(root: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """(image paths, other paths) of :func:`scan_sources`: regular files only, both sorted."""
    scan = scan_sources(root, exclude=exclude)
    return scan.images, scan.others
