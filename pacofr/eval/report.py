"""Writing evaluation results: the environment stamp, JSON, markdown tables of a grid, and a plot.

A grid (:func:`pacofr.eval.grid.evaluate_grid`) becomes one table per protocol: a row per
(row, feature pool), a column per task, cells ``mean ± std`` over seeds in the task's unit. An
encoder cell that does not beat HOG under the same protocol (HOG's linear probe for fine-tunes)
is marked :data:`BELOW_HOG`. A classification task's table also gives the score of always
answering the test split's majority class and the chance score (1 / classes), and a cell no
better than the majority class (within one test image) is marked :data:`COLLAPSED`: the head
may answer one class for every face.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pacofr.version import __version__

_PACKAGES = ("timm", "numpy", "scikit-image", "safetensors", "triton")
BELOW_HOG = "†"
COLLAPSED = "‡"
HOG_ROW = "HOG"
PROTOCOL_TITLES = {"linear": "Linear probe (frozen features; ridge for age and landmarks)",
                   "knn": "k-NN (cosine, k = 20, frozen features)",
                   "mlp": "Small trained head (MLP on frozen features; age and landmarks)",
                   "finetune": "Short full fine-tune"}


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


def clean_json(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists (what :func:`write_json` writes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as indented JSON (NaN written as null) at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean_json(payload), indent=2) + "\n")
    return path


def _results(row: dict[str, Any], task: str, protocol: str) -> list[dict[str, Any]]:
    return [r for r in row["tasks"].get(task, {}).get("results", []) if r["protocol"] == protocol]


def _fmt(value: float | None, like: float | None = None) -> str:
    """``value`` with 1 decimal when ``like`` (default: itself) is at least 10 in size, else 2."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    like = value if like is None or (isinstance(like, float) and math.isnan(like)) else like
    return f"{value:.1f}" if abs(like) >= 10 else f"{value:.2f}"


def _anchor(rows: Sequence[dict[str, Any]], task: str, protocol: str) -> dict[str, Any] | None:
    hog = next((r for r in rows if r["name"] == HOG_ROW), None)
    if hog is None:
        return None
    found = _results(hog, task, protocol if protocol != "finetune" else "linear")
    return found[0] if found else None


def class_references(task: dict[str, Any]) -> dict[str, Any] | None:
    """For a classification task's result dict (its ``data`` as ``describe_data`` writes it): the
    test accuracy (%) of always answering the test split's majority class, of chance (100 /
    classes), the majority class and the test size; None for other targets or an empty test split."""
    counts = task.get("data", {}).get("per_class", {}).get("test")
    if not counts or sum(counts.values()) == 0:
        return None
    total = sum(counts.values())
    majority = max(counts, key=lambda name: counts[name])
    return {"majority": 100.0 * counts[majority] / total, "chance": 100.0 / len(counts),
            "majority_class": majority, "test_n": total}


def is_collapsed(result: dict[str, Any], references: dict[str, Any] | None) -> bool:
    """Whether a classification ``result`` is no better than always answering the majority class:
    its mean test accuracy is at most one test image (100 / n %) above the majority share."""
    if references is None or result.get("mean") is None or math.isnan(result["mean"]):
        return False
    return result["mean"] <= references["majority"] + 100.0 / references["test_n"]


def reference_line(name: str, task: dict[str, Any]) -> str | None:
    """One line giving a classification task's majority-class and chance scores and naming every
    result no better than the majority class; None for other targets."""
    refs = class_references(task)
    if refs is None:
        return None
    line = (f"{name}: always answering the majority class ({refs['majority_class']}) scores "
            f"{refs['majority']:.2f} % on test, chance {refs['chance']:.2f} % ({len(task['data']['per_class']['test'])} "
            "classes)")
    collapsed = [f"{r['protocol']}/{r['pool']}" for r in task.get("results", []) if is_collapsed(r, refs)]
    if collapsed:
        line += (f"; {', '.join(collapsed)} no better than that: the head may answer one class for every face "
                 "(collapsed), not a score to compare")
    return line


def _cell(result: dict[str, Any], anchor: dict[str, Any] | None, is_encoder: bool,
          references: dict[str, Any] | None = None) -> str:
    text = f"{_fmt(result['mean'])} ± {_fmt(result['std'], result['mean'])}"
    if is_encoder and anchor is not None:
        mean, ref = result["mean"], anchor["mean"]
        if mean is None or ref is None or not (mean > ref if result["higher_is_better"] else mean < ref):
            text += f" {BELOW_HOG}"
    if is_collapsed(result, references):
        text += f" {COLLAPSED}"
    return text


def _task_references(rows: Sequence[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """:func:`class_references` of ``task`` from the first row that ran it (every row sees the same split)."""
    found = next((row["tasks"][task] for row in rows if task in row["tasks"]), None)
    return class_references(found) if found is not None else None


def protocol_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str], protocol: str,
                   titles: dict[str, str]) -> list[str]:
    """Markdown lines of one protocol's table (empty when no row ran it)."""
    lines = []
    for row in rows:
        pools = []
        for task in tasks:
            pools += [r["pool"] for r in _results(row, task, protocol) if r["pool"] not in pools]
        for pool in pools:
            label = row["name"] if row["kind"] == "baseline" else f"{row['name']} ({pool})"
            cells = []
            for task in tasks:
                found = [r for r in _results(row, task, protocol) if r["pool"] == pool]
                cells.append(_cell(found[0], _anchor(rows, task, protocol), row["kind"] == "encoder",
                                   _task_references(rows, task)) if found else "-")
            lines.append("| " + " | ".join([label, *cells]) + " |")
    if not lines:
        return []
    references = [_task_references(rows, task) for task in tasks]
    if any(references):
        lines.append("| " + " | ".join(["majority class / chance", *(
            f"{_fmt(r['majority'])} / {_fmt(r['chance'])}" if r else "-" for r in references)]) + " |")
    head = ["row (features)", *[titles.get(t, t) for t in tasks]]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]


def pick_by_val(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The result of ``results`` (one protocol, several feature pools) that scores best on
    *validation* (so the choice never looks at test; a tie goes to the first); None when none has
    a validation score."""
    found = [r for r in results if r.get("val_mean") is not None and not math.isnan(r["val_mean"])]
    if not found:
        return None
    sign = 1.0 if found[0]["higher_is_better"] else -1.0
    return max(found, key=lambda r: sign * r["val_mean"])


def best_pool_by_val(row: dict[str, Any], task: str, protocol: str = "linear") -> dict[str, Any] | None:
    """The ``protocol`` result of ``row`` on ``task`` whose feature pool scores best on validation
    (:func:`pick_by_val`); None when the row did not run it."""
    return pick_by_val(_results(row, task, protocol))


def summary_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str], titles: dict[str, str],
                  reference: str, protocol: str = "linear") -> list[str]:
    """One line per encoder row: its ``protocol`` score per task (the pool picked on validation) and
    its difference from the ``reference`` row, ``Δ``; a difference larger than the larger of the two
    rows' seed stds is marked ``▲`` (better) or ``▼`` (worse). Markdown lines, empty when nothing ran."""
    ref_row = next((r for r in rows if r["name"] == reference), None)
    lines = []
    for row in rows:
        if row["kind"] != "encoder":
            continue
        cells = []
        for task in tasks:
            mine = best_pool_by_val(row, task, protocol)
            ref = best_pool_by_val(ref_row, task, protocol) if ref_row is not None else None
            if mine is None:
                cells.append("-")
                continue
            cell = f"{_fmt(mine['mean'])} ± {_fmt(mine['std'], mine['mean'])} ({mine['pool']})"
            if ref is not None and row is not ref_row:
                diff = mine["mean"] - ref["mean"]
                gain = diff if mine["higher_is_better"] else -diff
                mark = (" ▲" if gain > 0 else " ▼") if abs(diff) > max(mine["std"], ref["std"]) else ""
                cell += f", Δ {diff:+.2f}{mark}"
            cells.append(cell)
        lines.append("| " + " | ".join([f"{row['name']}{' (reference)' if row is ref_row else ''}", *cells]) + " |")
    if not lines:
        return []
    head = ["row", *[titles.get(t, t) for t in tasks]]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]


def grid_tables(rows: Sequence[dict[str, Any]], tasks: Sequence[str], titles: dict[str, str]) -> list[str]:
    """Markdown sections, one table per protocol, with the HOG legend."""
    out = []
    for protocol, title in PROTOCOL_TITLES.items():
        table = protocol_table(rows, tasks, protocol, titles)
        if table:
            out += [f"#### {title}", "", *table, ""]
    if any(r["name"] == HOG_ROW for r in rows):
        out += [f"{BELOW_HOG}: does not beat HOG on that task (HOG under the same protocol; for fine-tunes, HOG's "
                "linear probe).", ""]
    if any(_task_references(rows, task) for task in tasks):
        out += ["majority class / chance: the test accuracy of always answering the test split's most common class, "
                f"and 100 / classes. {COLLAPSED}: no better than the majority class (within one test image): the "
                "head may answer one class for every face (collapsed).", ""]
    return out


def metric_line(rows: Sequence[dict[str, Any]], tasks: Sequence[str], titles: dict[str, str]) -> str:
    """One sentence naming each task's metric and whether higher or lower is better."""
    parts = []
    for task in tasks:
        for row in rows:
            results = row["tasks"].get(task, {}).get("results", [])
            if results:
                r = results[0]
                parts.append(f"{titles.get(task, task)}: {r['metric']} in {r['unit']}, "
                             f"{'higher' if r['higher_is_better'] else 'lower'} is better")
                break
    return "; ".join(parts) + "."


def score_vs_time_plot(rows: Sequence[dict[str, Any]], tasks: Sequence[str], titles: dict[str, str],
                       path: Path, title: str) -> Path:
    """One figure, a panel per task: the linear probe score (mean pool; tokens for landmarks) of every
    encoder row against its pre-training CPU seconds (``info["cpu_s"]``, 0 for random init), rows of
    one method joined by a line; baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(tasks))
    lines_of = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(lines_of, columns, figsize=(4.2 * columns, 3.3 * lines_of), dpi=110, squeeze=False)
    order: dict[str, int] = {}
    for ax, task in zip(axes.flat, tasks, strict=False):
        methods: dict[str, list[tuple[float, float, float]]] = {}
        unit = ""
        for row in rows:
            found = [r for r in _results(row, task, "linear") if r["pool"] in ("mean", "tokens", row["name"])] or \
                _results(row, task, "linear")
            if not found:
                continue
            result = found[0]
            unit = result["metric"] + (f" ({result['unit']})" if len(result["unit"]) <= 8 else "")
            if row["kind"] == "baseline":
                ax.axhline(result["mean"], linestyle="--", linewidth=1, color="grey")
                ax.annotate(row["name"], (0, result["mean"]), fontsize=7, color="grey", xytext=(2, 2),
                            textcoords="offset points")
                continue
            for method in row["info"].get("curves", [row["name"]]):
                methods.setdefault(method, []).append((float(row["info"].get("cpu_s", 0.0)), result["mean"],
                                                       result["std"]))
        for method, points in methods.items():
            points.sort()
            index = order.setdefault(method, len(order))  # one style per method across the panels
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        color=f"C{index % 10}", marker="osD^v"[index // 10 % 5],
                        linestyle=("-", "--", ":")[index // 10 % 3], capsize=3, label=method)
        ax.set_title(titles.get(task, task), fontsize=9)
        ax.set_xlabel("pre-training CPU seconds", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
    spare = list(axes.flat)[len(tasks):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles and spare:  # the legend in an empty panel
        spare[0].legend(handles, labels, loc="center", ncol=1 + len(labels) // 9, fontsize=8)
    elif handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07 if handles and not spare else 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
