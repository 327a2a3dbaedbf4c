"""What each codebook precision setting costs in accuracy, on real face patches, and whether it changes training.

    python -m benchmarks.precision --faces /work/shared/data/utkface_crop_part1/images.zip --out docs/precision

Settings (``pacofr.ops.precision``): ``ieee`` (exact fp32), ``tf32x3``, ``tf32``, ``bf16``. Two
measurements, both on the CPU, where the torch backend reproduces each setting's rounding of the
score operands exactly (so the numbers are what a GPU computes, up to fp32 summation order):

1. **Op accuracy** against a float64 oracle, on patches of the packaged demo faces and of the
   faces given with ``--faces`` (any image set ``pacofr.data.image_sets`` reads), in the shapes the
   model uses them:

   * ``nearest_token`` as the incubation labels: norm-pix patch pixels (64 px faces, 8 px patches,
     P = 192, and 128 px faces, 16 px patches, P = 768) against K k-means prototypes of those
     patches (K = 256 / 4096): top-1 agreement with the float64 argmin, and the mean relative
     excess distance of the chosen code over the best one;
   * ``soft_assign`` as the soft tokens: beliefs (unit vectors from a fixed random linear map of
     the patches, dc = 32 / 64) against K normalised k-means codes of them, m = 4, tau = 0.1:
     agreement of the candidate sets, and the relative error of the token and of its gradients
     (w.r.t. the beliefs and the codebook, for a fixed random upstream gradient).

2. **Training**: the ``demo`` pre-training (``pacofr pretrain --config demo``) once per setting with
   the same seed on the torch backend: the loss curves side by side and the final losses.

Writes ``precision.json``, ``precision.md`` and ``loss_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import pacofr
from pacofr.ops import nearest_token, patch_targets, soft_assign
from pacofr.ops.precision import PRECISIONS
from pacofr.ops.soft_assign import soft_assign_reference

logger = logging.getLogger("benchmarks.precision")


@dataclass(frozen=True)
class PatchSet:
    """Norm-pix patches (N, P) fp32 of faces resized to ``image_size`` and cut into ``patch`` px patches."""

    name: str
    image_size: int
    patch: int
    codes: int  #: K of the prototypes
    belief_dim: int  #: dc of the soft-assignment case


def face_images(source: str | None, size: int, limit: int, seed: int) -> torch.Tensor:
    """(B, 3, size, size) fp32 in [0, 1]: the packaged demo faces, or up to ``limit`` images of ``source``."""
    if source is None:
        from pacofr.data import demo_dataset

        dataset = demo_dataset(image_size=size)
        return torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    from pacofr.data.image_sets import open_image_set

    images = open_image_set(source)
    pick = np.random.default_rng(seed).permutation(len(images))[:limit]
    batch = [torch.from_numpy(images.read(int(i))).permute(2, 0, 1).float()[None] / 255 for i in pick]
    return torch.cat([F.interpolate(b, size=(size, size), mode="bilinear", align_corners=False) for b in batch])


def norm_pix_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Every patch of every image as the model's incubation sees it: (B * L, P) norm-pix fp32."""
    grid = images.shape[-1] // patch
    ids = torch.arange(grid * grid).expand(images.shape[0], -1)
    return patch_targets(images, ids, patch, norm_pix=True, backend="torch").reshape(-1, patch * patch * 3)


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """(k, D) float64 centroids of ``points`` by Lloyd's algorithm from a random sample."""
    data = points.double()
    centroids = data[torch.randperm(data.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(data, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k).double()[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def lookup_accuracy(x: torch.Tensor, codes: torch.Tensor, exact: torch.Tensor, precision: str,
                    backend: str) -> dict[str, float]:
    """nearest_token (l2, k=1) at ``precision`` against the float64 argmin of ``exact`` (N, K) squared distances."""
    _, index = nearest_token(x, codes, 1, "l2", precision=precision, backend=backend)
    best = exact.min(dim=1).values
    chosen = exact.gather(1, index.long()).squeeze(1)
    return {"top1_agreement": float((index[:, 0] == exact.argmin(dim=1)).double().mean()),
            "mean_relative_excess": float(((chosen - best) / best.clamp_min(1e-30)).mean()),
            "max_relative_excess": float(((chosen - best) / best.clamp_min(1e-30)).max())}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def soft_token_accuracy(q: torch.Tensor, codes: torch.Tensor, m: int, tau: float, precision: str, backend: str,
                        generator: torch.Generator) -> dict[str, float]:
    """soft_assign (cosine) at ``precision`` against the float64 reference: sets, token and gradients."""
    upstream = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    q64, c64 = q.double().requires_grad_(), codes.double().requires_grad_()
    want = soft_assign_reference(q64, c64, m, tau, metric="cosine")
    (want.token * upstream).sum().backward()
    q32, c32 = q.clone().requires_grad_(), codes.clone().requires_grad_()
    got = soft_assign(q32, c32, m, tau, metric="cosine", precision=precision, backend=backend)
    (got.token.double() * upstream).sum().backward()
    same_set = (got.indices.sort(dim=1).values == want.indices.sort(dim=1).values).all(dim=1)
    return {"candidate_set_agreement": float(same_set.double().mean()),
            "top1_agreement": float((got.indices[:, 0] == want.indices[:, 0]).double().mean()),
            "token_relative_error": _relative(got.token, want.token),
            "grad_q_relative_error": _relative(q32.grad, q64.grad),
            "grad_codebook_relative_error": _relative(c32.grad, c64.grad)}


def op_rows(patch_sets: list[PatchSet], faces: str | None, limit: int, backends: list[str],
            seed: int) -> list[dict[str, Any]]:
    """Accuracy of every precision on every patch set and backend."""
    rows = []
    for spec in patch_sets:
        generator = torch.Generator().manual_seed(seed)
        images = face_images(faces, spec.image_size, limit, seed)
        patches = norm_pix_patches(images, spec.patch)
        patches = patches[torch.randperm(patches.shape[0], generator=generator)[:20000]]
        prototypes = kmeans(patches, spec.codes, 8, generator).float()
        projection = torch.randn(patches.shape[1], spec.belief_dim, generator=generator)
        beliefs = F.normalize(patches @ projection, dim=1)
        belief_codes = F.normalize(kmeans(beliefs, spec.codes, 8, generator), dim=1).float()
        exact = torch.cdist(patches.double(), prototypes.double()).square()
        logger.info("%s: %d patches of %d values, K=%d", spec.name, patches.shape[0], patches.shape[1], spec.codes)
        for backend in backends:
            for precision in PRECISIONS:
                row = {"patch_set": spec.name, "faces": faces or "demo", "backend": backend, "precision": precision,
                       "patches": patches.shape[0], "patch_dim": patches.shape[1], "codes": spec.codes,
                       "belief_dim": spec.belief_dim}
                row["lookup"] = lookup_accuracy(patches, prototypes, exact, precision, backend)
                row["soft_assign"] = soft_token_accuracy(beliefs[:4096], belief_codes, 4, 0.1, precision, backend,
                                                         generator)
                logger.info("%s %s %s: %s %s", spec.name, backend, precision, row["lookup"], row["soft_assign"])
                rows.append(row)
    return rows


def training_runs(out: Path, seed: int) -> dict[str, list[dict[str, float]]]:
    """The demo pre-training once per precision (torch backend): step -> loss rows from scalars.csv."""
    from pacofr.train.config import load_config
    from pacofr.train.pretrain import run_pretraining

    curves = {}
    for precision in PRECISIONS:
        run_dir = out / "runs" / precision
        cfg = load_config("demo", [f"model.codebook_precision={precision}", "model.backend=torch",
                                   f"train.seed={seed}", f"train.out_dir={run_dir}", "train.viz_every=0"])
        run_pretraining(cfg, overwrite=True)
        with open(run_dir / "scalars.csv") as handle:
            curves[precision] = [{"step": int(r["step"]), "loss": float(r["loss"])}
                                 for r in csv.DictReader(handle) if r["loss"]]
        logger.info("demo run at %s: final loss %.4f", precision, curves[precision][-1]["loss"])
    return curves


def plot_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Loss per step of every setting, and each one's difference from ``ieee`` (the exact run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, diff) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    exact = {r["step"]: r["loss"] for r in curves.get("ieee", [])}
    for number, (precision, rows) in enumerate(curves.items()):
        colour = f"C{number}"
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=precision, linewidth=1.2, color=colour)
        if exact and precision != "ieee":
            shared = [r for r in rows if r["step"] in exact]
            diff.plot([r["step"] for r in shared], [r["loss"] - exact[r["step"]] for r in shared], label=precision,
                      linewidth=1.0, color=colour)
    ax.set_yscale("log")
    ax.set_ylabel("total loss")
    ax.set_title("demo pre-training per codebook precision (CPU, same seed)")
    ax.legend()
    diff.axhline(0.0, color="grey", linewidth=0.6)
    diff.set_xlabel("optimiser step")
    diff.set_ylabel("loss - loss at ieee")  # tf32x3 is exact fp32 on the CPU: its line is the run-to-run noise
    diff.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(record: dict[str, Any]) -> str:
    lines = ["# Codebook precision: accuracy and training", "",
             f"Measured {record['environment']['date']} on {record['environment']['machine']} (CPU; the torch "
             "backend reproduces each setting's operand rounding), by `python -m benchmarks.precision`.", "",
             "| patches | backend | precision | lookup top-1 = fp64 | lookup mean excess | soft_assign sets = fp64 "
             "| token rel. err. | grad q rel. err. | grad codebook rel. err. |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in record["ops"]:
        look, soft = row["lookup"], row["soft_assign"]
        lines.append(f"| {row['patch_set']} ({row['faces']}) | {row['backend']} | {row['precision']} | "
                     f"{100 * look['top1_agreement']:.2f}% | {look['mean_relative_excess']:.1e} | "
                     f"{100 * soft['candidate_set_agreement']:.2f}% | {soft['token_relative_error']:.1e} | "
                     f"{soft['grad_q_relative_error']:.1e} | {soft['grad_codebook_relative_error']:.1e} |")
    lines += ["", "Demo pre-training (same seed, torch backend): final loss per setting", "",
              "| precision | steps | final loss | mean of the last 10 logged losses |", "|---|---:|---:|---:|"]
    for precision, rows in record["training"].items():
        tail = [r["loss"] for r in rows[-10:]]
        lines.append(f"| {precision} | {rows[-1]['step']} | {rows[-1]['loss']:.4f} | {sum(tail) / len(tail):.4f} |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", help="an image set of face crops (folder, zip, npz) besides the demo faces")
    parser.add_argument("--limit", type=int, default=2000, help="faces read from --faces (default 2000)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backends", default="torch", help="comma-separated (triton needs TRITON_INTERPRET=1 on CPU)")
    parser.add_argument("--no-training", action="store_true", help="skip the demo pre-training runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    sets = [PatchSet("64 px / 8 px patches (P=192)", 64, 8, 256, 32)]
    if args.faces:
        sets.append(PatchSet("128 px / 16 px patches (P=768)", 128, 16, 4096, 64))
    ops = op_rows(sets[:1], None, args.limit, args.backends.split(","), args.seed)
    if args.faces:
        ops += op_rows(sets, args.faces, args.limit, args.backends.split(","), args.seed)
    curves = {} if args.no_training else training_runs(args.out, args.seed)
    record = {"environment": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                              "torch": torch.__version__, "pacofr": pacofr.__version__},
              "patch_sets": [asdict(s) for s in sets], "ops": ops, "training": curves}
    (args.out / "precision.json").write_text(json.dumps(record, indent=1) + "\n")
    if curves:
        plot_curves(curves, args.out / "loss_curves.png")
    (args.out / "precision.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
