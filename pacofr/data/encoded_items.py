"""Prepared faces whose items carry their crop's JPEG bytes, decoded a batch at a time on the device.

With ``data.decode_on_device`` the loader does no decoding: an item is ``{"image": bytes (the
crop's JPEG, as ``pacofr prepare`` stored it), "landmarks": float32 (5, 2), "index": int}``, the
batch collates the bytes into a list, and :class:`pacofr.data.loading.DeviceBatches` decodes the
whole batch where the step runs (:func:`pacofr.data.decode.decode_jpeg_batch`: nvJPEG on CUDA,
libjpeg-turbo on the CPU, where the pixels are exactly those of the uint8 items). Only crops
stored at the training size qualify (no resize on the device); each item's header is checked on
the loader side, so an unusable crop is skipped as an unreadable one is.
"""

from __future__ import annotations

import os

import numpy as np
from torch.utils.data import Dataset

from pacofr.data.datasets import AlignedFaceDataset, ShardFaceDataset, _IndexedFaceDataset
from pacofr.data.decode import check_batch_jpeg
from pacofr.data.image_io import DEFAULT_MAX_PIXELS, UnreadableImageError


class _EncodedItems(_IndexedFaceDataset):
    """A prepared folder's faces whose ``_load`` gives the checked JPEG bytes in place of pixels
    (``make_item`` passes uint8 "pixels" through untouched)."""

    def __init__(self, root: str | os.PathLike, *, image_size: int = 224,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(root, image_size=image_size, uint8=True, max_pixels=max_pixels)
        if self.recipe.size != image_size:
            raise ValueError(f"{root} holds {self.recipe.size} px crops, not {image_size} px: encoded items are "
                             "decoded on the device without a resize (prepare the crops at the training size)")

    def _load(self, index: int) -> tuple[bytes, np.ndarray]:  # type: ignore[override]  # bytes, not pixels
        name = self._describe(index)
        try:
            data = self._read_bytes(index)
        except OSError as err:
            raise UnreadableImageError(name, str(err)) from err
        check_batch_jpeg(data, name, self.image_size, max_pixels=self.max_pixels)
        return data, self._landmarks[index]


class EncodedAlignedFaceDataset(_EncodedItems, AlignedFaceDataset):
    """``AlignedFaceDataset`` (``pacofr prepare --format files``) giving each crop's JPEG bytes."""


class EncodedShardFaceDataset(_EncodedItems, ShardFaceDataset):
    """``ShardFaceDataset`` (``pacofr prepare --format shards``) giving each crop's JPEG bytes."""


def encoded_items(dataset: Dataset) -> Dataset:
    """The same prepared faces as ``dataset`` with items that carry their JPEG bytes.

    Raises:
        ValueError: ``dataset`` is not a folder written by ``pacofr prepare`` (its items have no
            stored JPEG to decode on the device), or its crops are not at its ``image_size``.
    """
    if isinstance(dataset, _EncodedItems):
        return dataset
    for plain, encoded in ((ShardFaceDataset, EncodedShardFaceDataset), (AlignedFaceDataset, EncodedAlignedFaceDataset)):
        if isinstance(dataset, plain):
            return encoded(dataset.root, image_size=dataset.image_size, max_pixels=dataset.max_pixels)
    raise ValueError(f"a {type(dataset).__name__} has no stored JPEG crops to decode on the device: that needs a "
                     "folder written by `pacofr prepare` (files or shards)")

