"""The study's markdown page: pre-training runs, compute budget, results tables, tasks and caveats."""

from __future__ import annotations

from typing import Any

from pacofr.eval.compute_budget import MATCHED_BUDGET
from pacofr.eval.report import grid_tables, metric_line, summary_table


def run_table(runs: list[dict[str, Any]]) -> list[str]:
    head = ["variant", "budget", "steps", "epochs", "CPU s", "wall s", "CPU s / step", "load avg (1 min, before/after)",
            "GFLOPs / image (train step, encoder fwd)", "final-epoch loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        flops = run["gflops_per_image"]
        loss = run["final_epoch_losses"].get("loss")
        lines.append("| " + " | ".join([
            run["variant"]["name"], run["budget"], str(run["steps"]), f"{run['epochs']:.2f}", f"{run['cpu_s']:.0f}",
            f"{run['wall_s']:.0f}", f"{run['cpu_s_per_step']:.3f}",
            f"{run['loadavg_before'][0]:.1f} / {run['loadavg_after'][0]:.1f}",
            f"{flops['train_step']:.3f}, {flops['encoder_forward']:.3f}", "-" if loss is None else f"{loss:.4f}"]) + " |")
    return lines


def _step_cost_spread(runs: list[dict[str, Any]]) -> str:
    """How much one variant's measured CPU seconds per step differ between its runs (the largest
    ratio over the variants run twice), as a phrase."""
    per_variant: dict[str, list[float]] = {}
    for run in runs:
        per_variant.setdefault(run["variant"]["name"], []).append(run["cpu_s_per_step"])
    spreads = {name: max(costs) / min(costs) - 1.0 for name, costs in per_variant.items() if len(costs) > 1}
    if not spreads:
        return "no variant ran twice, so their spread is not measured"
    name = max(spreads, key=spreads.__getitem__)
    return f"one variant's CPU s / step differed by up to {spreads[name]:.0%} between its two runs ({name})"


def row_label(run: dict[str, Any]) -> str:
    return f"{run['variant']['name']}, {run['budget']} ({run['steps']} steps)"


def _reference_row(runs: list[dict[str, Any]]) -> str:
    """The row every other pre-trained row is compared with: the first variant's equal-steps run."""
    return row_label(runs[0])


def markdown_report(study: dict[str, Any]) -> str:
    """The study as a markdown page."""
    env, titles, tasks = study["environment"], study["task_titles"], study["tasks"]
    runs, rows = study["pretraining"], study["rows"]
    compute = [r for r in runs if r["budget"] in ("equal-compute", MATCHED_BUDGET)]
    lines = [
        f"# {study['title']}", "",
        f"Measured {env['date']} on {env['device']} (pacofr {env['versions']['pacofr']}, torch "
        f"{env['versions']['torch']}, timm {env['versions']['timm']}); wall time of the pre-training runs "
        f"{sum(r['wall_s'] for r in runs) / 60:.0f} min and of the evaluated rows {sum(r['seconds'] for r in rows) / 60:.0f} "
        f"min (finished runs and rows are reused across invocations; this one took {study['wall_s'] / 60:.0f} min).",
        "",
        "## Pre-training", "",
        f"Config `{study['config']}` (+ `{' '.join(study['overrides']) or 'no overrides'}`): "
        f"{study['pretraining_images']} unlabelled train images ({study['pretraining_counts']}; test images never "
        f"seen), encoder {study['encoder']}. Every variant starts from the same initial weights (\"random init\").",
        "",
        *run_table(runs), "",
        ("FLOPs per image: `torch.utils.flop_counter` on one batch of the torch backend (matrix products and "
         "attention; element-wise work is not counted); a training step is forward + backward after incubation "
         "(PaCo-FR's includes its EMA teacher and codebook), the encoder column one forward pass at inference."),
        "",
        ("Equal compute: the first variant's process CPU seconds are the budget; every other variant was run again "
         "for round(steps x budget / its own CPU seconds at equal steps) steps, its learning-rate schedule spanning "
         "exactly those steps, unless that step count is within "
         f"{study.get('compute_tolerance', 0.0):.0%} of its equal-steps count: then its equal-steps run stands for "
         f"equal compute (budget \"{MATCHED_BUDGET}\"). Achieved CPU seconds vs the budget: "
         + ", ".join(f"{r['variant']['name']} {r['cpu_s']:.0f} / {r['compute_target_cpu_s']:.0f}" for r in compute)
         + ". CPU seconds, not wall time, because other jobs shared the 2-core machine (load averages above); "
         f"CPU seconds vary with contention too: {_step_cost_spread(runs)}.") if compute else "",
        "",
        "## Results", "",
        ("Final-epoch test scores, mean ± std over seeds " + ", ".join(map(str, study["plan"]["probe"]["seeds"]))
         + "; hyper-parameters picked on a validation split carved from train, never on test. Ridge and k-NN "
         "have no randomness (std 0). Metrics: " + metric_line(rows, tasks, titles)),
        "",
        "#### Summary: linear probe, each pre-trained row against the first", "",
        ("The feature pool of each cell (class token or mean; tokens for landmarks) is the one that scores best on "
         "validation. Δ: the row's score minus the first variant's at equal steps, in the task's unit; ▲ / ▼ mark "
         "a difference larger than the larger of the two rows' seed stds, better / worse for that task's metric."),
        "",
        *summary_table(rows, tasks, titles, reference=_reference_row(runs)), "",
        *grid_tables(rows, tasks, titles),
        "![score vs pre-training CPU time](study.png)", "",
        "## Tasks", "",
        "| task | protocol | images train / val / test |", "|---|---|---|",
        *[f"| {titles[t]} | {study['task_protocols'][t]} | "
          + " / ".join(str(study['split_sizes'][t][s]) for s in ('train', 'val', 'test')) + " |" for t in tasks],
        "",
        "## Caveats", "",
        *[f"- {c}" for c in study["caveats"]], "",
    ]
    return "\n".join(lines)


def caveats(runs: list[dict[str, Any]], img_size: int) -> list[str]:
    return [
        f"Small scale: {runs[0]['steps']} steps of batch {runs[0]['batch_size']} ({runs[0]['epochs']:.1f} epochs) for a "
        f"{img_size} px model; one pre-training seed per run, so the ± covers head / fine-tune seeds only.",
        "The landmark points of ytf_udacity68 are probably not hand-annotated: use the NME to rank rows, not to "
        "compare with published 300-W numbers.",
        "The pre-training images are the train images of UTKFace and FER-2013, two of the evaluated sets; the other "
        "sets were not seen in pre-training.",
    ]
