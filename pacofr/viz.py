"""Pictures of a run: the loss curves (matplotlib) and a grid of original / corrupted / reconstructed faces (PIL)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

GRID_ROWS: tuple[tuple[str, str], ...] = (
    ("input", "original"),
    ("corrupted", "masked + replaced"),
    ("reconstruction", "reconstructed"),
)


def _read_columns(csv_path: Path) -> dict[str, list[float]]:
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(float(value) if value not in ("", None) else math.nan)
    return columns


def save_loss_curve(csv_path: str | Path, png_path: str | Path, incubation_steps: int = 0) -> Path:
    """Plot ``loss`` and every ``loss/<term>`` column of a scalars CSV against ``step``.

    Left: the total loss; right: each term (log scale when all are positive). With
    ``incubation_steps`` > 0 the incubation stage is shaded (the loss terms change when it ends).
    Returns the PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = _read_columns(Path(csv_path))
    if "step" not in columns or "loss" not in columns:
        raise ValueError(f"{csv_path} has no 'step' and 'loss' columns to plot")
    steps = np.asarray(columns["step"])
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_total, ax_terms = fig.subplots(1, 2)
    ax_total.plot(steps, columns["loss"], color="black", lw=1.2)
    ax_total.set(title="total loss", xlabel="optimiser step", ylabel="loss")
    ax_total.grid(alpha=0.3)
    terms = sorted(k for k in columns if k.startswith("loss/"))
    positive = True
    for key in terms:
        values = np.asarray(columns[key])
        finite = np.isfinite(values)
        if not finite.any():
            continue
        positive &= bool((values[finite] > 0).all())
        ax_terms.plot(steps[finite], values[finite], lw=1.0, label=key.removeprefix("loss/"))
    if terms:
        ax_terms.legend(fontsize=8)
        if positive:
            ax_terms.set_yscale("log")
    ax_terms.set(title="loss terms", xlabel="optimiser step")
    ax_terms.grid(alpha=0.3)
    if incubation_steps > 0:
        for ax in (ax_total, ax_terms):
            ax.axvspan(0, incubation_steps + 0.5, color="tab:orange", alpha=0.08, lw=0)
        ax_total.text(0.01, 0.98, "incubation", transform=ax_total.transAxes, va="top", fontsize=8,
                      color="tab:orange")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    return png_path


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 (values clipped)."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def reconstruction_grid(panels: Mapping[str, torch.Tensor], rows: Sequence[tuple[str, str]] = GRID_ROWS,
                        scale: int = 2, pad: int = 4, label_width: int = 120) -> Image.Image:
    """One labelled row per ``(key, label)`` of ``rows``, one column per image.

    ``panels[key]``: float (B, 3, H, W) in [0, 1] (e.g. ``PaCoFR.reconstruct``'s output); every
    panel has the same shape. Images are enlarged ``scale`` times (nearest neighbour) so patch
    borders stay visible.
    """
    missing = [key for key, _ in rows if key not in panels]
    if missing:
        raise KeyError(f"reconstruction panels lack {missing}; got {sorted(panels)}")
    arrays = [_to_uint8(panels[key]) for key, _ in rows]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"all panels need the same shape, got {sorted(shapes)}")
    batch, height, width, _ = arrays[0].shape
    cell_h, cell_w = height * scale, width * scale
    canvas = Image.new("RGB", (label_width + batch * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for r, ((_, label), arr) in enumerate(zip(rows, arrays)):
        top = pad + r * (cell_h + pad)
        draw.text((6, top + cell_h // 2 - 6), label, fill="black")
        for c in range(batch):
            tile = Image.fromarray(arr[c]).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (cell_w + pad), top))
    return canvas


def save_reconstruction_grid(panels: Mapping[str, torch.Tensor], png_path: str | Path, **kwargs: int) -> Path:
    """Write :func:`reconstruction_grid` of ``panels`` to ``png_path``; return the path."""
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    reconstruction_grid(panels, **kwargs).save(png_path)
    return png_path
