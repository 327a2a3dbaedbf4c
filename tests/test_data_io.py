"""Reading photos: bad files raise UnreadableImageError with a reason; odd modes become RGB."""

from __future__ import annotations

import ast
import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features
from _data_support import jpeg_bytes, stub_photo, write_bytes

import pacofr.data.detection as detection
import pacofr.data.mtcnn as mtcnn
from pacofr.data.image_io import UnreadableImageError, is_image_name, load_image, scan_folder


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds no pixel data (a bomb's header)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_reads_a_jpeg_from_path_and_bytes(tmp_path):
    data = jpeg_bytes(stub_photo(1, (64, 48)))
    path = write_bytes(tmp_path, "a.jpg", data)
    from_path, from_bytes = load_image(path), load_image(data)
    assert from_path.dtype == np.uint8 and from_path.shape == (48, 64, 3)
    np.testing.assert_array_equal(from_path, from_bytes)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"this is not an image at all" * 10, "not a decodable image"),
    (b"\xff\xd8\xff\xe0" + bytes(200), "not a decodable image"),
])
def test_bad_bytes_are_unreadable(tmp_path, content, reason):
    path = write_bytes(tmp_path, "bad.jpg", content)
    with pytest.raises(UnreadableImageError, match=reason) as info:
        load_image(path)
    assert info.value.source == str(path)


def test_corrupt_pixel_data_is_unreadable(tmp_path):
    data = bytearray(_encode(stub_photo(1, (64, 64)), "PNG"))
    start = data.find(b"IDAT") + 10
    data[start:start + 50] = bytes(50)  # header intact, compressed pixels garbled
    with pytest.raises(UnreadableImageError, match="corrupt or truncated"):
        load_image(write_bytes(tmp_path, "garbled.png", bytes(data)))


def test_truncated_files_are_unreadable(tmp_path):
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png")):
        data = _encode(stub_photo(1, (200, 150)), fmt)
        path = write_bytes(tmp_path, f"cut.{suffix}", data[: len(data) // 2])
        with pytest.raises(UnreadableImageError, match="corrupt or truncated"):
            load_image(path)


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(UnreadableImageError, match="cannot open"):
        load_image(tmp_path / "nothing.png")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    # beyond PIL's own hard limit
    with pytest.raises(UnreadableImageError, match="too many pixels"):
        load_image(write_bytes(tmp_path, "bomb.png", _png_header_only(60_000, 60_000)))
    # above our max_pixels (default 100 MP) but below PIL's hard limit
    with pytest.raises(UnreadableImageError, match="exceeds max_pixels"):
        load_image(write_bytes(tmp_path, "big.png", _png_header_only(12_000, 10_000)))
    small = write_bytes(tmp_path, "small.png", _encode(stub_photo(1, (100, 100)), "PNG"))
    with pytest.raises(UnreadableImageError, match="exceeds max_pixels=5000"):
        load_image(small, max_pixels=5000)
    assert load_image(small, max_pixels=10_000).shape == (100, 100, 3)


def test_grayscale_becomes_three_equal_channels():
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    out = load_image(_encode(grey, "PNG"))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16_bit_grayscale_is_rescaled():
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    out = load_image(_encode(deep, "PNG"))
    assert (out == 255).all()


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    out = load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[3, 3], [255, 255, 255])
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    assert load_image(_encode(palette, "PNG")).shape == (4, 4, 3)


def test_exif_orientation_is_applied():
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :5] = 255  # white band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = load_image(_encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (20, 10, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the left band is now on top


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow has no WebP support")
def test_webp_is_read():
    out = load_image(_encode(stub_photo(1, (30, 20)), "WEBP", lossless=True))
    assert out.shape == (20, 30, 3)


def test_scan_folder_splits_images_from_other_files(tmp_path):
    for name in ("b/one.JPG", "a.png", "c.webp", "notes.txt", "data.bin", ".hidden.jpg", ".cache/x.jpg", "out/y.jpg"):
        write_bytes(tmp_path, name, b"x")
    images, others = scan_folder(tmp_path, exclude=tmp_path / "out")
    assert images == ["a.png", "b/one.JPG", "c.webp"]
    assert others == ["data.bin", "notes.txt"]
    assert is_image_name("X.TIFF") and not is_image_name("x.txt")
    with pytest.raises(NotADirectoryError):
        scan_folder(tmp_path / "a.png")


@pytest.mark.timeout(60)
def test_only_regular_files_are_read_and_a_size_cap_holds(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    for name, reason in (("pipe.jpg", "not a regular file (a FIFO)"), ("zero.jpg", "not a regular file (a character device)")):
        with pytest.raises(UnreadableImageError, match=re.escape(reason)):
            load_image(tmp_path / name)
    photo = write_bytes(tmp_path, "photo.png", _encode(stub_photo(1, (30, 20)), "PNG"))
    (tmp_path / "link.png").symlink_to(photo)
    assert load_image(tmp_path / "link.png").shape == (20, 30, 3)
    with pytest.raises(UnreadableImageError, match="exceeds max_bytes=100"):
        load_image(photo, max_bytes=100)
    images, others = scan_folder(tmp_path)
    assert images == ["link.png", "photo.png"] and others == []


def test_detection_and_mtcnn_import_one_way():
    """detection owns the shared types and the registry; mtcnn imports it and registers itself
    (issue 26: no import cycle, not even one hidden inside a function)."""

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        return names | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}

    assert not any(name.startswith("pacofr.data.mtcnn") for name in imported(detection))
    assert "pacofr.data.detection" in imported(mtcnn)
    assert "mtcnn" in detection.available_detectors()
