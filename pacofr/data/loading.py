"""From loader batches of uint8 pixels to float batches on the training device, one step ahead.

:class:`DeviceBatches` wraps the batches of a ``DataLoader`` over ``uint8=True`` items: it sends
batch k + 1 to the device (from pinned memory, a non-blocking copy on a side CUDA stream) before
it hands out batch k, so the copy overlaps the step; on the device the pixels are converted to
float32 in [0, 1] and, with a :class:`~pacofr.data.batch_augment.BatchAugment`, augmented there
as one batch. The landmarks stay on the CPU (they are tiny, and the region ids are computed from
them there), so nothing waits on the device. A CPU run goes through the same code with CPU
tensors (no pinning, no stream). A batch of encoded items (:mod:`pacofr.data.encoded_items`:
``image`` is a list of JPEG bytes) is decoded as a whole where the step runs instead of copied
(:func:`batch_pixels`: nvJPEG on CUDA, on the side stream, one batch ahead like a copy).

:func:`default_num_workers` sizes the loader from the cores this process may use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from pacofr.data.batch_augment import BatchAugment, uint8_to_unit
from pacofr.data.decode import decode_jpeg_batch

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


def usable_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Training processes on this host (``LOCAL_WORLD_SIZE``, set by torchrun; 1 without it)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer, got {value!r}") from None
    if count < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE must be a positive integer, got {count}")
    return count


def default_num_workers(device_type: str, ranks_on_host: int | None = None, cores: int | None = None) -> int:
    """Loader workers for one rank: its share of the usable cores, less one for the process that
    feeds the device. On the CPU 0: the training step's threads already use every core, and
    loading in the main process costs no worker start-up per epoch.

    Args:
        device_type: ``"cuda"`` or ``"cpu"``.
        ranks_on_host: training processes sharing this host's cores (default: ``LOCAL_WORLD_SIZE``).
        cores: cores this process may use (default: :func:`usable_cores`).
    """
    if device_type != "cuda":
        return 0
    share = (cores or usable_cores()) // (ranks_on_host or local_world_size())
    return max(share - 1, 0)


def batch_pixels(images: torch.Tensor | Sequence[bytes], device: torch.device | str,
                 indices: Sequence[int] | None = None) -> torch.Tensor:
    """A batch's ``image`` entry on ``device``: a tensor copied there, or a list of JPEG bytes
    (encoded items) decoded there into uint8 (B, 3, S, S) (``indices``: the items' dataset
    indices, named if one does not decode)."""
    if isinstance(images, torch.Tensor):
        return images.to(device)
    names = None if indices is None else [f"item {int(index)}" for index in indices]
    return decode_jpeg_batch(list(images), device, names)


class DeviceBatches:
    """Iterate ``batches`` as float batches on ``device``, the next one already on its way.

    Args:
        batches: CPU batches ``{"image": uint8 (B, 3, S, S) (float in [0, 1] is accepted too),
            "landmarks": float (B, 5, 2), ...}`` (e.g. a DataLoader over ``uint8=True`` items), or
            with ``image`` a list of B JPEGs' bytes (encoded items), decoded on ``device``.
        device: the training device.
        augment: augments each uint8 batch on ``device`` (its random stream advances one batch
            at a time, in order, whatever the prefetching); None: no augmentation. A float batch
            is taken as it is: its dataset applied the per-image ``Augment`` already, or was
            asked not to.
    Yields:
        the batch with ``image`` float32 (B, 3, S, S) in [0, 1] on ``device`` and ``landmarks``
        float32 (B, 5, 2) on the CPU (augmented with the images); other keys as they came.
    """

    def __init__(self, batches: Iterable[Batch], device: torch.device | str,
                 augment: BatchAugment | None = None) -> None:
        self.batches = batches
        self.device = torch.device(device)
        self.augment = augment
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __iter__(self) -> Iterator[Batch]:
        source = iter(self.batches)
        ahead = self._send(next(source, None))
        while ahead is not None:
            current = ahead
            ahead = self._send(next(source, None))  # batch k + 1 travels while batch k's step runs
            yield self._finish(current)

    def _send(self, batch: Batch | None) -> Batch | None:
        """Start copying ``batch``'s pixels to the device (non-blocking from pinned memory), or
        decoding its JPEGs there."""
        if batch is None or self._stream is None:
            return batch
        images = batch["image"]
        with torch.cuda.stream(self._stream):
            if not isinstance(images, torch.Tensor):  # JPEG bytes: nvJPEG decodes them on this stream
                return {**batch, "image": batch_pixels(images, self.device, batch.get("index"))}
            if not images.is_pinned():
                images = images.pin_memory()
            return {**batch, "image": images.to(self.device, non_blocking=True)}

    def _finish(self, batch: Batch) -> Batch:
        """Wait for the copy, then convert (and augment) on the device."""
        images = batch["image"]
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            images.record_stream(torch.cuda.current_stream(self.device))
        else:
            images = batch_pixels(images, self.device, batch.get("index"))
        landmarks = batch["landmarks"].to(torch.float32)
        if self.augment is None or images.dtype != torch.uint8:
            return {**batch, "image": uint8_to_unit(images), "landmarks": landmarks}
        images, landmarks = self.augment(images, landmarks)
        return {**batch, "image": images, "landmarks": landmarks}
