"""The study knows the MCF-style and FRA-style variants: their names, their FLOPs per image, and finished
runs recorded before their config fields existed are still reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _eval_helpers import run_eval, write_face_root

from pacofr.eval.compute_budget import _same_config, flops_per_image
from pacofr.eval.study_variants import StudyConfig, Variant, parse_variant, pretrain_config
from pacofr.models import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_peer_variants_have_names() -> None:
    assert parse_variant("mcf") == Variant("MCF-style", "mcf")
    assert parse_variant("fra") == Variant("FRA-style", "fra")
    assert parse_variant("F=fra:model.fra_regions=4") == Variant("F", "fra", ("model.fra_regions=4",))


def test_flops_per_image_count_each_methods_own_step() -> None:
    flops = {method: flops_per_image(ModelConfig.preset("tiny", method=method, peer_hidden_dim=64))
             for method in ("paco", "mae", "mcf", "fra")}
    encoder = flops["mae"]["encoder_forward"]
    assert all(f["encoder_forward"] == pytest.approx(encoder) for f in flops.values()), "one encoder for all"
    # MCF: MAE-face's step on two views plus the momentum encoder's keys and full-face targets
    assert flops["mcf"]["train_step"] > 2 * flops["mae"]["train_step"] + encoder
    # FRA: two full views forward and backward (about 3x a forward each) plus two momentum forwards
    assert flops["fra"]["train_step"] > 7 * encoder
    for method in ("mcf", "fra"):  # no incubation stage
        assert flops[method]["train_step_incubation"] == pytest.approx(flops[method]["train_step"])


def test_a_run_recorded_before_new_config_fields_is_reused(tmp_path: Path) -> None:
    study = StudyConfig(data_root=str(tmp_path))
    run_cfg = pretrain_config(study, parse_variant("paco"), 10, tmp_path / "run")
    stored = run_cfg.to_dict()
    assert _same_config(stored, run_cfg)
    older = {**stored, "model": {k: v for k, v in stored["model"].items() if not k.startswith(("peer_", "fra_"))}}
    assert _same_config(older, run_cfg), "fields the run did not know count at their defaults"
    changed = {**stored, "model": {**stored["model"], "r_mask": 0.5}}
    unknown = {**stored, "model": {**stored["model"], "gone": 1}}
    for other in (changed, unknown, None, "config"):
        assert not _same_config(other, run_cfg)


def test_a_tiny_study_pretrains_and_evaluates_the_peers(tmp_path: Path) -> None:
    root = write_face_root(tmp_path / "data")
    config = tmp_path / "tiny_study.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "backend": "torch", "peer_hidden_dim": 64, "peer_proj_dim": 32},
        "data": {"layout": "crops", "augment": True},
        "train": {"total_steps": 3, "batch_size": 16, "base_lr": 0.016, "warmup_epochs": 0.2, "log_every": 1},
    }))
    argv = ["study", "--config", str(config), "--variant", "mcf", "--variant", "fra", "--tasks", "olivetti",
            "--baselines", "", "--protocols", "knn", "--seeds", "1", "--compute-tolerance", "0",
            "--data-root", str(root), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert run_eval(argv) == 0
    result = json.loads((tmp_path / "out" / "study.json").read_text())
    runs = {(r["variant"]["name"], r["budget"]): r for r in result["pretraining"]}
    assert set(runs) == {("MCF-style", "equal-steps"), ("FRA-style", "equal-steps"), ("FRA-style", "equal-compute")}
    assert runs[("MCF-style", "equal-steps")]["config"]["model"]["method"] == "mcf"
    assert {"loss/con", "loss/feat", "loss/rec"} <= set(runs[("MCF-style", "equal-steps")]["final_epoch_losses"])
    assert {"loss/global", "loss/local", "loss/cluster"} <= set(runs[("FRA-style", "equal-steps")]["final_epoch_losses"])
    names = [row["name"] for row in result["rows"]]
    assert names[0] == "random init" and any(n.startswith("MCF-style") for n in names) and \
        any(n.startswith("FRA-style, equal-compute") for n in names)
    for row in result["rows"]:
        assert {r["protocol"] for r in row["tasks"]["olivetti"]["results"]} == {"knn"}
