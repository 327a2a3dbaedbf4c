"""The MCF-style and FRA-style models in the trainer: one command each, exact resume, DDP, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset

from _peer_helpers import SMALL_HEADS
from pacofr import checkpoint as ckpt
from pacofr.cli import main
from pacofr.data import demo_dataset
from pacofr.models import build_model
from pacofr.models.vit import normalised_images
from pacofr.train.config import load_config
from pacofr.train.distributed import init_distributed
from pacofr.train.seeding import seed_everything
from pacofr.train.trainer import Trainer

METHODS = ["mcf", "fra"]
TINY = ["model.preset=tiny", "model.backend=torch", *(f"model.{k}={v}" for k, v in SMALL_HEADS.items()),
        "train.progress=false", "train.viz_every=0", "train.log_every=1", "data.augment=false"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _trainer(out_dir: Path, method: str, overrides: list[str], n_images: int = 16,
             dist_info: object | None = None) -> Trainer:
    cfg = load_config("demo", [f"train.out_dir={out_dir}", f"model.method={method}", *TINY, *overrides])
    dataset = Subset(demo_dataset(image_size=cfg.model.img_size), range(n_images))
    seed_everything(cfg.train.seed)
    return Trainer(cfg, build_model(cfg.model), dataset, dist_info=dist_info, recipe={"size": 32})


@pytest.mark.parametrize("method", METHODS)
def test_resume_mid_epoch_gives_the_uninterrupted_run(method: str, tmp_path: Path) -> None:
    common = ["train.batch_size=4", "train.epochs=2", "train.ckpt_every=0", "train.warmup_epochs=0.5"]
    full = _trainer(tmp_path / "full", method, [*common, "train.max_steps=6"])
    full_result = full.fit()
    part = _trainer(tmp_path / "part", method, [*common, "train.max_steps=3"])  # stops inside epoch 0
    part.fit()
    assert part.state.batch_in_epoch == 3
    resumed = _trainer(tmp_path / "part", method, [*common, "train.max_steps=6"])
    resumed_result = resumed.fit(resume_from=tmp_path / "part")

    full_rows, joined = _rows(full_result.scalars), _rows(resumed_result.scalars)
    assert [int(r["step"]) for r in joined] == [int(r["step"]) for r in full_rows] == list(range(1, 7))
    keys = [k for k in full_rows[0] if k.startswith(("loss", "stat/")) or k in ("lr", "grad_norm")]
    assert any(k.startswith("loss/") for k in keys)
    for key in keys:
        assert [r[key] for r in joined] == [r[key] for r in full_rows], key  # bit for bit
    state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("momentum.") for k in state)
    for name, value in state.items():
        assert torch.equal(value, resumed_state[name]), name


# ---------------------------------------------------------------------------------------------- DDP
PER_RANK = 4
#: FRA with identity "transforms": the two views are the faces themselves, so a rank's forward does not
#: depend on its random stream and two ranks must reproduce one process on the whole batch exactly
IDENTITY_VIEWS = ["model.eq_max_rotation=0", "model.eq_max_scale=0", "model.eq_max_shift=0"]


def _ddp_run(out_dir: Path, method: str, batch_size: int, extra: list[str]) -> tuple[Trainer, list[list[torch.Tensor]]]:
    trainer = _trainer(out_dir, method, [f"train.batch_size={batch_size}", "train.epochs=3", "train.max_steps=2",
                                         "train.clip_grad=0", "train.ckpt_every=0", *extra],
                       n_images=2 * PER_RANK, dist_info=init_distributed("cpu"))
    grads: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    trainer.fit()
    return trainer, grads


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, result_file: str, method: str,
                extra: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer, grads = _ddp_run(Path(out_dir), method, PER_RANK, extra)
        torch.save({"grads": grads, "state": {k: v.clone() for k, v in trainer.model.state_dict().items()}},
                   f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method, extra", [("fra", IDENTITY_VIEWS), ("mcf", [])], ids=["fra", "mcf"])
def test_two_gloo_ranks_stay_identical(method: str, extra: list[str], tmp_path: Path) -> None:
    torch.set_num_threads(1)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(tmp_path / "result"), method,
                                extra), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(2)]
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert any(k.startswith("momentum.") for k in state0) and any(k.startswith("teacher.") for k in state0)
    for name in state0:  # weights, EMA teacher and momentum heads
        torch.testing.assert_close(state1[name], state0[name], rtol=0, atol=0, msg=name)
    if method != "fra":
        return
    # the balanced targets are all-reduced: two ranks on half batches = one process on the whole batch
    # (gradients compared; weights are not, AdamW turns the rounding noise of the exactly-zero gradient
    # of attention's key bias into steps of +-lr)
    _, single_grads = _ddp_run(tmp_path / "single", method, 2 * PER_RANK, extra)
    assert len(single_grads) == len(ranks[0]["grads"]) == 2
    for step in range(2):
        for a, b in zip(ranks[0]["grads"][step], single_grads[step], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("method", METHODS)
def test_one_command_trains_and_the_encoder_exports_to_timm(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    assert main(["pretrain", "--config", "demo", "--set", f"model.method={method}", "--out", str(out),
                 "--set", "train.max_steps=2", "--set", "train.batch_size=8", "--set", "train.progress=false",
                 "--set", "train.num_viz=2", "--set", "model.backend=torch",
                 *(f"--set=model.{k}={v}" for k, v in SMALL_HEADS.items())]) == 0
    loaded = ckpt.load_checkpoint(out)
    assert loaded.step == 2 and loaded.meta["config"]["model"]["method"] == method
    rows = _rows(out / "scalars.csv")
    assert rows and all(float(rows[-1][f"loss/{name}"]) > 0 for name in build_model(
        load_config("demo", [f"model.method={method}"]).model).loss_names())
    assert (out / "reconstructions.png").stat().st_size > 0 and (out / "loss_curve.png").stat().st_size > 0

    trained = build_model(load_config("demo", [f"model.method={method}", "model.backend=torch",
                                               *(f"model.{k}={v}" for k, v in SMALL_HEADS.items())]).model)
    ckpt.load_weights(trained, loaded)
    for which in ("student", "teacher"):
        assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / which),
                     *(["--teacher"] if which == "teacher" else [])]) == 0
        config = json.loads((tmp_path / which / "config.json").read_text())
        assert config["pacofr"]["method"] == method and config["pacofr"]["encoder"] == which
        encoder = timm.create_model(f"local-dir:{tmp_path / which}", pretrained=True).eval()
        images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        inputs = normalised_images(images, trained.cfg)
        source = trained.teacher if which == "teacher" else trained.encoder
        with torch.no_grad():
            torch.testing.assert_close(encoder.forward_features(inputs), source.eval().forward_features(inputs))


def test_the_method_flag_names_the_peers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fra"
    assert main(["pretrain", "--config", "demo", "--method", "fra", "--out", str(out), "--set", "train.max_steps=1",
                 "--set", "train.batch_size=8", "--set", "train.progress=false", "--set", "train.num_viz=0",
                 "--set", "model.preset=tiny", *(f"--set=model.{k}={v}" for k, v in SMALL_HEADS.items())]) == 0
    assert ckpt.load_checkpoint(out).meta["config"]["model"]["method"] == "fra"
    capsys.readouterr()
    assert main(["pretrain", "--config", "demo", "--method", "byol", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "model.method: expected one of ['paco', 'mae', 'mcf', 'fra'], got 'byol'" in err and "Traceback" not in err
