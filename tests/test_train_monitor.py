"""The online k-NN monitor: logged with the scalars, no effect on training, exact resume, checked input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from _eval_helpers import blob_image, class_centre
from _train_standin import IMG, StandInModel, TinyFaces, region_fn, tiny_config
from pacofr.train.config import PretrainConfig
from pacofr.train.fields import ConfigError
from pacofr.train.monitor import KNN_SCALAR, MAJORITY_SCALAR, KnnMonitor
from pacofr.train.trainer import Trainer


class _Tokens(nn.Module):
    """The stand-in's encoder as the monitor sees one: forward_features -> (B, 1, D), no class token."""

    num_prefix_tokens = 0

    def __init__(self, enc: nn.Linear, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.enc, self.norm = enc, norm

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.enc(F.adaptive_avg_pool2d(x, IMG).flatten(1)))[:, None]


class MonitoredStandIn(StandInModel):
    @property
    def encoder(self) -> _Tokens:  # not a registered submodule: the checkpoint keeps its layout
        return _Tokens(self.enc, self.norm)


def _write_classes(root: Path, classes: int = 3, per_class: int = 14) -> Path:
    rng = np.random.default_rng(0)
    for label in range(classes):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(blob_image(rng, 16, 16, class_centre(label, classes), (1.0, 0.8, 0.6))).save(
                root / f"c{label}" / f"{i:02d}.png")
    return root


def _run(out_dir: Path, resume: Path | None = None, model_cls: type = MonitoredStandIn, **train: object):
    cfg = tiny_config(str(out_dir), **train)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, model_cls(), TinyFaces(40), region_fn=region_fn, recipe={"size": 8})
    return trainer, trainer.fit(resume_from=resume)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["step"]: row for row in csv.DictReader(fh)}


def test_monitor_logs_its_steps_leaves_training_alone_and_resumes_exactly(tmp_path: Path) -> None:
    data = _write_classes(tmp_path / "labelled")
    monitored = dict(monitor_every=4, monitor_data=str(data), monitor_k=3, log_every=2, epochs=3)
    _, plain = _run(tmp_path / "plain", log_every=2, epochs=3, max_steps=12)
    _, full = _run(tmp_path / "full", max_steps=12, **monitored)
    _run(tmp_path / "part", max_steps=6, **monitored)  # stops off the monitor grid
    _, resumed = _run(tmp_path / "part", max_steps=12, resume=tmp_path / "part", **monitored)

    plain_rows, full_rows, resumed_rows = _rows(plain.scalars), _rows(full.scalars), _rows(resumed.scalars)
    assert {s for s, r in full_rows.items() if r[KNN_SCALAR]} == {"4", "8", "12"}
    assert {s for s, r in resumed_rows.items() if r[KNN_SCALAR]} == {"4", "6", "8", "12"}  # 6: the cut run's last
    for step in ("2", "4", "6", "8", "10", "12"):
        for key in ("loss", "loss/rec", "lr", "grad_norm", "stat/seen"):  # bit-for-bit (repr floats)
            assert full_rows[step][key] == plain_rows[step][key], ("monitor changed training", step, key)
            assert resumed_rows[step][key] == full_rows[step][key], ("resume", step, key)
    for step in ("4", "8", "12"):
        assert resumed_rows[step][KNN_SCALAR] == full_rows[step][KNN_SCALAR], step
        assert 0.0 <= float(full_rows[step][KNN_SCALAR]) <= 100.0
        assert full_rows[step][MAJORITY_SCALAR] == full_rows["4"][MAJORITY_SCALAR]


def test_knn_accuracy_and_majority_match_a_plain_nearest_neighbour(tmp_path: Path) -> None:
    data = _write_classes(tmp_path / "labelled", per_class=10)
    torch.manual_seed(0)
    encoder = _Tokens(nn.Linear(3 * IMG * IMG, 16), nn.LayerNorm(16))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    monitor = KnnMonitor(str(data), k=1, max_images=500, pool="mean", img_size=IMG, mean=mean, std=std)
    got = monitor(encoder)
    assert encoder.training  # mode restored

    # the truth, by hand: the same images resized with PIL, normalised, one nearest train image by cosine
    def features(split: str) -> np.ndarray:
        pixels = np.stack(monitor.images[split]).astype(np.float64) / 255.0
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 0.5) / 0.25
        with torch.no_grad():
            f = encoder.norm(encoder.enc(x.flatten(1))).double().numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    train, test = features("train"), features("test")
    nearest = (test @ train.T).argmax(1)
    labels = {s: monitor.targets[s].values.numpy() for s in ("train", "test")}
    accuracy = 100.0 * float(np.mean(labels["train"][nearest] == labels["test"]))
    # one test image is 100/n points; the float32 features can flip a near-tie at most, never more
    assert got[KNN_SCALAR] == pytest.approx(accuracy, abs=100.0 / len(test) + 1e-9)
    counts = np.bincount(labels["test"])
    assert got[MAJORITY_SCALAR] == pytest.approx(100.0 * counts.max() / counts.sum(), abs=1e-12)


def test_max_images_takes_an_even_spread_of_each_split(tmp_path: Path) -> None:
    data = _write_classes(tmp_path / "labelled", per_class=20)
    monitor = KnnMonitor(str(data), k=3, max_images=5, pool="mean", img_size=IMG, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert [len(monitor.images[s]) for s in ("train", "test")] == [5, 5]


@pytest.mark.parametrize("train, message", [
    ({"monitor_pool": "max"}, "monitor_pool must be one of"),
    ({"monitor_k": 0}, "monitor_k must be >= 1"),
    ({"monitor_max_images": 0}, "monitor_max_images must be >= 1"),
])
def test_bad_monitor_fields_are_refused_naming_the_key(train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PretrainConfig.from_dict({"train": train})


@pytest.mark.parametrize("train, message", [
    ({"monitor_every": 4}, "needs train.monitor_data"),
    ({"monitor_every": 3, "monitor_data": "x", "log_every": 2}, "multiple of train.log_every=2"),
])
def test_monitor_settings_that_do_not_fit_together_stop_the_run_before_any_work(
        tmp_path: Path, train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(tmp_path / "run", max_steps=2, **train)
    assert not (tmp_path / "run").exists()


def test_unreadable_monitor_data_stops_the_run_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.monitor_data="):
        _run(tmp_path / "run", monitor_every=2, monitor_data=str(tmp_path / "missing"), max_steps=2)
    assert not (tmp_path / "run").exists()
    data = _write_classes(tmp_path / "labelled")
    (data / "c1" / "05.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"train.monitor_data=.*05\.png"):  # a damaged image, named
        _run(tmp_path / "run", monitor_every=2, monitor_data=str(data), max_steps=2)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="has no encoder module"):
        _run(tmp_path / "run2", model_cls=StandInModel, monitor_every=2, monitor_data=str(tmp_path), max_steps=2)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, monitor_data: str, result_file: str) -> None:
    import torch.distributed as dist

    from pacofr.train.distributed import init_distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = tiny_config(out_dir, max_steps=2, epochs=3, monitor_every=1, monitor_data=monitor_data)
        torch.manual_seed(cfg.train.seed)
        try:
            trainer = Trainer(cfg, MonitoredStandIn(random=False), TinyFaces(8), dist_info=init_distributed("cpu"),
                              region_fn=region_fn)
        except ConfigError as err:
            torch.save({"error": str(err)}, f"{result_file}.{rank}")
            return
        result = trainer.fit()
        torch.save({"monitor": trainer.monitor is not None, "scalars": str(result.scalars)}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_under_ddp_rank_0_probes_and_a_bad_set_stops_every_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    data = _write_classes(tmp_path / "labelled")
    for name, source in (("good", str(data)), ("bad", str(tmp_path / "missing"))):
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / f"init-{name}"), str(tmp_path / name), source,
                                    str(tmp_path / f"result-{name}")), nprocs=2, join=True)
    good = [torch.load(tmp_path / f"result-good.{r}", weights_only=True) for r in range(2)]
    assert [g["monitor"] for g in good] == [True, False]
    rows = _rows(Path(good[0]["scalars"]))
    assert [rows[s][KNN_SCALAR] != "" for s in ("1", "2")] == [True, True]
    bad = [torch.load(tmp_path / f"result-bad.{r}", weights_only=True) for r in range(2)]
    assert "train.monitor_data=" in bad[0]["error"] and "could not be read" in bad[1]["error"]  # no rank hangs
