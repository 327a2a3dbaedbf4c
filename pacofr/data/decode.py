"""Encoded face crops to the uint8 (3, S, S) tensors a loader batches, resized at most once.

A baseline JPEG in RGB (or grey) without an EXIF rotation, which is what ``pacofr prepare``
writes, is decoded by torchvision's libjpeg-turbo decoder (``torchvision.io.decode_jpeg``: about
twice as fast as PIL here, ``benchmarks/bench_data.py`` measures both); any other image takes the
safe general path :func:`pacofr.data.image_io.load_image` (EXIF orientation, colour modes,
PNG...). Both give the same pixels for such a JPEG (``tests/test_data_decode.py``). The header is
read first, so the ``max_pixels`` guard applies before a pixel is decoded. A crop of another side
than S is resized once, bilinear as PIL resizes (antialiased when it shrinks).

:func:`decode_jpeg_batch_on_device` decodes a whole batch with nvJPEG on a CUDA device.
"""

from __future__ import annotations

import io
import warnings

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


def decode_jpeg_batch_on_device(encoded: list[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """Decode a batch of JPEGs with nvJPEG on CUDA ``device``: uint8 (3, H, W) tensors there.

    Only for JPEGs the fast path would take (``pacofr prepare``'s crops); it cannot run without
    a CUDA device. Raises ``UnreadableImageError`` naming the batch when nvJPEG refuses one.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"nvJPEG decoding needs a CUDA device, got {device} (CUDA available: "
                         f"{torch.cuda.is_available()})")
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    try:
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        raise UnreadableImageError(f"a batch of {len(encoded)} JPEGs", f"nvJPEG failed ({err})") from err
