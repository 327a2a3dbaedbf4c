"""Map-style datasets of aligned faces for training.

Faces come from a folder written by ``pacofr prepare`` (:class:`AlignedFaceDataset`,
:class:`ShardFaceDataset`), from photos aligned on the fly (:class:`RawFolderDataset`), or from
images that are already face crops, used as they are (:class:`CroppedFaceDataset`).

Every item is ``{"image": float32 (3, S, S) in [0, 1], "landmarks": float32 (5, 2) pixel
coordinates in that (augmented) image, "index": int}``; with ``uint8=True`` the image is the
uint8 (3, S, S) pixels, not augmented (a quarter of the bytes to batch and to copy to the
device, where :class:`pacofr.data.batch_augment.BatchAugment` augments the whole batch). A crop
of another size than S is decoded and resized once (:mod:`pacofr.data.decode`). An image that cannot be read is skipped:
the next readable item is returned instead (its own ``index``), a warning is logged and the
dataset's ``skipped`` counter grows. With DataLoader workers each worker counts its own skips;
the log lines are the complete record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pacofr.data.alignment import AlignmentRecipe, resize_points, template_for_size
from pacofr.data.augment import Augment
from pacofr.data.decode import decode_crop, hwc_to_chw, resize_square
from pacofr.data.detection import FaceDetector, create_detector, select_faces
from pacofr.data.image_io import (DEFAULT_MAX_PIXELS, UnreadableImageError, load_image, read_regular_file,
                                  scan_folder)
from pacofr.data.image_sets import ImageSet
from pacofr.data.storage import open_shard, read_index, read_recipe_dict

logger = logging.getLogger(__name__)


def make_item(pixels: torch.Tensor, landmarks: np.ndarray, index: int, *, uint8: bool,
              augment: Augment | None) -> dict[str, Any]:
    """A dataset item from uint8 (3, S, S) pixels and their (5, 2) landmarks: the pixels as they
    are (``uint8``), or as float32 in [0, 1] put through the per-image ``augment``."""
    marks = torch.from_numpy(np.asarray(landmarks, dtype=np.float64).astype(np.float32))
    if uint8:
        return {"image": pixels, "landmarks": marks, "index": int(index)}
    image = pixels.to(torch.float32) / 255.0
    if augment is not None:
        image, marks = augment(image, marks)
    return {"image": image.contiguous(), "landmarks": marks.to(torch.float32), "index": int(index)}


def square_pixels(image: np.ndarray, landmarks: np.ndarray, size: int, name: str) -> tuple[torch.Tensor, np.ndarray]:
    """An aligned uint8 (H, W, 3) crop and its (5, 2) landmarks at ``size`` (one resize when the
    crop has another size): (uint8 (3, size, size), float64 (5, 2))."""
    height, width = image.shape[:2]
    points = np.asarray(landmarks, dtype=np.float64)
    if (height, width) != (size, size):
        if height != width:
            raise UnreadableImageError(name, f"aligned crop is not square ({width}x{height})")
        points = resize_points(points, width, size)
    return hwc_to_chw(resize_square(image, size)), points


class _SkippingDataset(Dataset):
    """Shared skip-and-count logic: subclasses implement ``_load(index) -> (uint8 (3, S, S)
    pixels at image_size, (5, 2) landmarks in them)`` raising ``UnreadableImageError`` for an
    item that cannot be used."""

    image_size: int
    augment: Augment | None
    uint8: bool

    def __init__(self, image_size: int, augment: Augment | None, uint8: bool) -> None:
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if uint8 and augment is not None:
            raise ValueError("uint8 items are not augmented one by one: leave augment=None and augment the "
                             "batch on the training device (pacofr.data.batch_augment.BatchAugment)")
        self.image_size = image_size
        self.augment = augment
        self.uint8 = uint8
        self.skipped = 0
        self.skipped_indices: set[int] = set()

    def _load(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} items")
        index %= count
        for step in range(count):
            current = (index + step) % count
            try:
                pixels, landmarks = self._load(current)
            except UnreadableImageError as err:
                self.skipped += 1
                self.skipped_indices.add(current)
                logger.warning("skipping item %d: %s", current, err)
                continue
            return make_item(pixels, landmarks, current, uint8=self.uint8, augment=self.augment)
        raise ValueError(f"none of the {count} items of {type(self).__name__} could be read (each was skipped with a "
                         "warning naming it and why): the data set holds no readable image")


class _IndexedFaceDataset(_SkippingDataset):
    """Faces listed in a prepared folder's index.jsonl."""

    def __init__(self, root: str | os.PathLike, *, image_size: int = 224, augment: Augment | None = None,
                 uint8: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(image_size, augment, uint8)
        self.root = Path(root)
        self.records = read_index(self.root)
        self.recipe = AlignmentRecipe.from_dict(read_recipe_dict(self.root))
        self.max_pixels = max_pixels
        self._landmarks = np.asarray([record["landmarks"] for record in self.records], dtype=np.float64)
        self._landmarks = self._landmarks.reshape(len(self.records), 5, 2)

    def __len__(self) -> int:
        return len(self.records)

    def _read_bytes(self, index: int) -> bytes:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        name = self._describe(index)
        try:
            data = self._read_bytes(index)
        except OSError as err:
            raise UnreadableImageError(name, str(err)) from err
        pixels, (width, height) = decode_crop(data, name, self.image_size, max_pixels=self.max_pixels)
        if (width, height) != (self.recipe.size, self.recipe.size):
            raise UnreadableImageError(name, f"crop is {width}x{height}, the recipe says {self.recipe.size}")
        landmarks = self._landmarks[index]
        if self.recipe.size != self.image_size:
            landmarks = resize_points(landmarks, self.recipe.size, self.image_size)
        return pixels, landmarks

    def _describe(self, index: int) -> str:
        return str(self.records[index].get("file") or self.records[index].get("shard"))


class AlignedFaceDataset(_IndexedFaceDataset):
    """Aligned faces of a folder written by ``pacofr prepare --format files``.

    Args:
        root: the prepared folder (index.jsonl, recipe.json, images/).
        image_size: side of the returned images (crops are resized once, landmarks follow).
        augment: optional ``Augment`` applied to every float item.
        uint8: items carry uint8 (3, S, S) pixels, not augmented (the batched device path).
        max_pixels: decompression-bomb guard for the stored crops.
    """

    def __init__(self, root: str | os.PathLike, *, image_size: int = 224, augment: Augment | None = None,
                 uint8: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, image_size=image_size, augment=augment, uint8=uint8, max_pixels=max_pixels)
        if self.records and "file" not in self.records[0]:
            raise ValueError(f"{root} holds shards, not files: use ShardFaceDataset")

    def _read_bytes(self, index: int) -> bytes:
        return read_regular_file(self.root / self.records[index]["file"])[0]  # never a FIFO or a device


class ShardFaceDataset(_IndexedFaceDataset):
    """Aligned faces of a folder written by ``pacofr prepare --format shards``; random access by
    byte range inside the tar shards (files are opened lazily, once per process).

    Args: as ``AlignedFaceDataset``.
    """

    def __init__(self, root: str | os.PathLike, *, image_size: int = 224, augment: Augment | None = None,
                 uint8: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, image_size=image_size, augment=augment, uint8=uint8, max_pixels=max_pixels)
        if self.records and "shard" not in self.records[0]:
            raise ValueError(f"{root} holds image files, not shards: use AlignedFaceDataset")
        self._handles: dict[str, int] = {}
        self._pid = os.getpid()

    def _read_bytes(self, index: int) -> bytes:
        record = self.records[index]
        if self._pid != os.getpid():  # a forked DataLoader worker must not share descriptors
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(record["shard"])
        if handle is None:
            handle = open_shard(self.root, record["shard"])
            self._handles[record["shard"]] = handle
        data = os.pread(handle, int(record["size"]), int(record["offset"]))
        if len(data) != int(record["size"]):
            raise OSError(f"shard {record['shard']} is truncated")
        return data

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __del__(self) -> None:
        for handle in getattr(self, "_handles", {}).values():
            try:
                os.close(handle)
            except OSError:
                pass


class RawFolderDataset(_SkippingDataset):
    """Photos aligned on the fly: detect (largest face), align with the recipe, return the item.

    Args:
        root: folder of photos (searched recursively).
        detector: a detector name ("mtcnn"), a ``FaceDetector``, or a callable building one;
            built lazily, once per process.
        image_size: side of the returned images.
        augment: optional ``Augment`` (float items).
        uint8: items carry uint8 (3, S, S) pixels, not augmented.
        min_size: faces with a shorter box (source pixels) are ignored.
        recipe: alignment recipe (default: the canonical one at ``image_size``).
        max_pixels: decompression-bomb guard.
    Photos with no usable face are skipped like unreadable ones (``skipped``).
    """

    def __init__(self, root: str | os.PathLike, detector: str | FaceDetector | Callable[[], FaceDetector] = "mtcnn",
                 *, image_size: int = 224, augment: Augment | None = None, uint8: bool = False,
                 min_size: float = 32.0, recipe: AlignmentRecipe | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(image_size, augment, uint8)
        self.root = Path(root)
        self.files, _ = scan_folder(self.root)
        self.min_size = min_size
        self.max_pixels = max_pixels
        self._detector_spec = detector
        self._detector: FaceDetector | None = detector if isinstance(detector, FaceDetector) else None
        name = detector if isinstance(detector, str) else getattr(detector, "name", "custom")
        self.recipe = recipe or AlignmentRecipe.for_size(image_size, detector=name)

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not isinstance(self._detector_spec, FaceDetector):
            state["_detector"] = None
        return state

    @property
    def detector(self) -> FaceDetector:
        """The detector, built on first use."""
        if self._detector is None:
            spec = self._detector_spec
            self._detector = create_detector(spec) if isinstance(spec, str) else spec()
        return self._detector

    def _load(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        path = self.root / self.files[index]
        image = load_image(path, max_pixels=self.max_pixels)
        faces, outcome = select_faces(self.detector.detect(image), "largest", self.min_size)
        if not faces:
            raise UnreadableImageError(str(path), f"no usable face ({outcome})")
        aligned, matrix = self.recipe.align(image, faces[0].landmarks5)
        landmarks = faces[0].landmarks5 @ matrix[:, :2].T + matrix[:, 2]
        return square_pixels(aligned, landmarks, self.image_size, str(path))


class CroppedFaceDataset(_SkippingDataset):
    """Images that are already face crops (no detector, no landmarks), e.g. a folder, zip or npz
    of cropped faces: each is resized to ``image_size`` x ``image_size`` (bilinear; the aspect
    ratio of a non-square crop is not kept) and given the alignment template's five points, so the
    template facial-region map applies.

    Args:
        images: the crops (:func:`pacofr.data.image_sets.open_image_set` opens a folder, .zip or .npz).
        image_size: side of the returned images.
        augment: optional ``Augment`` (float items).
        uint8: items carry uint8 (3, S, S) pixels, not augmented.
    """

    def __init__(self, images: ImageSet, *, image_size: int = 224, augment: Augment | None = None,
                 uint8: bool = False) -> None:
        super().__init__(image_size, augment, uint8)
        if len(images) == 0:
            raise ValueError("CroppedFaceDataset needs at least one image")
        self.images = images
        self.recipe = AlignmentRecipe.for_size(image_size, detector="none",
                                               reference="assumed: already-cropped faces, not aligned by pacofr")
        self._template = template_for_size(image_size).astype(np.float64)

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        return self.images.read_square(index, self.image_size), self._template
