"""Random-access collections of face images, whatever they are stored in.

An :class:`ImageSet` has a length, a stable ``key`` per image (its relative path, zip member or
array position: what hash splits are computed from), ``read(i)``, which decodes image ``i``
into uint8 (H, W, 3) RGB (grey images are replicated to three channels), and
``read_square(i, size)``, the uint8 (3, size, size) tensor a loader batches (decoded by
:func:`pacofr.data.decode.decode_crop` where the set holds encoded bytes, resized once). Nothing is decoded
before it is asked for, so a loader holds one batch of pixels, not the whole set:

* :class:`FileImages`: image files (a folder, or paths listed in a CSV);
* :class:`ZipImages`: members of a zip archive (read in place, never extracted);
* :class:`ArrayImages`: a uint8 (N, H, W) or (N, H, W, 1|3) array (e.g. an ``.npz`` key);
* :class:`EncodedImages`: encoded images (JPEG/PNG bytes) in one flat byte buffer with offsets;
* :class:`SubsetImages` and :class:`ConcatImages` select and join sets.

:func:`open_image_set` opens a folder, a ``.zip`` or an ``.npz`` file as one of these. Every
failure to decode an image raises :class:`pacofr.data.image_io.UnreadableImageError` naming it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pacofr.data.decode import decode_crop, hwc_to_chw, resize_square
from pacofr.data.image_io import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, UnreadableImageError, is_image_name,
                                  load_image, read_regular_file, scan_folder)


#: npz keys tried, in order, for the pixels of an image array file.
NPZ_IMAGE_KEYS = ("images", "image", "x", "X")
#: npz keys of encoded images: a flat uint8 byte buffer and int64 offsets (N + 1).
NPZ_ENCODED_KEYS = ("jpeg", "jpeg_offsets")


class ImageSet:
    """Base class: ``len(s)``, ``s.keys`` (list of str, one per image) and ``s.read(i)``."""

    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 (H, W, 3) RGB; raises UnreadableImageError."""
        raise NotImplementedError

    def read_square(self, index: int, size: int) -> torch.Tensor:
        """Image ``index`` resized (once, bilinear) to uint8 (3, size, size); raises UnreadableImageError."""
        return hwc_to_chw(resize_square(self.read(index), size))

    def describe(self, index: int) -> str:
        """A name for image ``index`` in messages."""
        return self.keys[index]

    def _check_index(self, index: int) -> int:
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"image index {index} out of range for {count} images")
        return index % count


def decode(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes as uint8 (H, W, 3) RGB; errors name the image ``name``."""
    try:
        return load_image(data, max_pixels=max_pixels)
    except UnreadableImageError as err:
        raise UnreadableImageError(name, err.reason) from err


def as_rgb(pixels: np.ndarray, name: str) -> np.ndarray:
    """uint8 (H, W) / (H, W, 1) / (H, W, 3) pixels as contiguous uint8 (H, W, 3)."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 1:
        raise UnreadableImageError(name, f"pixels of shape {pixels.shape}: expected (H, W), (H, W, 1) or (H, W, 3)")
    return np.ascontiguousarray(pixels, dtype=np.uint8)


class _EncodedSet(ImageSet):
    """A set whose images are encoded bytes: ``_encoded(index)`` gives them (raising
    UnreadableImageError), and both readers decode from there."""

    max_pixels: int

    def _encoded(self, index: int) -> bytes:
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        index = self._check_index(index)
        return decode(self._encoded(index), self.describe(index), self.max_pixels)

    def read_square(self, index: int, size: int) -> torch.Tensor:
        index = self._check_index(index)
        return decode_crop(self._encoded(index), self.describe(index), size, max_pixels=self.max_pixels)[0]


class FileImages(_EncodedSet):
    """Image files at ``paths``; ``keys`` default to the paths as given (posix form)."""

    def __init__(self, paths: Sequence[str | os.PathLike], keys: Sequence[str] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.paths = [Path(p) for p in paths]
        self.keys = list(keys) if keys is not None else [p.as_posix() for p in self.paths]
        if len(self.keys) != len(self.paths):
            raise ValueError(f"{len(self.keys)} keys for {len(self.paths)} image paths")
        self.max_pixels = max_pixels

    def _encoded(self, index: int) -> bytes:
        return read_regular_file(self.paths[index])[0]

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class ZipImages(_EncodedSet):
    """Members of a zip archive, read in place (the archive is opened once per process); a member
    larger than ``max_bytes`` uncompressed is unreadable (never inflated into memory)."""

    def __init__(self, archive: str | os.PathLike, members: Sequence[str],
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.archive = Path(archive)
        self.keys = list(members)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        names = set(self._open().namelist())
        missing = [m for m in self.keys if m not in names]
        if missing:
            raise ValueError(f"{len(missing)} image(s) are not members of {self.archive}, e.g. {missing[:3]}")

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():  # a forked loader worker opens its own
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (OSError, zipfile.BadZipFile) as err:
                raise ValueError(f"cannot open the zip archive {self.archive}: {err}") from err
            self._pid = os.getpid()
        return self._zip

    def _encoded(self, index: int) -> bytes:
        try:
            archive = self._open()
            declared = archive.getinfo(self.keys[index]).file_size
            if declared <= self.max_bytes:
                with archive.open(self.keys[index]) as member:  # the header may lie: read at most the cap
                    data = member.read(self.max_bytes + 1)
        except (OSError, zipfile.BadZipFile, KeyError, EOFError) as err:
            raise UnreadableImageError(self.describe(index), str(err)) from err
        if declared > self.max_bytes or len(data) > self.max_bytes:
            raise UnreadableImageError(self.describe(index), f"member holds more than max_bytes={self.max_bytes} "
                                                             "bytes uncompressed")
        return data

    def describe(self, index: int) -> str:
        return f"{self.archive}:{self.keys[index]}"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_pid"] = None, -1
        return state


class ArrayImages(ImageSet):
    """Images stored as one array: uint8 (N, H, W) or (N, H, W, 1|3) (float arrays in [0, 1] are
    scaled to 0..255 when opened)."""

    def __init__(self, array: np.ndarray, keys: Sequence[str] | None = None, name: str = "array") -> None:
        array = np.asarray(array)
        if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3)):
            raise ValueError(f"{name}: images must be (N, H, W) or (N, H, W, 1|3), got shape {array.shape}")
        if array.shape[1] < 1 or array.shape[2] < 1:
            raise ValueError(f"{name}: images must be at least 1 x 1 pixels, got height {array.shape[1]} and width "
                             f"{array.shape[2]} (shape {array.shape})")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int((~np.isfinite(array.reshape(array.shape[0], -1))).any(axis=1).sum())
            raise ValueError(f"{name}: {bad} of {array.shape[0]} images hold NaN or inf values (pixels must be "
                             "finite: uint8, or floats in [0, 1])")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{name}: images must be uint8 or floats in [0, 1], got dtype {array.dtype}")
            low, high = float(array.min(initial=0)), float(array.max(initial=0))
            top = 1.0 if np.issubdtype(array.dtype, np.floating) and high <= 1.0 else 255.0
            if low < 0 or high > top:
                raise ValueError(f"{name}: {array.dtype} images must lie in [0, 1] (floats) or [0, 255], "
                                 f"got [{low}, {high}]")
            array = np.rint(array.astype(np.float64) * (255.0 / top)).astype(np.uint8)
        self.array = array
        self.name = name
        self.keys = list(keys) if keys is not None else [f"{name}[{i}]" for i in range(array.shape[0])]
        if len(self.keys) != array.shape[0]:
            raise ValueError(f"{name}: {len(self.keys)} keys for {array.shape[0]} images")

    def read(self, index: int) -> np.ndarray:
        index = self._check_index(index)
        return as_rgb(self.array[index], self.describe(index))


class EncodedImages(_EncodedSet):
    """Encoded images (JPEG, PNG...) in a flat uint8 buffer: image i is ``buffer[offsets[i]:offsets[i+1]]``."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, keys: Sequence[str] | None = None,
                 name: str = "encoded", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.buffer = np.asarray(buffer)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.buffer.ndim != 1 or self.buffer.dtype != np.uint8:
            raise ValueError(f"{name}: the encoded buffer must be flat uint8, got {self.buffer.dtype} {self.buffer.shape}")
        if (self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0
                or np.any(np.diff(self.offsets) < 0) or self.offsets[-1] > self.buffer.size):
            raise ValueError(f"{name}: offsets must start at 0, never decrease and end within the "
                             f"{self.buffer.size}-byte buffer")
        count = self.offsets.size - 1
        self.name = name
        self.max_pixels = max_pixels
        self.keys = list(keys) if keys is not None else [f"{name}[{i}]" for i in range(count)]
        if len(self.keys) != count:
            raise ValueError(f"{name}: {len(self.keys)} keys for {count} encoded images")

    def _encoded(self, index: int) -> bytes:
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.buffer[start:stop].tobytes()


class SubsetImages(ImageSet):
    """The images ``indices`` of ``base``, in that order."""

    def __init__(self, base: ImageSet, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < len(base)]
        if bad:
            raise IndexError(f"subset indices {bad[:3]} out of range for {len(base)} images")
        self.keys = [base.keys[i] for i in self.indices]

    def read(self, index: int) -> np.ndarray:
        return self.base.read(self.indices[self._check_index(index)])

    def read_square(self, index: int, size: int) -> torch.Tensor:
        return self.base.read_square(self.indices[self._check_index(index)], size)

    def describe(self, index: int) -> str:
        return self.base.describe(self.indices[index])


class ConcatImages(ImageSet):
    """Several image sets one after the other; keys are prefixed with each part's ``prefix``."""

    def __init__(self, parts: Sequence[ImageSet], prefixes: Sequence[str] | None = None) -> None:
        self.parts = list(parts)
        prefixes = list(prefixes) if prefixes is not None else [""] * len(self.parts)
        if len(prefixes) != len(self.parts):
            raise ValueError(f"{len(prefixes)} prefixes for {len(self.parts)} image sets")
        self.keys = [prefix + key for part, prefix in zip(self.parts, prefixes, strict=True) for key in part.keys]
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def _locate(self, index: int) -> tuple[ImageSet, int]:
        index = self._check_index(index)
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part], index - int(self._starts[part])

    def read(self, index: int) -> np.ndarray:
        part, local = self._locate(index)
        return part.read(local)

    def read_square(self, index: int, size: int) -> torch.Tensor:
        part, local = self._locate(index)
        return part.read_square(local, size)

    def describe(self, index: int) -> str:
        part, local = self._locate(index)
        return part.describe(local)


def npz_images(arrays: np.lib.npyio.NpzFile | dict, path: str | os.PathLike, key: str | None = None,
               keys: Sequence[str] | None = None) -> ImageSet:
    """The images of an opened ``.npz`` file: ``key`` if given, else the first of
    :data:`NPZ_IMAGE_KEYS`, else encoded images under :data:`NPZ_ENCODED_KEYS`."""
    names = list(arrays.keys())
    if key is not None:
        if key not in names:
            raise ValueError(f"{path} has no array {key!r}; it holds {names}")
        return ArrayImages(arrays[key], keys=keys, name=f"{Path(path).name}:{key}")
    for candidate in NPZ_IMAGE_KEYS:
        if candidate in names:
            return ArrayImages(arrays[candidate], keys=keys, name=f"{Path(path).name}:{candidate}")
    if all(k in names for k in NPZ_ENCODED_KEYS):
        buffer, offsets = (arrays[k] for k in NPZ_ENCODED_KEYS)
        return EncodedImages(buffer, offsets, keys=keys, name=f"{Path(path).name}:{NPZ_ENCODED_KEYS[0]}")
    raise ValueError(f"{path} holds no images: expected an array named one of {NPZ_IMAGE_KEYS} or encoded "
                     f"images {NPZ_ENCODED_KEYS}; it holds {names}")


def load_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    """``np.load`` of an ``.npz`` file without pickles, errors naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {path} as an .npz file (numpy arrays, no pickled objects): {err}") from err


def zip_image_members(archive: str | os.PathLike) -> list[str]:
    """Sorted names of the image members (by extension) of a zip archive, hidden ones left out."""
    try:
        with zipfile.ZipFile(archive) as handle:
            names = handle.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot open the zip archive {archive}: {err}") from err
    return sorted(n for n in names if is_image_name(n) and not any(p.startswith(".") for p in n.split("/")))


def open_image_set(source: str | os.PathLike, *, npz_key: str | None = None) -> ImageSet:
    """A folder of image files (searched recursively), a ``.zip`` of images, or an ``.npz`` with an
    image array (``npz_key``, or see :func:`npz_images`) as an :class:`ImageSet`."""
    path = Path(source).expanduser()
    if path.is_dir():
        images, _ = scan_folder(path)
        if not images:
            raise ValueError(f"folder {path} holds no image files")
        return FileImages([path / name for name in images], keys=images)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a folder of images, a .zip or an .npz)")
    suffix = path.suffix.lower()
    if suffix == ".zip":
        members = zip_image_members(path)
        if not members:
            raise ValueError(f"zip archive {path} holds no image members")
        return ZipImages(path, members)
    if suffix == ".npz":
        return npz_images(load_npz(path), path, npz_key)
    raise ValueError(f"{path}: expected a folder of images, a .zip of images or an .npz with an image array")
