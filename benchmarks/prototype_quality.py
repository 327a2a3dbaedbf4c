"""How well a trained PaCo-FR codebook quantises face patches, against plain k-means with the same K.

For a checkpoint, every patch of the packaged demo faces (or of the first ``--limit`` faces of an
aligned-face folder) is normalised as the model's prototypes are (per-patch norm-pix) and assigned
to its nearest pixel prototype; the mean squared error per value is printed beside that of plain
k-means (k-means++ seeding, Lloyd iterations, best of ``--restarts``) with the same number of
centres, fitted twice: on ``--train-passes`` augmented passes over the faces (the distribution the
prototypes were trained on; the fair comparison) and on the scored patches themselves (a fit to
the test patches, a lower bound). Also: prototypes in use and duplicate codes.

    python benchmarks/prototype_quality.py runs/demo            # a run folder, checkpoint folder or step_*
    python benchmarks/prototype_quality.py runs/demo --json out.json

Nothing is trained here; CPU is enough (the demo faces give 6,464 patches of 192 values).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from pacofr import checkpoint as ckpt
from pacofr.data import demo_dataset
from pacofr.data.augment import Augment
from pacofr.data.datasets import AlignedFaceDataset
from pacofr.models import PaCoFR
from pacofr.ops import patch_targets
from pacofr.train.config import PretrainConfig

logger = logging.getLogger(__name__)


def load_model(path: str | Path) -> PaCoFR:
    """The PaCoFR model of a checkpoint (eval mode, CPU)."""
    loaded = ckpt.load_checkpoint(path, map_location="cpu", fallback=True)
    cfg = PretrainConfig.from_dict(loaded.meta["config"]).model
    model = PaCoFR(cfg)
    ckpt.load_weights(model, loaded)
    return model.eval()


def face_patches(model: PaCoFR, root: str | None, limit: int, passes: int = 1, augment: Augment | None = None
                 ) -> torch.Tensor:
    """(N, P) fp32 norm-pix patches of the faces (resized to the model's input), ``passes`` times
    over them (each pass augmented anew when ``augment`` is given)."""
    cfg = model.cfg
    kwargs = {"image_size": cfg.img_size, "augment": augment}
    data = demo_dataset(**kwargs) if root is None else AlignedFaceDataset(root, **kwargs)
    count = min(len(data), limit)
    images = torch.stack([data[i % count]["image"] for i in range(passes * count)])
    ids = torch.arange(cfg.num_patches).expand(images.shape[0], -1)
    return patch_targets(images, ids, cfg.patch_size, norm_pix=True, eps=cfg.norm_pix_eps).reshape(-1, cfg.patch_dim)


def prototype_table(model: PaCoFR) -> torch.Tensor:
    """(K, P) prototypes of the model's codes."""
    book = model.patch_codebook
    return book.prototype_table()


def quantisation_mse(x: torch.Tensor, centres: torch.Tensor) -> float:
    """Mean squared error per value of x (N, P) against its nearest row of centres (K, P)."""
    labels = torch.cdist(x, centres).argmin(dim=1)
    return float((x - centres[labels]).square().mean())


def kmeans_centres(x: torch.Tensor, k: int, generator: torch.Generator, iters: int, restarts: int) -> torch.Tensor:
    """Plain k-means on x (N, P) (k-means++ seeding, Lloyd iterations): the (k, P) centres of the
    best of ``restarts`` runs (lowest quantisation MSE on x)."""
    best, best_mse = None, math.inf
    for _ in range(restarts):
        centres = x[torch.randint(x.shape[0], (1,), generator=generator)]
        d2 = torch.cdist(x, centres).square()[:, 0]
        while centres.shape[0] < k:
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator)
            centres = torch.cat([centres, x[pick]])
            d2 = torch.minimum(d2, torch.cdist(x, x[pick]).square()[:, 0])
        for _ in range(iters):
            labels = torch.cdist(x, centres).argmin(dim=1)
            counts = torch.bincount(labels, minlength=k).float()
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        mse = quantisation_mse(x, centres)
        if mse < best_mse:
            best, best_mse = centres, mse
    return best


def duplicate_codes(model: PaCoFR, cosine: float = 0.99) -> int:
    """Codes that have another code with cosine similarity above ``cosine``."""
    codes = model.patch_codebook.codes(detach=True)
    similarity = codes @ codes.T - 2 * torch.eye(codes.shape[0])
    return int((similarity > cosine).any(dim=1).sum())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run folder, checkpoints folder or step_* checkpoint")
    parser.add_argument("--faces", default=None, help="aligned-face folder (default: the packaged demo faces)")
    parser.add_argument("--limit", type=int, default=1000, help="faces read at most")
    parser.add_argument("--iters", type=int, default=100, help="k-means Lloyd iterations")
    parser.add_argument("--restarts", type=int, default=3, help="k-means runs (the best is reported)")
    parser.add_argument("--train-passes", type=int, default=3, help="augmented passes k-means is fitted on")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.checkpoint)
    x = face_patches(model, args.faces, args.limit)
    table = prototype_table(model)
    k, generator = table.shape[0], torch.Generator().manual_seed(0)
    train = face_patches(model, args.faces, args.limit, args.train_passes, Augment())
    result = {"patches": x.shape[0], "codes": k,
              "prototype_mse": quantisation_mse(x, table),
              "kmeans_fit_on_augmented_train_mse": quantisation_mse(
                  x, kmeans_centres(train, k, generator, args.iters, args.restarts)),
              "kmeans_fit_on_scored_patches_mse": quantisation_mse(
                  x, kmeans_centres(x, k, generator, args.iters, args.restarts)),
              "prototypes_used": int(torch.cdist(x, table).argmin(dim=1).unique().numel()),
              "duplicate_codes": duplicate_codes(model)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
