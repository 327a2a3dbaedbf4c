"""Pre-training configs: presets, YAML files, ``--set`` overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pacofr.models.config import ModelConfig
from pacofr.train.config import PretrainConfig, dump_config, load_config, preset_names
from pacofr.train.fields import ConfigError


def test_every_packaged_preset_loads() -> None:
    assert {"demo", "vit_base", "vit_small", "vit_tiny"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.train.betas == (0.9, 0.95)
        if name in ModelConfig.preset_names():  # a run preset (e.g. study_cpu) may name any model
            assert cfg.model.embed_dim == ModelConfig.preset(name).embed_dim
    demo = load_config("demo")
    assert demo.model.img_size == 64 and demo.data.root == "demo" and demo.train.out_dir == "runs/demo"
    assert load_config("vit_base").model.embed_dim == 768


def test_overrides_are_typed() -> None:
    cfg = load_config("demo", ["train.base_lr=1e-3", "train.epochs=3", "train.betas=[0.8, 0.9]",
                               "model.method=mae", "train.compile=true", "data.root=/data/faces",
                               "model.pixel_mean=[0.5, 0.5, 0.5]", "train.max_steps=0"])
    assert cfg.train.base_lr == 1e-3 and isinstance(cfg.train.base_lr, float)
    assert cfg.train.epochs == 3 and cfg.train.betas == (0.8, 0.9)
    assert cfg.model.method == "mae" and cfg.train.compile is True
    assert cfg.data.root == "/data/faces" and cfg.model.pixel_mean == (0.5, 0.5, 0.5)
    # a string field keeps the text as typed (YAML would turn these into other types)
    assert load_config("demo", ["train.out_dir=007"]).train.out_dir == "007"
    assert load_config("demo", ["data.root=yes"]).data.root == "yes"


@pytest.mark.parametrize("override, message", [
    ("train.base_lrr=1", r"unknown config key 'train.base_lrr'.*base_lr"),
    ("trian.epochs=1", r"unknown config key 'trian'"),
    ("train.epochs=1.5", r"train.epochs: expected an integer, got 1.5"),
    ("train.epochs=many", r"train.epochs: expected an integer, got 'many'"),
    ("train.compile=maybe", r"train.compile: expected a boolean"),
    ("model.method=vae", r"model.method: expected one of \['paco', 'mae', 'mcf', 'fra'\]"),
    ("train.betas=[0.9]", r"train.betas: expected 2 values"),
    ("train.precision=fp8", r"train.precision: expected one of"),
    ("train.batch_size=0", r"train.*batch_size must be >= 1"),
    ("model.embed_dim=130", r"model.*embed_dim=130 must be divisible by num_heads"),
    ("train.epochs", r"expected KEY=VALUE"),
    ("train.seed.x=1", r"'train.seed' is a value, not a section"),
    ("train.epoch=2", r"unknown config key 'train.epoch'; did you mean train.epochs\?"),
    ("trian.epochs=1", r"unknown config key 'trian'; did you mean train\?"),
    ("model.num_regions=5", r"model.num_regions=5: .* must be >= 14"),
    ("model.dead_code_warmup=100000000000000000000000", r"model.dead_code_warmup: .* \(int64\)"),
    ("train.seed=-9223372036854775809", r"train.seed: .* \(int64\)"),
    ("data.num_workers=100000", r"num_workers=100000 is more than \d+ \(4 per CPU core"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_yaml_file_with_preset_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "vit_small", "r_mask": 0.5},
                                    "train": {"epochs": 2, "betas": [0.9, 0.99]}}))
    cfg = load_config(path, ["train.epochs=4"])
    assert cfg.model.embed_dim == 384 and cfg.model.r_mask == 0.5
    assert cfg.train.epochs == 4 and cfg.train.betas == (0.9, 0.99)
    assert cfg.data.root == "demo"  # untouched sections keep their defaults


def test_bad_files_and_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config 'nope'.*presets"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) \['optim'\]"):
        load_config(bad)
    bad.write_text("model: {preset: vit_huge}\n")
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(bad)
    bad.write_text("train: {epochs: ten}\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(bad)


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config("demo", ["train.epochs=5", "model.sc=off"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_booleans_map_back_to_literal_words(tmp_path: Path) -> None:
    path = tmp_path / "sc_off.yaml"
    path.write_text("model:\n  sc: off\n")  # YAML 1.1 reads `off` as False
    assert load_config(path).model.sc == "off"
    assert load_config("demo", ["model.sc=off"]).model.sc == "off"


@pytest.mark.parametrize("text, key, lines", [
    ("model:\n  preset: tiny\ntrain:\n  epochs: 1\nmodel:\n  r_mask: 0.5\n", "model", (1, 5)),
    ("train:\n  epochs: 1\n  batch_size: 4\n  epochs: 2\n", "epochs", (2, 4)),
])
def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path: Path, text: str, key: str,
                                                                 lines: tuple[int, int]) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config {path}: key '{key}' appears twice .*\(lines {lines[0]} and "
                                          rf"{lines[1]}\)"):
        load_config(path)


def test_the_worker_cap_follows_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from pacofr.train import config as train_config

    monkeypatch.setattr(train_config.os, "cpu_count", lambda: 16)
    assert load_config("demo", ["data.num_workers=64"]).data.num_workers == 64
    with pytest.raises(ConfigError, match="num_workers=65 is more than 64"):
        load_config("demo", ["data.num_workers=65"])
