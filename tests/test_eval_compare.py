"""``pacofr eval compare`` at a tiny budget: equal pre-training, the same probe, JSON + table + plot."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _eval_helpers import run_eval
from PIL import Image

from pacofr.eval.encoders import load_encoder
from pacofr.eval.finetune import FinetuneConfig, _Classifier, _param_groups
from pacofr.models.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "backend": "torch"},
        "data": {"root": "demo", "augment": False},
        "train": {"epochs": 1, "batch_size": 16, "log_every": 1, "warmup_epochs": 0.5, "base_lr": 0.016},
    }))
    return path


@pytest.fixture(scope="module")
def compare_run(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    code = run_eval(["compare", "--config", str(tiny_config), "--max-steps", "2", "--seeds", "2",
                     "--probe-epochs", "20", "--finetune-epochs", "1", "--device", "cpu",
                     "--work", str(work), "--out", str(out)])
    assert code == 0
    return out, work


def test_compare_trains_at_equal_budget_and_probes_three_encoders(compare_run: tuple[Path, Path]) -> None:
    out, work = compare_run
    result = json.loads((out / "compare.json").read_text())
    names = [e["name"] for e in result["encoders"]]
    assert names == ["PaCo-FR", "MAE-face", "random init"]
    paco, mae, rand = result["encoders"]
    assert paco["pretraining"]["steps"] == mae["pretraining"]["steps"] == result["budget"]["steps"] == 2
    assert paco["pretraining"]["method"] == "paco" and mae["pretraining"]["method"] == "mae"
    assert rand["pretraining"] is None and rand["source"]["kind"] == "random"
    assert result["budget"]["img_size"] == 32 and result["budget"]["images"] == 101
    configs = result["pretrain_configs"]
    assert configs["paco"]["model"]["method"] == "paco" and configs["mae"]["model"]["method"] == "mae"
    for key in ("data", "train"):  # identical budget apart from the output folder
        a, b = dict(configs["paco"][key]), dict(configs["mae"][key])
        a.pop("out_dir", None), b.pop("out_dir", None)
        assert a == b
    assert {k: v for k, v in configs["paco"]["model"].items() if k != "method"} == \
           {k: v for k, v in configs["mae"]["model"].items() if k != "method"}
    for enc in result["encoders"]:
        probe = enc["linear_probe"]
        assert len(probe["runs"]) == 2 and 0.0 <= probe["final_test_mean"] <= 1.0
        assert probe["final_test_mean"] == pytest.approx(sum(r["final_test"] for r in probe["runs"]) / 2)
        assert len(enc["finetune"]["runs"][0]["val_curve"]) == 1
    assert result["data"]["split_sizes"] == {"train": 135, "val": 33, "test": 32}
    assert result["data"]["chance"] == pytest.approx(0.5)  # train majority is 'nonface'; test is 16/16
    assert any("PROXY" in c for c in result["caveats"])
    assert result["environment"]["versions"]["torch"] == torch.__version__

    # the pre-trained encoders moved away from the common start; random init is that start
    start = load_encoder("random:tiny").model.state_dict()
    for enc in (paco, mae):
        trained = load_encoder(enc["pretraining"]["checkpoint"]).model.state_dict()
        assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert (work / "paco" / "checkpoints").is_dir() and (work / "mae" / "checkpoints").is_dir()


def test_compare_table_and_plot_show_the_json_numbers(compare_run: tuple[Path, Path]) -> None:
    out, _ = compare_run
    result = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| encoder")]
    assert [r.split("|")[1].strip() for r in rows] == ["PaCo-FR", "MAE-face", "random init"]
    for row, enc in zip(rows, result["encoders"], strict=True):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        probe, tuned = enc["linear_probe"], enc["finetune"]
        assert cells[2] == f"{probe['final_test_mean']:.3f} ± {probe['final_test_std']:.3f}"
        assert cells[3] == f"{probe['final_test_loss_mean']:.3f} ± {probe['final_test_loss_std']:.3f}"
        assert cells[4] == f"{probe['best_val_mean']:.3f}"
        assert cells[5] == f"{tuned['final_test_mean']:.3f} ± {tuned['final_test_std']:.3f}"
    assert re.search(r"2 optimiser steps", table) and "PROXY" in table
    with Image.open(out / "compare.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


def test_compare_rejects_bad_arguments_before_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cases = [
        (["--methods", "paco,byol"], "--methods"),
        (["--config", "no-such-preset"], "--config no-such-preset"),
        (["--set", "train.epochs=zero"], "--set"),
        (["--data", "proxy:none"], "--data proxy:none"),
    ]
    for extra, expected in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert run_eval(["compare", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), *extra]) == 2
        assert expected in caplog.text, (extra, caplog.text)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_finetune_trains_every_encoder_parameter() -> None:
    cfg = FinetuneConfig(lr=1e-4, head_lr=1e-3, weight_decay=0.05)
    encoder = load_encoder("random:tiny").model
    model = _Classifier(encoder, "cls", num_classes=3, feature_dim=ModelConfig.preset("tiny").embed_dim)
    groups = _param_groups(model, cfg)
    grouped = {id(p): g for g in groups for p in g["params"]}
    assert len(grouped) == sum(1 for _ in model.parameters())
    for name, param in model.named_parameters():
        group = grouped[id(param)]
        assert group["lr"] == (1e-3 if name.startswith("head.") else 1e-4), name
        no_decay = param.ndim < 2 or name.endswith(("pos_embed", "cls_token"))
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        FinetuneConfig(epochs=0)
