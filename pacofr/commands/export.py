"""``pacofr export``: a checkpoint's encoder as a timm model folder (safetensors + config.json)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint's encoder as a timm model",
        description="Write model.safetensors, config.json (timm architecture, model_args, pretrained_cfg with "
                    "mean/std, the face-alignment recipe) and alignment_recipe.json. Load the result with "
                    "timm.create_model('local-dir:OUT', pretrained=True).")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder (step_*), a checkpoints folder or a run folder (its newest)")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty or an earlier export (never inside a run's checkpoints)")
    parser.add_argument("--teacher", action="store_true",
                        help="export the EMA teacher instead of the student encoder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacofr.train.export import export_encoder

    result = export_encoder(args.checkpoint, args.out, teacher=args.teacher)  # errors: see pacofr.cli
    print(f"exported {result.architecture} encoder to {result.out_dir}:")
    print(f"  weights  {result.weights}")
    print(f"  config   {result.config}")
    print(f"load it with: timm.create_model('local-dir:{result.out_dir}', pretrained=True)")
    return 0
