"""``pacofr prepare SRC DST``: detect, align and store the faces of a folder of photos."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prepare``."""
    parser = subparsers.add_parser(
        "prepare", help="photos -> aligned 224x224 face crops + landmarks (files or tar shards)",
        description="Detect faces (5 landmarks) in every photo under SRC (JPEG/PNG/WebP/..., any size, EXIF "
                    "rotation honoured), align them to the canonical template and write the crops with an index "
                    "to DST. Re-running the same command resumes an interrupted run. Needs the 'faces' extra: "
                    "pip install \"pacofr[faces]\".")
    parser.add_argument("src", help="folder of photos (searched recursively)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--format", dest="output_format", choices=("files", "shards"), default="files",
                        help="JPEG files + index.jsonl, or tar shards + index.jsonl (default files)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--multi-face", choices=("largest", "all", "skip"), default="largest",
                        help="photos with several faces: keep the largest, keep all, or skip the photo")
    parser.add_argument("--min-size", type=float, default=32.0,
                        help="ignore faces whose box is shorter than this many source pixels (default 32)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the aligned crops (default 224)")
    parser.add_argument("--border", choices=("constant", "replicate", "reflect"), default="constant",
                        help="fill outside the photo (default constant: black)")
    parser.add_argument("--detector", default="mtcnn", help="face detector (default mtcnn)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the crops (default 95)")
    parser.add_argument("--shard-size", type=int, default=1000, help="faces per shard (default 1000)")
    parser.add_argument("--max-pixels", type=int, default=100_000_000,
                        help="photos with more pixels are counted unreadable (default 100000000)")
    parser.add_argument("--max-bytes", type=int, default=512 * 2**20,
                        help="files larger than this are counted unreadable, not read (default 536870912: 512 MiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline and print its summary (errors: see :func:`pacofr.cli.main`)."""
    from pacofr.data.prepare import PrepareConfig, prepare_faces

    config = PrepareConfig(output_format=args.output_format, multi_face=args.multi_face, min_size=args.min_size,
                           image_size=args.image_size, border=args.border, detector=args.detector,
                           jpeg_quality=args.quality, shard_size=args.shard_size, max_pixels=args.max_pixels,
                           max_bytes=args.max_bytes)
    summary = prepare_faces(args.src, args.dst, config, workers=args.workers, progress=not args.no_progress)
    print(summary.format())
    return 0
