"""``pacofr pretrain``: PaCo-FR (or MAE-face, MCF-style, FRA-style) pre-training from a preset or YAML config.

Examples::

    pacofr pretrain --config demo                          # CPU demo -> runs/demo
    pacofr pretrain --config vit_base --set data.root=/data/faces --out runs/b16
    pacofr pretrain --config demo --resume                 # continue runs/demo exactly
    pacofr pretrain --resume runs/b16                      # config read from the checkpoint
    torchrun --nproc_per_node 8 -m pacofr pretrain --config vit_base --set data.root=/data/faces
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pacofr.train.config import PretrainConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pre-train PaCo-FR (or the MAE-face control)",
        description="Pre-train PaCo-FR on aligned faces. Writes config.yaml, scalars.csv, checkpoints/, "
                    "loss_curve.png and reconstructions.png into the output folder. The config fields and "
                    "their values (the defaults of a preset, after --set): --print-config.")
    parser.add_argument("--config", default=None,
                        help="a packaged preset (demo, vit_tiny, vit_small, vit_base) or a YAML file; with "
                             "--resume and no --config, the config stored in the checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.epochs=10 --set model.r_mask=0.5 "
                             "(repeatable; values are checked against the field's type)")
    parser.add_argument("--out", default=None, help="output folder (overrides train.out_dir)")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue exactly from a checkpoint, checkpoints folder or run folder; without "
                             "PATH, the newest checkpoint in the output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="a fresh run into a folder that holds an earlier run deletes that run's "
                             "checkpoints, scalars and pictures (without it the run refuses to start)")
    parser.add_argument("--method", default=None, metavar="METHOD",
                        help="shorthand for --set model.method=METHOD: paco (PaCo-FR), mae (the MAE-face "
                             "control), mcf or fra (the MCF-style / FRA-style peers)")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config field of the run (preset or YAML, --set, --method, --out "
                             "applied) as YAML and exit without training")
    parser.set_defaults(func=run)


def _resolve_config(args: argparse.Namespace) -> tuple[PretrainConfig, Path | None]:
    """The run's config and the checkpoint to resume from (None for a fresh run). Resuming from a
    run or checkpoints folder takes its newest intact checkpoint (corrupted newer ones are skipped,
    each named with the reason). A resume under other model settings is refused."""
    from pacofr import checkpoint as ckpt
    from pacofr.train.config import apply_overrides, load_config
    from pacofr.train.fields import ConfigError

    if args.out is not None and not args.out.strip():
        raise ConfigError("--out: expected an output folder, got an empty string")
    overrides = list(args.overrides)
    if args.method is not None:
        overrides.append(f"model.method={args.method}")
    if args.out is not None:
        overrides.append(f"train.out_dir={args.out}")

    if args.config is None and args.resume is None:
        raise ConfigError("pass --config (a preset: demo, vit_tiny, vit_small, vit_base, or a YAML file), "
                          "or --resume PATH to continue a run")
    if args.config is not None:
        cfg = load_config(args.config, overrides)
        if args.resume is None:
            return cfg, None
        resume_from = Path(args.resume) if args.resume else Path(cfg.train.out_dir)
        checkpoint = ckpt.find_intact_checkpoint(resume_from)
        _check_same_model(_stored_config(checkpoint), cfg, checkpoint)
        return cfg, checkpoint
    if not args.resume and args.out is None:
        raise ConfigError("--resume without PATH needs --config or --out to know which run to continue")
    checkpoint = ckpt.find_intact_checkpoint(Path(args.resume or args.out))
    stored = _stored_config(checkpoint)
    cfg = apply_overrides(stored, overrides)
    _check_same_model(stored, cfg, checkpoint)
    return cfg, checkpoint


#: Model settings a resumed run may change: where and how precisely the ops run, not what is learnt.
RESUMABLE_MODEL_CHANGES = ("backend", "codebook_precision")


def _stored_config(checkpoint: Path) -> PretrainConfig:
    """The run config stored in ``checkpoint`` (ConfigError naming the checkpoint when it has none
    or it does not load)."""
    from pacofr import checkpoint as ckpt
    from pacofr.train.config import PretrainConfig
    from pacofr.train.fields import ConfigError

    stored = ckpt.read_meta(checkpoint).get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"checkpoint {checkpoint}: its {ckpt.META_FILE} holds no run config; pass --config")
    try:
        return PretrainConfig.from_dict(stored)
    except ConfigError as err:
        raise ConfigError(f"checkpoint {checkpoint / ckpt.META_FILE}: {err}") from None


def _check_same_model(stored: PretrainConfig, cfg: PretrainConfig, checkpoint: Path) -> None:
    """Refuse a resume whose model settings differ from the checkpoint's (other than
    :data:`RESUMABLE_MODEL_CHANGES`), naming each change, before anything is written."""
    from pacofr.train.fields import ConfigError

    before, after = stored.model.to_dict(), cfg.model.to_dict()
    changed = [f"model.{key} {before[key]!r} -> {after[key]!r}" for key in after
               if before.get(key) != after[key] and key not in RESUMABLE_MODEL_CHANGES]
    if changed:
        raise ConfigError(f"--resume {checkpoint}: the run was trained with other model settings ("
                          f"{'; '.join(changed[:5])}{'; ...' if len(changed) > 5 else ''}); resume with the run's "
                          "own settings (leave out --config to use them), or start a new run in another --out")


def run(args: argparse.Namespace) -> int:
    """Train; errors propagate to :func:`pacofr.cli.main`, which reports them in one line."""
    from pacofr.train.config import dump_config
    from pacofr.train.pretrain import run_pretraining

    cfg, resume = _resolve_config(args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    result = run_pretraining(cfg, resume=resume, overwrite=args.overwrite)
    if result.checkpoint is not None:  # rank 0
        print(f"pre-training finished at step {result.step}; files in {result.out_dir}:")
        print(f"  checkpoint       {result.checkpoint}")
        print(f"  scalars          {result.scalars}")
        print(f"  loss curve       {result.loss_curve}")
        print(f"  reconstructions  {result.reconstructions}")
        print(f"export the encoder for timm with: pacofr export --checkpoint {result.checkpoint} "
              f"--out {result.out_dir / 'export'}")
    return 0
