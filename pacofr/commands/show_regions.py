"""``pacofr show-regions IMG``: draw the facial-region map over an aligned face."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``show-regions``."""
    parser = subparsers.add_parser(
        "show-regions", help="overlay the facial-region map (patch region ids) on an aligned face",
        description="Colour every patch of an aligned face by its region id. Landmarks come from the index of the "
                    "prepared folder the image belongs to, or from the detector with --align (which first aligns "
                    "an ordinary photo; needs the 'faces' extra).")
    parser.add_argument("image", help="aligned face (a crop written by `pacofr prepare`), or any photo with --align")
    parser.add_argument("--out", help="output PNG (default: <image name>_regions.png in the current folder)")
    parser.add_argument("--mode", choices=("template", "landmarks"), default="landmarks",
                        help="fixed template boxes, or boxes that follow this face's landmarks (default)")
    parser.add_argument("--grid", type=int, default=14, help="patches per side (default 14)")
    parser.add_argument("--align", action="store_true", help="detect and align the photo first")
    parser.set_defaults(func=run)


def _indexed_landmarks(image_path: Path) -> np.ndarray | None:
    """Landmarks stored for ``image_path`` by the prepared folder it sits in (searching up to
    three parent folders for an index.jsonl), or None."""
    from pacofr.data.storage import INDEX_NAME, read_jsonl

    resolved = image_path.resolve()
    for root in list(resolved.parents)[:3]:
        index = root / INDEX_NAME
        if not index.is_file():
            continue
        relative = resolved.relative_to(root).as_posix()
        for record in read_jsonl(index):
            if record.get("file") == relative:
                return np.asarray(record["landmarks"], dtype=np.float64)
    return None


def run(args: argparse.Namespace) -> int:
    """Write the overlay PNG. Bad input raises (reported by :func:`pacofr.cli.main` in one line)."""
    from pacofr.data.alignment import AlignmentRecipe, template_for_size, transform_points
    from pacofr.data.detection import create_detector, select_faces
    from pacofr.data.image_io import load_image
    from pacofr.data.regions import landmark_region_ids, region_overlay, template_region_ids

    path = Path(args.image)
    image = load_image(path)
    landmarks = None
    if args.align:
        faces, outcome = select_faces(create_detector("mtcnn").detect(image), "largest", 0.0)
        if not faces:
            print(f"error: no face found in {path} ({outcome})", file=sys.stderr)
            return 1
        image, matrix = AlignmentRecipe().align(image, faces[0].landmarks5)
        landmarks = transform_points(matrix, faces[0].landmarks5)
    else:
        landmarks = _indexed_landmarks(path)
    height, width = image.shape[:2]
    if height != width:
        raise ValueError(f"{path} is {width}x{height}, not an aligned (square) face; use --align")
    if args.grid < 1 or args.grid > width:
        raise ValueError(f"--grid must be in [1, {width}], got {args.grid}")
    if args.mode == "template":
        ids = template_region_ids(args.grid, width)
        shown = template_for_size(width)
    else:
        if landmarks is None:
            raise ValueError(f"no landmarks for {path}: pass a crop from a prepared folder (its index.jsonl "
                             "holds them), use --align, or --mode template")
        ids = landmark_region_ids(landmarks, args.grid, width)
        shown = landmarks
    out = Path(args.out) if args.out else Path.cwd() / f"{path.stem}_regions.png"
    region_overlay(image, ids, args.grid, landmarks=shown).save(out)
    print(f"wrote {out}")
    return 0
