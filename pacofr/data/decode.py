"""Encoded face crops to the uint8 (3, S, S) tensors a loader batches, resized at most once.

A baseline JPEG in RGB (or grey) without an EXIF rotation, which is what ``pacofr prepare``
writes, is decoded by torchvision's libjpeg-turbo decoder (``torchvision.io.decode_jpeg``: about
twice as fast as PIL here, ``benchmarks/bench_data.py`` measures both); any other image takes the
safe general path :func:`pacofr.data.image_io.load_image` (EXIF orientation, colour modes,
PNG...). Both give the same pixels for such a JPEG (``tests/test_data_decode.py``). The header is
read first, so the ``max_pixels`` guard applies before a pixel is decoded. A crop of another side
than S is resized once, bilinear as PIL resizes (antialiased when it shrinks).

:func:`check_batch_jpeg` checks, from the header alone, that a crop is such a JPEG at the training
size, and :func:`decode_jpeg_batch` decodes a batch of them where the step runs: nvJPEG for the whole
batch on a CUDA device (``decode_jpeg(device="cuda")``), the fast path's decoder one by one on the
CPU.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from pacofr.data.image_io import DEFAULT_MAX_PIXELS, UnreadableImageError, load_image

_EXIF_ORIENTATION = 0x0112
_FAST_MODES = ("RGB", "L")


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) resized to (size, size, 3), PIL bilinear (the one resize of the loader path)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def hwc_to_chw(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) array as a contiguous uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))  # a writable copy


def _header(data: bytes, name: str, max_pixels: int) -> tuple[str | None, tuple[int, int], bool]:
    """(format, (width, height), whether the fast decoder applies) from the header alone."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))
            size = header.size
            fast = (header.format == "JPEG" and header.mode in _FAST_MODES
                    and header.getexif().get(_EXIF_ORIENTATION, 1) == 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise UnreadableImageError(name, f"not a decodable image ({err})") from err
    if size[0] * size[1] > max_pixels:
        raise UnreadableImageError(name, f"{size[0]}x{size[1]} pixels exceeds max_pixels={max_pixels}")
    return header.format, size, fast


def decode_crop(data: bytes, name: str, size: int | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode an encoded image to uint8 (3, size, size).

    Args:
        data: the encoded bytes (JPEG, PNG, ...).
        name: the image's name in error messages.
        size: side of the result (None: the stored size, which need not be square).
        max_pixels: decompression-bomb guard, checked on the header.
    Returns:
        (uint8 (3, S, S) tensor, (width, height) of the stored image before the resize).
    Raises:
        UnreadableImageError: empty, not an image, corrupt, truncated or too large.
    """
    if not data:
        raise UnreadableImageError(name, "empty file")
    _, stored, fast = _header(data, name, max_pixels)
    if fast:
        try:
            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise UnreadableImageError(name, f"corrupt or truncated JPEG ({err})") from err
        if size is None or stored == (size, size):
            return pixels, stored
        image = pixels.permute(1, 2, 0).numpy()
    else:
        try:
            image = load_image(data, max_pixels=max_pixels)
        except UnreadableImageError as err:
            raise UnreadableImageError(name, err.reason) from err
        stored = (image.shape[1], image.shape[0])  # after the EXIF rotation
    return hwc_to_chw(image if size is None else resize_square(image, size)), stored


def check_batch_jpeg(data: bytes, name: str, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Check from its header that ``data`` is a crop :func:`decode_jpeg_batch` decodes as it is: a
    plain RGB or grey JPEG without EXIF rotation (what ``pacofr prepare`` writes), size x size.

    Raises:
        UnreadableImageError: empty, not an image, too large, not such a JPEG, or another size.
    """
    if not data:
        raise UnreadableImageError(name, "empty file")
    image_format, stored, fast = _header(data, name, max_pixels)
    if not fast:
        raise UnreadableImageError(name, f"a {image_format} image that is not a plain RGB or grey JPEG without "
                                         "EXIF rotation: it cannot be decoded a batch at a time on the device")
    if stored != (size, size):
        raise UnreadableImageError(name, f"crop is {stored[0]}x{stored[1]}, not {size}x{size}: it cannot be "
                                         "decoded a batch at a time on the device without a resize")


def decode_jpeg_batch(encoded: Sequence[bytes], device: torch.device | str,
                      names: Sequence[str] | None = None) -> torch.Tensor:
    """Decode a batch of same-size JPEGs (checked by :func:`check_batch_jpeg`) on ``device``.

    On a CUDA device nvJPEG decodes the whole batch in one call; on the CPU torchvision's
    libjpeg-turbo decoder (the one :func:`decode_crop` uses) decodes them one by one, so a CPU
    run gives exactly the pixels of ``decode_crop``.

    Args:
        encoded: the JPEGs' bytes.
        device: where to decode and put the pixels.
        names: the items' names for error messages (default: their positions in the batch).
    Returns:
        uint8 (B, 3, S, S) on ``device``.
    Raises:
        UnreadableImageError: naming the JPEGs that do not decode or are not of the first one's size.
    """
    device = torch.device(device)
    names = list(names) if names is not None else [f"item {k} of the batch" for k in range(len(encoded))]
    if len(names) != len(encoded):
        raise ValueError(f"{len(names)} names for {len(encoded)} JPEGs")
    if not encoded:
        raise ValueError("an empty batch of JPEGs")
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    try:
        if device.type == "cuda":
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        else:
            images = [decode_jpeg(data, mode=ImageReadMode.RGB) for data in tensors]
    except RuntimeError as err:
        raise _undecodable(tensors, names, device, err) from err
    shape = images[0].shape
    odd = [name for name, image in zip(names, images) if image.shape != shape]
    if odd:
        raise UnreadableImageError(", ".join(odd), f"not {shape[2]}x{shape[1]} as the batch's first JPEG")
    return torch.stack(images)


def _undecodable(tensors: list[torch.Tensor], names: list[str], device: torch.device,
                 error: RuntimeError) -> UnreadableImageError:
    """The error naming the JPEGs that fail to decode alone on ``device`` (a failed batch call does
    not say which), or the whole batch when each decodes alone."""
    failed = []
    for name, data in zip(names, tensors):
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            failed.append(name)
    if not failed:
        return UnreadableImageError(f"a batch of {len(names)} JPEGs", f"the batch decode failed ({error})")
    return UnreadableImageError(", ".join(failed), f"corrupt or truncated JPEG ({error})")
