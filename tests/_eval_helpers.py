"""Helpers shared by the evaluation tests: the ``eval`` command, and a tiny synthetic data root in
the formats of ``/work/shared/data`` (npz files, a zip of JPEGs with a CSV), with labels a probe
can learn (each class or number moves a bright blob), so protocols can be checked end to end."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pacofr.cli import error_line, expected_errors
from pacofr.commands import eval as eval_command


def run_eval(argv: list[str]) -> int:
    """``pacofr eval ...`` through the command module (independent of pacofr.cli's module list); an
    expected error is printed as pacofr.cli.main prints it (one ``error: ...`` line on stderr), exit 2."""
    parser = argparse.ArgumentParser(prog="pacofr")
    eval_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    try:
        return args.func(args)
    except expected_errors() as err:
        print(error_line(err), file=sys.stderr)
        return 2


def blob_image(rng: np.random.Generator, height: int, width: int, centre: tuple[float, float],
               colour: tuple[float, float, float] | None = None, noise: float = 0.08) -> np.ndarray:
    """uint8 (H, W) grey or (H, W, 3) colour: noise plus a bright disk at ``centre`` (fractions x, y)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = centre[0] * width, centre[1] * height
    disk = np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * (0.12 * min(height, width)) ** 2))
    grey = np.clip(0.25 + 0.6 * disk + rng.normal(0, noise, (height, width)), 0, 1)
    if colour is None:
        return (grey * 255).astype(np.uint8)
    return (np.clip(grey[..., None] * np.array(colour), 0, 1) * 255).astype(np.uint8)


def class_centre(label: int, classes: int) -> tuple[float, float]:
    """Where class ``label``'s blob sits: on a circle around the image centre."""
    angle = 2 * np.pi * label / classes
    return 0.5 + 0.28 * np.cos(angle), 0.5 + 0.28 * np.sin(angle)


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_fer(root: Path, rng: np.random.Generator, per_class: int = 12) -> dict:
    """fer2013/fer2013.npz: 7 classes, train / test, a duplicate group spanning both splits."""
    labels, splits, images = [], [], []
    for label in range(7):
        for i in range(per_class):
            labels.append(label)
            splits.append(0 if i < per_class * 2 // 3 else 1)
            images.append(blob_image(rng, 48, 48, class_centre(label, 7)))
    n = len(labels)
    dup_group = np.full(n, -1, dtype=np.int32)
    cross = np.zeros(n, dtype=bool)
    train0 = splits.index(0)
    test0 = splits.index(1)
    images[test0] = images[train0].copy()  # a test image with an exact copy in train
    dup_group[[train0, test0]] = 0
    cross[[train0, test0]] = True
    folder = root / "fer2013"
    folder.mkdir(parents=True)
    np.savez_compressed(
        folder / "fer2013.npz", images=np.stack(images), labels=np.array(labels, dtype=np.int64),
        split=np.array(splits, dtype=np.int8), split_names=np.array(["train", "test"]),
        class_names=np.array(["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]),
        filenames=np.array([f"{'train' if s == 0 else 'test'}/c{lab}/img_{i}.jpg"
                            for i, (lab, s) in enumerate(zip(labels, splits, strict=True))]),
        dup_group=dup_group, dup_cross_split=cross, dup_label_conflict=np.zeros(n, dtype=bool),
        usage=np.array(["Training" if s == 0 else "PublicTest" for s in splits]))
    return {"n": n, "dropped_test": int(test0 >= 0)}


def write_utkface(root: Path, rng: np.random.Generator, n: int = 90) -> dict:
    """utkface_crop_part1/labels.csv + images.zip (stored JPEGs, 40 px colour): gender tints the
    face, age moves the blob; two duplicate groups."""
    folder = root / "utkface_crop_part1"
    folder.mkdir(parents=True)
    rows = []
    with zipfile.ZipFile(folder / "images.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(n):
            gender, age = i % 2, int(rng.integers(1, 90))
            tint = (1.0, 0.7, 0.6) if gender else (0.6, 0.7, 1.0)
            pixels = blob_image(rng, 40, 40, (0.2 + 0.6 * age / 90, 0.5), colour=tint)
            name = f"crop_part1/{age}_{gender}_0_2017010{i:04d}.jpg.chip.jpg"
            archive.writestr(name, jpeg(pixels))
            rows.append({"path": name, "age": age, "gender": gender, "race": 0, "datetime": i,
                         "dup_group": 0 if i in (0, 1) else 1 if i in (2, 3) else -1})
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"n": n}


def write_identity_npz(path: Path, rng: np.random.Generator, people: int, per_person: int, height: int,
                       width: int, prefix: str, filenames: bool) -> None:
    labels = np.repeat(np.arange(people), per_person)
    images = np.stack([blob_image(rng, height, width, class_centre(int(p), people), noise=0.05) for p in labels])
    extra = {"filenames": np.array([f"{prefix}{p:02d}/{prefix}{p:02d}_{i}.pgm" for i, p in enumerate(labels)])} \
        if filenames else {}
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, images=images, labels=labels.astype(np.int64),
                        class_names=np.array([f"{prefix}{p + 1}" for p in range(people)]), **extra)


LANDMARKS = 68


def write_ytf(root: Path, rng: np.random.Generator, identities: int = 12, per_identity: int = 6) -> dict:
    """ytf_udacity68/ytf_udacity68.npz: 32 px colour JPEGs in a flat buffer, 68 points in 128-px
    coordinates (a random shift of a fixed shape, which the blob follows), identity-disjoint split."""
    base = rng.uniform(40, 88, (LANDMARKS, 2))
    base[36], base[45] = (44, 56), (84, 56)
    buffers, offsets, points, split, names, identity = [], [0], [], [], [], []
    for person in range(identities):
        for i in range(per_identity):
            shift = rng.uniform(-16, 16, 2)
            points.append(base + shift)
            centre = ((64 + shift[0]) / 128, (64 + shift[1]) / 128)
            data = jpeg(blob_image(rng, 32, 32, centre, colour=(1.0, 0.9, 0.8), noise=0.03))
            buffers.append(np.frombuffer(data, dtype=np.uint8))
            offsets.append(offsets[-1] + len(data))
            split.append(1 if person >= identities * 3 // 4 else 0)
            names.append(f"Person_{person}_{i}.jpg")
            identity.append(f"Person_{person}")
    folder = root / "ytf_udacity68"
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "ytf_udacity68.npz", jpeg=np.concatenate(buffers),
                        jpeg_offsets=np.array(offsets, dtype=np.int64),
                        landmarks=np.stack(points).astype(np.float32), split=np.array(split, dtype=np.uint8),
                        split_orig=np.zeros(len(split), dtype=np.uint8), names=np.array(names),
                        identity=np.array(identity))
    return {"n": len(names)}


def write_face_root(root: Path, seed: int = 0) -> Path:
    """Every face set of :mod:`pacofr.eval.face_protocols`, tiny and synthetic, under ``root``."""
    rng = np.random.default_rng(seed)
    write_fer(root, rng)
    write_utkface(root, rng)
    write_identity_npz(root / "olivetti" / "olivetti.npz", rng, people=6, per_person=10, height=64, width=64,
                       prefix="s", filenames=False)
    write_identity_npz(root / "extended_yaleb_cropped" / "extended_yaleb_96x84.npz", rng, people=5, per_person=12,
                       height=48, width=42, prefix="yaleB", filenames=True)
    write_ytf(root, rng)
    return root
