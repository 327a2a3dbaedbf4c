"""``pacofr eval study`` at a tiny budget: variants at equal steps and equal compute, every row through
the same evaluation, the report files; variant parsing and early errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _eval_helpers import run_eval, write_face_root
from PIL import Image

from pacofr.eval.encoders import load_encoder
from pacofr.eval.study_variants import StudyConfig, Variant, parse_variant

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = write_face_root(tmp_path_factory.mktemp("data"))
    config = tmp_path_factory.mktemp("cfg") / "tiny_study.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "backend": "torch"},
        "data": {"layout": "crops", "augment": True},
        "train": {"total_steps": 5, "batch_size": 16, "base_lr": 0.016, "warmup_epochs": 0.2, "log_every": 1},
    }))
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    argv = ["study", "--config", str(config), "--variant", "paco", "--variant", "MAE-face=mae:model.mae_mask_ratio=0.7",
            "--tasks", "olivetti,ytf-landmarks", "--baselines", "hog", "--protocols", "linear,knn", "--seeds", "2",
            "--probe-epochs", "10", "--compute-tolerance", "0", "--data-root", str(root), "--work", str(work), "--out",
            str(out), "--device", "cpu"]
    assert run_eval(argv) == 0
    return out, work, root


def test_variants_train_at_equal_steps_and_at_equal_compute(study: tuple[Path, Path, Path]) -> None:
    out, work, _ = study
    result = json.loads((out / "study.json").read_text())
    runs = result["pretraining"]
    assert [(r["variant"]["name"], r["budget"]) for r in runs] == [
        ("PaCo-FR", "equal-steps"), ("MAE-face", "equal-steps"), ("MAE-face", "equal-compute")]
    paco, mae, mae_compute = runs
    assert paco["steps"] == mae["steps"] == 5
    assert mae_compute["steps"] == max(1, round(paco["cpu_s"] / mae["cpu_s_per_step"]))  # the equal-compute rule
    assert mae_compute["compute_target_cpu_s"] == paco["cpu_s"]
    assert mae["config"]["model"]["mae_mask_ratio"] == 0.7 and paco["config"]["model"]["method"] == "paco"
    assert mae_compute["config"]["train"]["total_steps"] == mae_compute["steps"]
    for run in runs:
        assert run["cpu_s"] > 0 and run["wall_s"] > 0 and len(run["loadavg_before"]) == 3
        assert run["gflops_per_image"]["train_step"] > run["gflops_per_image"]["encoder_forward"] > 0
        assert run["final_epoch_losses"]["loss"] > 0
    assert paco["gflops_per_image"]["encoder_forward"] == pytest.approx(mae["gflops_per_image"]["encoder_forward"])
    # the pre-training set: the train and val images of UTKFace and FER-2013, never their test images
    assert result["pretraining_images"] == sum(result["pretraining_counts"].values()) == paco["images"]
    start = load_encoder("random:tiny").model.state_dict()
    for run in runs:
        trained = load_encoder(run["checkpoint"]).model.state_dict()
        assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
        assert Path(run["checkpoint"]).is_relative_to(work)


def test_every_row_is_evaluated_on_every_task(study: tuple[Path, Path, Path]) -> None:
    out, _, _ = study
    result = json.loads((out / "study.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["HOG", "random init", "PaCo-FR, equal-steps (5 steps)", "MAE-face, equal-steps (5 steps)",
                     f"MAE-face, equal-compute ({result['pretraining'][2]['steps']} steps)"]
    for row in result["rows"]:
        for task in ("olivetti", "ytf-landmarks"):
            protocols = {(r["protocol"], r["pool"]) for r in row["tasks"][task]["results"]}
            if row["kind"] == "baseline":
                assert protocols == {("linear", "hog"), ("knn", "hog")}
            elif task == "olivetti":
                assert protocols == {("linear", "cls"), ("linear", "mean"), ("knn", "cls"), ("knn", "mean")}
            else:
                assert protocols == {("linear", "tokens"), ("knn", "tokens")}
    report = (out / "study.md").read_text()
    assert "| HOG |" in report and "equal-compute" in report and "Equal compute:" in report
    assert "Summary: linear probe" in report and "(reference)" in report
    paco = next(r for r in result["rows"] if r["name"].startswith("PaCo-FR"))
    olivetti = next(r for r in paco["tasks"]["olivetti"]["results"] if r["protocol"] == "linear" and r["pool"] == "mean")
    digits = 1 if abs(olivetti["mean"]) >= 10 else 2
    assert f"| {paco['name']} (mean) | {olivetti['mean']:.{digits}f} ± {olivetti['std']:.{digits}f}" in report
    with Image.open(out / "study.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
        assert len(np.unique(np.asarray(image.convert("L")))) > 10


def test_a_second_run_reuses_finished_runs_and_rows(study: tuple[Path, Path, Path], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    out, work, root = study
    config = json.loads((out / "study.json").read_text())["config"]
    with caplog.at_level(logging.INFO):
        assert run_eval(["study", "--config", config, "--variant", "paco", "--variant",
                         "MAE-face=mae:model.mae_mask_ratio=0.7", "--tasks", "olivetti,ytf-landmarks", "--baselines",
                         "hog", "--protocols", "linear,knn", "--seeds", "2", "--probe-epochs", "10", "--compute-tolerance", "0",
                         "--data-root",
                         str(root), "--work", str(work), "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert caplog.text.count("reusing the finished run") == 3 and caplog.text.count("reusing") == 3 + 5
    assert "training 5 steps" not in caplog.text
    first, second = (json.loads((p / "study.json").read_text()) for p in (out, tmp_path))
    assert first["rows"] == second["rows"]


def test_equal_compute_reruns_only_variants_outside_the_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant whose step count at the first one's CPU budget is within compute_tolerance of its
    equal-steps count keeps its equal-steps run (marked); the others train again at that count."""
    from pacofr.eval import compute_budget

    per_step = {"PaCo-FR": 0.40, "near": 0.41, "cheap": 0.30, "dear": 0.80}
    calls: list[tuple[str, int, str]] = []

    def fake_pretrain(cfg, variant, steps, budget, work, dataset):  # noqa: ANN001, ANN202
        steps = cfg.steps if steps is None else steps
        calls.append((variant.name, steps, budget))
        return {"variant": {"name": variant.name}, "budget": budget, "steps": steps,
                "cpu_s": per_step[variant.name] * steps, "cpu_s_per_step": per_step[variant.name]}

    monkeypatch.setattr(compute_budget, "_pretrain", fake_pretrain)
    variants = tuple(Variant(name, "paco") for name in per_step)
    cfg = StudyConfig(data_root="unused", variants=variants, steps=700, compute_tolerance=0.05)
    runs = compute_budget.pretrain_all(cfg, Path("unused"), dataset=None)
    assert calls == [*[(name, 700, "equal-steps") for name in per_step],
                     ("cheap", round(280 / 0.30), "equal-compute"), ("dear", 350, "equal-compute")]
    near = runs[1]
    assert near["budget"] == compute_budget.MATCHED_BUDGET and near["steps"] == 700
    assert near["steps_at_compute_target"] == round(280 / 0.41) and near["compute_target_cpu_s"] == 280
    assert [r["budget"] for r in runs] == ["equal-steps", compute_budget.MATCHED_BUDGET, "equal-steps", "equal-steps",
                                           "equal-compute", "equal-compute"]
    strict = StudyConfig(data_root="unused", variants=variants, steps=700, compute_tolerance=0.0)
    calls.clear()
    compute_budget.pretrain_all(strict, Path("unused"), dataset=None)
    assert [c for c in calls if c[2] == "equal-compute"][0] == ("near", round(280 / 0.41), "equal-compute")
    per_step["near"] = 0.40  # the very same step count at the budget: tolerance 0 still trains it again
    calls.clear()
    compute_budget.pretrain_all(strict, Path("unused"), dataset=None)
    assert ("near", 700, "equal-compute") in calls
    with pytest.raises(ValueError, match="compute_tolerance"):
        StudyConfig(data_root="unused", compute_tolerance=1.5)


def test_variant_specs() -> None:
    assert parse_variant("paco") == Variant("PaCo-FR", "paco")
    assert parse_variant("mae") == Variant("MAE-face", "mae")
    assert parse_variant("paco:model.num_candidates=1,model.r_mask=0.5") == Variant(
        "paco:model.num_candidates=1,model.r_mask=0.5", "paco", ("model.num_candidates=1", "model.r_mask=0.5"))
    assert parse_variant("M1=paco:model.num_candidates=1") == Variant("M1", "paco", ("model.num_candidates=1",))
    for bad, expected in (("byol", "method must be one of"), ("paco:model.r_mask", "KEY=VALUE"),
                          ("paco:model.method=mae", "not model.method")):
        with pytest.raises(ValueError, match=expected):
            parse_variant(bad)


def test_bad_study_arguments_fail_before_any_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    root.mkdir()
    base = ["study", "--data-root", str(root), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    for extra, expected in ((["--variant", "byol"], "method must be one of"),
                            (["--variant", "paco:model.r_mask=2"], "--variant paco:model.r_mask=2"),
                            (["--set", "train.batch_size=zero"], "--set"),
                            (["--tasks", "mnist"], "comma-separated list"),
                            (["--baselines", "sift"], "--baselines"),
                            ([], "utkface_crop_part1/labels.csv is missing")):
        assert run_eval([*base, *extra]) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and expected in stderr, (extra, stderr)
    assert not (tmp_path / "o").exists() and not any((tmp_path / "w").glob("*/checkpoints"))


def _row(name: str, kind: str, task_results: dict[str, list[tuple[str, float, float, float, bool]]]) -> dict:
    """A grid row: per task, (pool, test mean, std, val mean, higher_is_better) linear results."""
    return {"name": name, "kind": kind, "tasks": {task: {"results": [
        {"protocol": "linear", "pool": pool, "mean": mean, "std": std, "val_mean": val, "higher_is_better": hib}
        for pool, mean, std, val, hib in results]} for task, results in task_results.items()}}


def test_summary_table_picks_the_pool_on_validation_and_marks_differences_beyond_the_stds() -> None:
    from pacofr.eval.report import summary_table

    ref = _row("ref", "encoder", {"acc": [("cls", 50.0, 0.5, 40.0, True), ("mean", 60.0, 0.5, 39.0, True)],
                                  "err": [("tokens", 10.0, 0.0, 9.0, False)]})
    # the better test score (mean pool) is not picked: its validation score is lower
    better = _row("better", "encoder", {"acc": [("cls", 51.0, 0.2, 41.0, True)], "err": [("tokens", 9.5, 0.0, 9.0, False)]})
    noise = _row("noise", "encoder", {"acc": [("cls", 50.3, 0.4, 40.0, True)], "err": [("tokens", 10.2, 0.0, 9.0, False)]})
    hog = _row("HOG", "baseline", {"acc": [("hog", 70.0, 0.0, 70.0, True)]})
    lines = summary_table([hog, ref, better, noise], ["acc", "err"], {"acc": "Acc", "err": "Err"}, reference="ref")
    assert lines[0] == "| row | Acc | Err |" and len(lines) == 5  # header, rule, three encoder rows (no baseline)
    assert lines[2] == "| ref (reference) | 50.0 ± 0.5 (cls) | 10.0 ± 0.0 (tokens) |"
    assert lines[3] == "| better | 51.0 ± 0.2 (cls), Δ +1.00 ▲ | 9.50 ± 0.00 (tokens), Δ -0.50 ▲ |"
    assert lines[4] == "| noise | 50.3 ± 0.4 (cls), Δ +0.30 | 10.2 ± 0.0 (tokens), Δ +0.20 ▼ |"


def test_pretrain_only_trains_lists_the_runs_and_evaluates_nothing(study: tuple[Path, Path, Path], tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    out, work, root = study
    config = json.loads((out / "study.json").read_text())["config"]
    common = ["study", "--pretrain-only", "--config", config, "--tasks", "olivetti", "--data-root", str(root),
              "--compute-tolerance", "0", "--device", "cpu"]
    # a fresh work folder: one variant trained, its run listed, no study files, no row evaluated
    with caplog.at_level(logging.INFO):
        assert run_eval([*common, "--variant", "paco", "--no-equal-compute", "--work", str(tmp_path / "w"),
                         "--out", str(tmp_path / "o")]) == 0
    listing = json.loads((tmp_path / "o" / "pretraining.json").read_text())
    assert [(r["variant"]["name"], r["budget"], r["steps"]) for r in listing["pretraining"]] == [
        ("PaCo-FR", "equal-steps", 5)]
    assert Path(listing["pretraining"][0]["checkpoint"]).is_dir()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pretraining.json"]
    assert not (tmp_path / "w" / "rows").exists() and "features of" not in caplog.text
    # the fixture's work folder: the study's runs are reused, not trained again, and listed as the study lists them
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_eval([*common, "--variant", "paco", "--variant", "MAE-face=mae:model.mae_mask_ratio=0.7",
                         "--work", str(work), "--out", str(tmp_path / "o2")]) == 0
    assert caplog.text.count("reusing the finished run") == 3 and "training 5 steps" not in caplog.text
    listed = json.loads((tmp_path / "o2" / "pretraining.json").read_text())["pretraining"]
    assert listed == json.loads((out / "study.json").read_text())["pretraining"]
