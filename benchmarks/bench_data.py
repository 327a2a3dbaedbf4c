"""The data path in images/s per loader core, the batched augmentation's cost, and the cores a step needs.

    python -m benchmarks.bench_data --out benchmarks/results/<date>-cpu-2core

Everything runs in this one process on one torch thread (``torch.set_num_threads(1)``), so a rate
is what one loader core gives. The fixture is the packaged demo faces (real aligned 224 px crops,
``pacofr/assets/demo_faces``) turned into the layouts a training run reads, at each size S:

* ``prepared-files`` / ``prepared-shards``: ``pacofr prepare`` (the real pipeline, both formats)
  run on the demo crops with a detector that reports the alignment template where a demo crop has
  it, so its crops are the demo faces at S px;
* ``crops-zip``: the demo crops stored at S in a zip (``data.layout=crops``);
* ``crops-zip-200``: the crops stored at 200 px (as UTKFace's), resized once to S on the way.

Rows:

* ``loader``: items from the encoded bytes to a batch of 64 (``default_collate``; pinned when a
  CUDA device is present): ``uint8`` items (this data path) beside today's ``float`` items and
  ``float+augment`` items (per-image ``Augment`` in the loader);
* ``augment``: per batch of 64 at S on the CPU, ``BatchAugment`` (uint8 batch in, augmented float
  batch out, for several CPU chunk sizes and its default) beside ``Augment`` on each image of the
  same batch (each image made float just before, as the old loader gave it; alone, and with the
  stacking into a batch; and on a float batch made beforehand, the first results' baseline),
  and the part of its cost no batched version avoids (``floor: grid_sample alone per image``),
  measured alternately in the same run (``--augment-only`` measures these rows alone);
* ``cores``: loader cores a training step needs to be fed at given images/s
  (``ceil(rate / uint8 images/s per core)`` of the prepared shards at S).

Rates come from the best of N runs in thread CPU time (the time the loader's thread ran; the
best wall-clock time is recorded beside it): the machine is shared, so the load average is
recorded too, and ratios measured in one run are the figures to read.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import Dataset, default_collate

from benchmarks.harness import environment
from pacofr.data.alignment import template_for_size
from pacofr.data.augment import Augment
from pacofr.data.batch_augment import BatchAugment
from pacofr.data.datasets import AlignedFaceDataset, CroppedFaceDataset, ShardFaceDataset
from pacofr.data.demo import demo_root
from pacofr.data.detection import Detection
from pacofr.data.image_sets import open_image_set
from pacofr.data.prepare import PrepareConfig, prepare_faces
from pacofr.data.storage import read_index

SIZES = (64, 112, 224)
BATCH = 64
CHUNKS = (1, 2, 4, 8, 16, 64)
#: images/s a step would consume (issue 30's estimates for ViT-B/16 on an H100 at 40 % of bf16
#: peak: PaCo-FR about 6,000, MAE-face about 11,000; 3,000 for a smaller GPU or model)
TARGET_RATES = (3000, 6000, 11000)
LAYOUTS = ("prepared-files", "prepared-shards", "crops-zip", "crops-zip-200")
MODES = ("uint8", "float", "float+augment")
STORED_CROP_SIDE = 200


class TemplateDetector:
    """A face detector for photos that are already aligned 224 px demo crops: one face, with the
    alignment template's five points scaled to the photo (a picklable factory of itself)."""

    name = "template"

    def __call__(self) -> TemplateDetector:
        return self

    def detect(self, image: np.ndarray) -> list[Detection]:
        height, width = image.shape[:2]
        points = template_for_size(224).astype(np.float64) * np.array([width / 224.0, height / 224.0])
        box = np.array([0.0, 0.0, width - 1.0, height - 1.0])
        return [Detection(box=box, score=1.0, landmarks5=points)]


def demo_crops() -> list[Path]:
    """The packaged demo crops (224 px JPEGs), sorted."""
    root = demo_root()
    return [root / record["file"] for record in read_index(root)]


def build_layouts(work: Path, size: int, crops: Sequence[Path]) -> dict[str, tuple[type, Path]]:
    """The four layouts of ``crops`` at ``size``, written under ``work``: name -> (dataset class,
    the folder or archive it opens)."""
    source = work / "photos"
    if not source.is_dir():
        source.mkdir(parents=True)
        for number, path in enumerate(crops):
            shutil.copyfile(path, source / f"{number:04d}.jpg")
    layouts: dict[str, tuple[type, Path]] = {}
    for fmt in ("files", "shards"):
        dst = work / f"prepared-{fmt}-{size}"
        prepare_faces(source, dst, PrepareConfig(output_format=fmt, image_size=size, min_size=0.0,
                                                 shard_size=64, detector="template"),
                      detector_factory=TemplateDetector())
        layouts[f"prepared-{fmt}"] = (AlignedFaceDataset if fmt == "files" else ShardFaceDataset, dst)
    for name, side in (("crops-zip", size), ("crops-zip-200", STORED_CROP_SIDE)):
        archive = work / f"{name}-{size}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as handle:
            for number, path in enumerate(crops):
                image = Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=95)
                handle.writestr(f"faces/{number:04d}.jpg", buffer.getvalue())
        layouts[name] = (CroppedFaceDataset, archive)
    return layouts


def open_layout(kind: type, where: Path, size: int, mode: str) -> Dataset:
    """A dataset over one layout giving ``mode`` items (uint8, float, float+augment)."""
    options: dict[str, Any] = {"image_size": size, "uint8": mode == "uint8",
                               "augment": Augment() if mode == "float+augment" else None}
    if kind is CroppedFaceDataset:
        return CroppedFaceDataset(open_image_set(where), **options)
    return kind(where, **options)


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Best wall-clock and best thread CPU time (``time.thread_time``: the time this thread ran,
    not the time other jobs on the shared cores held it off) of ``repeats`` runs, in ms, with
    the 1-minute load average before and after."""
    for _ in range(warmup):
        fn()
    load_before = os.getloadavg()[0]
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        cpus.append((time.thread_time() - cpu) * 1e3)
        walls.append((time.perf_counter() - wall) * 1e3)
    return {"best_cpu_ms": min(cpus), "best_wall_ms": min(walls), "cpu_ms": cpus, "wall_ms": walls,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}


def loader_pass(dataset: Dataset, count: int, pin: bool) -> Callable[[], None]:
    """One timed pass: ``count`` items in batches of BATCH, collated (and pinned)."""
    length = len(dataset)  # type: ignore[arg-type]

    def run() -> None:
        for start in range(0, count, BATCH):
            batch = default_collate([dataset[(start + i) % length] for i in range(BATCH)])
            if pin:
                batch["image"].pin_memory()

    return run


def loader_rows(layouts: dict[str, tuple[type, Path]], size: int, count: int, repeats: int) -> list[dict[str, Any]]:
    pin = torch.cuda.is_available()
    rows = []
    for layout, (kind, where) in layouts.items():
        for mode in MODES:
            dataset = open_layout(kind, where, size, mode)
            timing = timed(loader_pass(dataset, count, pin), repeats)
            per_image = timing["best_cpu_ms"] / count
            rows.append({"row": "loader", "layout": layout, "size": size, "items": mode, "batch": BATCH,
                         "images": count, "pinned": pin, "ms_per_image": per_image,
                         "images_per_s_per_core": 1e3 / per_image, **timing})
    return rows


def augment_rows(size: int, repeats: int) -> list[dict[str, Any]]:
    """BatchAugment per CPU chunk (and its default) beside per-image Augment on the same uint8
    batch, each image made float in [0, 1] just before its ``Augment`` (as the old loader's freshly
    decoded item; BatchAugment converts too): alone (issue 30's baseline) and followed by the
    stacking into a batch that the old loader's collate did (the batched path writes its batch
    directly); the floor of :func:`floor_runs`; and ``Augment`` on the slices of a float batch
    made beforehand, the baseline of the first results (2026-12-07), kept to compare with them.
    Measured alternately."""
    dataset = AlignedFaceDataset(demo_root(), image_size=size, uint8=True)
    batch = default_collate([dataset[i % len(dataset)] for i in range(BATCH)])
    pixels, landmarks = batch["image"], batch["landmarks"]
    floats = pixels.to(torch.float32) / 255.0
    per_image = Augment()
    generator = torch.Generator().manual_seed(0)

    def one_by_one() -> list[torch.Tensor]:  # each image made float just before, as a loader's fresh item
        return [per_image(pixels[i].to(torch.float32).div_(255.0), landmarks[i], generator)[0] for i in range(BATCH)]

    def from_float_batch() -> list[torch.Tensor]:  # the 2026-12-07 baseline: slices of a float batch in memory
        return [per_image(floats[i], landmarks[i], generator)[0] for i in range(BATCH)]

    image_bytes = 3 * size * size * 4
    batched = {f"BatchAugment cpu_chunk={c}": BatchAugment(Augment(), seed=0, cpu_chunk_bytes=c * image_bytes)
               for c in CHUNKS}
    batched["BatchAugment default"] = BatchAugment(Augment(), seed=0)
    runs: dict[str, Callable[[], Any]] = {"Augment per image": one_by_one,
                                          "Augment per image + stack": lambda: torch.stack(one_by_one()),
                                          "Augment per image from a float batch": from_float_batch}
    runs.update({name: (lambda a=augment: a(pixels, landmarks)) for name, augment in batched.items()})
    runs.update(floor_runs(pixels))
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternate, so all see the same load
        for name, fn in runs.items():
            timings[name].append(timed(fn, repeats=1, warmup=int(not timings[name]))["best_cpu_ms"])
    best = {name: min(values) for name, values in timings.items()}
    rows = []
    for name in runs:
        row = {"row": "augment", "size": size, "batch": BATCH, "impl": name, "best_cpu_ms_per_batch": best[name],
               "ms_per_image": best[name] / BATCH, "cpu_ms_per_batch": timings[name]}
        if name in batched:
            row["cpu_chunk_images"] = max(1, batched[name].cpu_chunk_bytes // image_bytes)
            row["cheaper_than_per_image"] = best["Augment per image"] / best[name]
            row["cheaper_than_per_image_stacked"] = best["Augment per image + stack"] / best[name]
        elif name.startswith("floor") or name == "Augment per image from a float batch":
            row["fraction_of_per_image"] = best[name] / best["Augment per image"]
        rows.append(row)
    return rows


def floor_runs(pixels: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """A part of any batched augmentation's cost, for reading its ratio: the bilinear
    ``grid_sample`` alone, one image at a time (each uint8 image made float just before, as
    BatchAugment does; the grid, a rotation by 3 degrees, made beforehand)."""
    size = pixels.shape[-1]
    angle = math.radians(3.0)
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
    grid = F.affine_grid(theta[None], [1, 3, size, size], align_corners=False)

    def warps() -> None:
        for image in pixels.split(1):
            F.grid_sample(image.to(torch.float32), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    return {"floor: grid_sample alone per image": warps}


def cores_rows(rows: list[dict[str, Any]], rates: Sequence[int]) -> list[dict[str, Any]]:
    """Loader cores a step at each rate needs (uint8 items of the prepared shards)."""
    out = []
    for row in rows:
        if row["row"] == "loader" and row["layout"] == "prepared-shards" and row["items"] == "uint8":
            for rate in rates:
                out.append({"row": "cores", "size": row["size"], "images_per_s": rate,
                            "loader_images_per_s_per_core": row["images_per_s_per_core"],
                            "cores": math.ceil(rate / row["images_per_s_per_core"])})
    return out


def run(out: Path, sizes: Sequence[int], count: int, repeats: int, rates: Sequence[int],
        crops: Sequence[Path] | None = None, augment_only: bool = False) -> Path:
    """Measure everything (only the ``augment`` rows with ``augment_only``) and write
    ``out/data.json``; returns its path."""
    torch.set_num_threads(1)
    crops = list(crops) if crops is not None else demo_crops()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pacofr-bench-data-") as scratch:
        for size in sizes:
            if not augment_only:
                rows += loader_rows(build_layouts(Path(scratch), size, crops), size, count, repeats)
            rows += augment_rows(size, repeats)
    rows += cores_rows(rows, rates)
    payload = {
        "benchmark": "data",
        "environment": {**environment(torch.device("cpu")), "torchvision": torchvision.__version__,
                        "pillow": PIL.__version__, "loadavg_end": list(os.getloadavg()),
                        "cuda_available": torch.cuda.is_available()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "augment_only": augment_only,
        "shapes": {"sizes": list(sizes), "batch": BATCH, "images_per_pass": count, "fixture_crops": len(crops),
                   "layouts": list(LAYOUTS), "stored_crop_side_of_crops_zip_200": STORED_CROP_SIDE,
                   "cpu_chunks": list(CHUNKS)},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def summary(path: Path) -> str:
    """A few lines of the figures that matter, from a written ``data.json``."""
    rows = json.loads(path.read_text())["rows"]
    lines = []
    for row in rows:
        if row["row"] == "loader":
            lines.append(f"loader {row['layout']:16s} {row['size']:4d} px {row['items']:14s} "
                         f"{row['images_per_s_per_core']:8.0f} images/s per core")
        elif row["row"] == "augment":
            ratio = (f" ({row['cheaper_than_per_image']:.2f}x cheaper than per image, "
                     f"{row['cheaper_than_per_image_stacked']:.2f}x with the stacking)"
                     if "cheaper_than_per_image" in row else
                     f" ({row['fraction_of_per_image']:.2f} of per image)" if "fraction_of_per_image" in row else "")
            lines.append(f"augment {row['size']:4d} px {row['impl']}: {row['ms_per_image']:.3f} ms/image{ratio}")
        else:
            lines.append(f"cores {row['size']:4d} px at {row['images_per_s']} images/s: {row['cores']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder (data.json is written there)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sides (px)")
    parser.add_argument("--images", type=int, default=512, help="items per timed loader pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    parser.add_argument("--rates", type=int, nargs="+", default=list(TARGET_RATES),
                        help="images/s a step consumes, for the cores rows")
    parser.add_argument("--augment-only", action="store_true",
                        help="measure only the augment rows (no loader layouts, no cores rows)")
    args = parser.parse_args(argv)
    bad = [s for s in args.sizes if s < 8] + ([args.images] if args.images < 1 else []) \
        + ([args.repeats] if args.repeats < 1 else []) + [r for r in args.rates if r < 1]
    if bad:
        print(f"error: --sizes must be >= 8 and --images, --repeats, --rates >= 1; got {bad}", file=sys.stderr)
        return 2
    path = run(args.out, args.sizes, args.images, args.repeats, args.rates, augment_only=args.augment_only)
    print(summary(path))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
