"""decode_crop: the fast JPEG path gives PIL's pixels, everything else takes load_image, one resize."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pacofr.data.decode import check_batch_jpeg, decode_crop, decode_jpeg_batch
from pacofr.data.demo import demo_root
from pacofr.data.image_io import UnreadableImageError, load_image
from pacofr.data.storage import read_index


def encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def demo_jpegs(count: int) -> list[bytes]:
    root = demo_root()
    return [(root / record["file"]).read_bytes() for record in read_index(root)[:count]]


def pil_pixels(data: bytes, size: int | None = None) -> np.ndarray:
    """The truth: PIL's decode (and PIL's bilinear resize), as (3, H, W)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def test_prepared_crops_decode_to_pils_pixels():
    for data in demo_jpegs(6):
        pixels, stored = decode_crop(data, "crop", 224)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224) and stored == (224, 224)
        np.testing.assert_array_equal(pixels.numpy(), pil_pixels(data))


def test_other_sizes_are_resized_once_as_pil_resizes():
    data = demo_jpegs(1)[0]
    for size in (64, 112, 300):
        pixels, stored = decode_crop(data, "crop", size)
        assert stored == (224, 224)
        np.testing.assert_array_equal(pixels.numpy(), pil_pixels(data, size))
    native, stored = decode_crop(encoded(Image.new("RGB", (30, 20), (10, 20, 30))), "wide")
    assert native.shape == (3, 20, 30) and stored == (30, 20)


def test_grey_png_and_rotated_jpegs_take_the_general_path():
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8))
    for data in (encoded(grey), encoded(grey, "PNG")):
        pixels, _ = decode_crop(data, "grey", 24)
        assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])
        np.testing.assert_array_equal(pixels.numpy(), load_image(data).transpose(2, 0, 1))
    tall = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = encoded(tall, exif=exif)
    pixels, stored = decode_crop(data, "rotated")
    assert stored == (16, 24) and pixels.shape == (3, 24, 16)  # upright, as load_image gives it
    np.testing.assert_array_equal(pixels.numpy(), load_image(data).transpose(2, 0, 1))


def test_bad_bytes_are_named():
    data = demo_jpegs(1)[0]
    with pytest.raises(UnreadableImageError, match="crop-a.*empty"):
        decode_crop(b"", "crop-a", 224)
    with pytest.raises(UnreadableImageError, match="crop-b.*not a decodable image"):
        decode_crop(b"not an image at all", "crop-b", 224)
    with pytest.raises(UnreadableImageError, match="crop-c.*max_pixels"):
        decode_crop(data, "crop-c", 224, max_pixels=224 * 224 - 1)
    with pytest.raises(UnreadableImageError, match="crop-d"):
        decode_crop(data[: len(data) // 2], "crop-d", 224)


def test_a_cpu_batch_decode_gives_the_per_item_pixels():
    """The same bytes through the same decoder: exactly decode_crop's pixels, which are PIL's."""
    jpegs = demo_jpegs(5)
    batch = decode_jpeg_batch(jpegs, "cpu")
    assert batch.dtype == torch.uint8 and batch.shape == (5, 3, 224, 224)
    for data, pixels in zip(jpegs, batch):
        assert torch.equal(pixels, decode_crop(data, "crop", 224)[0])
        np.testing.assert_array_equal(pixels.numpy(), pil_pixels(data))


def test_batch_decode_names_the_bad_jpegs():
    good = demo_jpegs(3)
    with pytest.raises(UnreadableImageError, match="face-1: corrupt or truncated"):
        decode_jpeg_batch([good[0], b"\xff\xd8 not a jpeg", good[2]], "cpu", ["face-0", "face-1", "face-2"])
    small = encoded(Image.new("RGB", (32, 32), (10, 20, 30)))
    with pytest.raises(UnreadableImageError, match="item 1 of the batch.*not 224x224"):
        decode_jpeg_batch([good[0], small], "cpu")
    with pytest.raises(ValueError, match="2 names for 3"):
        decode_jpeg_batch(good, "cpu", ["a", "b"])


def test_only_plain_jpegs_at_the_training_size_are_batch_decodable():
    data = demo_jpegs(1)[0]
    check_batch_jpeg(data, "crop", 224)  # what pacofr prepare writes, at its size
    with pytest.raises(UnreadableImageError, match="crop-a.*224x224, not 112x112"):
        check_batch_jpeg(data, "crop-a", 112)
    square = Image.new("RGB", (24, 24), (90, 60, 30))
    with pytest.raises(UnreadableImageError, match="crop-b.*PNG image that is not a plain"):
        check_batch_jpeg(encoded(square, "PNG"), "crop-b", 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated on display: nvJPEG would ignore it
    with pytest.raises(UnreadableImageError, match="crop-c.*EXIF rotation"):
        check_batch_jpeg(encoded(square, exif=exif), "crop-c", 24)
    with pytest.raises(UnreadableImageError, match="crop-d.*empty"):
        check_batch_jpeg(b"", "crop-d", 24)
    with pytest.raises(UnreadableImageError, match="crop-e.*max_pixels"):
        check_batch_jpeg(data, "crop-e", 224, max_pixels=224 * 224 - 1)


@pytest.mark.gpu
def test_nvjpeg_batch_matches_the_cpu_decoder():
    rng = np.random.default_rng(1)
    grey = [encoded(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).convert("RGB").convert("L"))
            for _ in range(4)]
    decoded = decode_jpeg_batch(grey, "cuda")
    assert decoded.device.type == "cuda" and decoded.shape == (4, 3, 32, 32)
    for data, pixels in zip(grey, decoded):
        cpu = decode_crop(data, "grey")[0]
        # a grey JPEG has no chroma upsampling: the decoders differ only in their IDCT, which
        # IEEE 1180 (JPEG's accuracy rule) lets err by at most 1 level per pixel
        assert int((pixels.cpu().int() - cpu.int()).abs().max()) <= 1
    with pytest.raises(UnreadableImageError, match="item 1 of the batch"):
        decode_jpeg_batch([grey[0], b"\xff\xd8 not a jpeg"], "cuda")
