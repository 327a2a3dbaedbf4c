"""Writing evaluation results: the environment stamp, JSON, a markdown table and a bar plot."""

from __future__ import annotations

import json
import math
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pacofr.version import __version__

_KIND_LABELS = {"linear_probe": "linear probe (frozen)", "finetune": "fine-tune"}
_PACKAGES = ("timm", "numpy", "scikit-image", "safetensors", "triton")


def environment(device: str) -> dict[str, Any]:
    """Date (UTC), versions of the packages involved, and the device the numbers were measured on."""
    versions: dict[str, str | None] = {"pacofr": __version__, "python": sys.version.split()[0],
                                       "torch": torch.__version__}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions,
            "platform": platform.platform(), "device": where}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON (NaN written as null) at ``path``."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2) + "\n")
    return path


def _pm(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    return f"{result['final_test_mean']:.3f} ± {result['final_test_std']:.3f}"


def _loss(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    return f"{result['final_test_loss_mean']:.3f} ± {result['final_test_loss_std']:.3f}"


def _extra(result: dict[str, Any] | None) -> str:
    return "-" if not result else f"{result['best_val_mean']:.3f}"


def markdown_table(compare: dict[str, Any]) -> str:
    """The results of :func:`pacofr.eval.compare.run_compare` as a markdown section."""
    budget, data = compare["budget"], compare["data"]
    has_ft = any(e.get("finetune") for e in compare["encoders"])
    head = ["encoder", "pre-training", "linear probe: test acc", "probe: test cross-entropy", "probe best-val (extra)"]
    if has_ft:
        head += ["fine-tune: test acc", "fine-tune: test cross-entropy", "fine-tune best-val (extra)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for enc in compare["encoders"]:
        pre = enc.get("pretraining")
        pre_text = (f"{pre['method']}, {pre['steps']} steps, {pre['epochs']} epochs" if pre else "none (initial weights)")
        row = [enc["name"], pre_text, _pm(enc["linear_probe"]), _loss(enc["linear_probe"]), _extra(enc["linear_probe"])]
        if has_ft:
            row += [_pm(enc.get("finetune")), _loss(enc.get("finetune")), _extra(enc.get("finetune"))]
        lines.append("| " + " | ".join(row) + " |")
    sizes, env = data["split_sizes"], compare["environment"]
    probe = compare["probe"]
    seeds = len(probe["config"]["seeds"])
    text = [
        f"### {compare['title']}",
        "",
        (f"Measured {env['date']} on {env['device']} (pacofr {env['versions']['pacofr']}, "
         f"torch {env['versions']['torch']}, timm {env['versions']['timm']})."),
        "",
        (f"Budget, equal for every pre-training: config `{budget['config']}`, {budget['images']} training images, "
         f"{budget['steps']} optimiser steps ({budget['epochs']} epochs x {budget['steps_per_epoch']} steps, batch "
         f"{budget['batch_size']}), {budget['img_size']} px, patch {budget['patch_size']}, encoder {budget['encoder']}, "
         f"seed {budget['seed']}. Random init = the common starting weights of the runs."),
        "",
        (f"Probe data: `{data['source']}`, {data['num_images']} images, split train/val/test = "
         f"{sizes['train']}/{sizes['val']}/{sizes['test']}. {probe['pool']} features, standardised; "
         f"{probe['config']['epochs']} probe epochs; ± = std over {seeds} probe seeds (one pre-training seed)."),
        "",
        ("Test numbers are those after the final epoch (mean ± std over seeds); the best validation epoch is an "
         "extra and never selects a test number."),
        "",
        *lines,
        "",
        "Caveats:",
        *[f"- {c}" for c in compare["caveats"]],
        "",
    ]
    return "\n".join(text)


def bar_plot(compare: dict[str, Any], path: Path) -> Path:
    """Bars of final-epoch test accuracy (mean, std error bars) per encoder, probe and fine-tune."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = compare["encoders"]
    kinds = [k for k in ("linear_probe", "finetune") if any(e.get(k) for e in encoders)]
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(encoders), 3.6), dpi=120)
    for j, kind in enumerate(kinds):
        means = [e[kind]["final_test_mean"] if e.get(kind) else float("nan") for e in encoders]
        stds = [e[kind]["final_test_std"] if e.get(kind) else 0.0 for e in encoders]
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(encoders))]
        bars = ax.bar(xs, means, width=width, yerr=stds, capsize=4, label=_KIND_LABELS[kind])
        for bar, mean, std in zip(bars, means, stds, strict=True):
            if not math.isnan(mean):
                ax.annotate(f"{mean:.3f}", (bar.get_x() + bar.get_width() / 2, mean + std), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    chance = compare["data"].get("chance")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"majority-class baseline ({chance:.2f})")
    ax.set_xticks(range(len(encoders)), [e["name"] for e in encoders])
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("test accuracy, final epoch\n(mean ± std over seeds)")
    ax.set_title(compare["plot_title"], fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
