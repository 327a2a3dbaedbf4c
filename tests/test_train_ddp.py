"""DDP on the CPU (2 gloo processes) matches one process on the concatenated batch."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _rounding_support import assert_within_rounding
from _train_standin import StandInModel, TinyFaces, region_fn, tiny_config
from pacofr import checkpoint as ckpt
from pacofr.train.distributed import init_distributed
from pacofr.train.trainer import Trainer

STEPS = 2
PER_RANK_BATCH = 4


class _Float64StandIn(StandInModel):
    """The stand-in computing in float64 (its parameters made float64 by the caller): the truth that
    both fp32 runs are compared with."""

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return super()._encode(images.double(), generator)


def _train(out_dir: Path, batch_size: int, float64: bool = False
           ) -> tuple[Trainer, list[list[torch.Tensor]], object]:
    """Two optimiser steps (one per epoch: 8 images) recording the gradients each step used."""
    cfg = tiny_config(str(out_dir), max_steps=STEPS, batch_size=batch_size, clip_grad=0.0, epochs=3)
    torch.manual_seed(cfg.train.seed)
    model = _Float64StandIn(random=False).double() if float64 else StandInModel(random=False)
    trainer = Trainer(cfg, model, TinyFaces(2 * PER_RANK_BATCH), dist_info=init_distributed("cpu"), region_fn=region_fn)
    grads: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    return trainer, grads, trainer.fit()


def _worker(rank: int, world: int, init_file: str, out_dir: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer, grads, result = _train(Path(out_dir), PER_RANK_BATCH)
        params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        torch.save({"grads": grads, "params": params, "checkpoint": str(result.checkpoint),
                    "scalars": str(result.scalars)}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(tmp_path / "result")),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(2)]
    single, single_grads, _ = _train(tmp_path / "single", 2 * PER_RANK_BATCH)
    exact, exact_grads, _ = _train(tmp_path / "float64", 2 * PER_RANK_BATCH, float64=True)
    single_params, exact_params = single.model.state_dict(), exact.model.state_dict()

    # DDP (per-rank means, all-reduced) and one process (the mean over the whole batch) sum the same
    # terms in different orders: both are fp32 roundings of one exact computation. The float64 run is
    # that computation to ~1e-16; the one-process fp32 run's distance from it is the size of an fp32
    # rounding error at these inputs (at least the rounding of the result itself, u * |truth|). DDP must
    # be as close to the truth up to ROUNDING_FACTOR = 8 (L2 per tensor): the measured ratio of the two
    # distances over train seeds 1-4 and 7 was at most 1.51 for the gradients of both steps and 1.17 for
    # the parameters. A DDP that summed instead of averaging, or skipped the all-reduce, is off by
    # O(|gradient|), about 10^6 times the fp32 scale here (|gradient| ~ 0.1-1.5, scale ~ 1e-8 - 5e-7).
    assert len(single_grads) == len(exact_grads) == STEPS
    for r in range(2):
        assert len(ranks[r]["grads"]) == STEPS and ranks[r]["params"].keys() == single_params.keys()
        got, truth, spread = {}, {}, {}
        for step in range(STEPS):
            for i, (ddp, one, exact_grad) in enumerate(zip(ranks[r]["grads"][step], single_grads[step],
                                                           exact_grads[step], strict=True)):
                got[f"step {step} gradient {i}"], truth[f"step {step} gradient {i}"] = ddp, exact_grad
                spread[f"step {step} gradient {i}"] = float((one.double() - exact_grad).norm())
        for name, one in single_params.items():
            if name != "seen":  # a per-rank image counter
                got[name], truth[name] = ranks[r]["params"][name], exact_params[name]
                spread[name] = float((one.double() - exact_params[name]).norm())
        assert_within_rounding(got, truth, spread)
    # only rank 0 writes files
    assert ranks[1]["checkpoint"] == "None" and ranks[1]["scalars"] == "None"
    assert ckpt.load_checkpoint(tmp_path / "ddp").meta["world_size"] == 2
    assert ckpt.load_checkpoint(tmp_path / "ddp").state["world_size"] == 2
    assert len(ckpt.load_checkpoint(tmp_path / "ddp").state["rng"]) == 2  # every rank's RNG state


def _real_worker(rank: int, world: int, init_file: str, out_dir: str, result_file: str) -> None:
    from torch.utils.data import Subset

    from pacofr.data import demo_dataset
    from pacofr.models import PaCoFR
    from pacofr.train.config import load_config
    from pacofr.train.seeding import seed_everything

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # EMA codes in incubation, restarts from the first step on: every piece of codebook
        # maintenance that must stay identical across ranks runs within 4 steps
        cfg = load_config("demo", [f"train.out_dir={out_dir}", "model.preset=tiny", "model.backend=torch",
                                   "model.code_update=ema", "model.dead_code_warmup=0", "model.sc=relation",
                                   "model.dead_code_threshold=0.5", "train.batch_size=4", "train.epochs=2",
                                   "train.progress=false", "train.viz_every=0", "train.ckpt_every=0",
                                   "data.augment=false"])
        dataset = Subset(demo_dataset(image_size=cfg.model.img_size), range(16))
        seed_everything(cfg.train.seed)
        trainer = Trainer(cfg, PaCoFR(cfg.model), dataset, dist_info=init_distributed("cpu"))
        trainer.fit()
        torch.save({"state": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                    "restarted": [float(r["stat/restarted_codes"]) for r in trainer.scalars.read()]
                    if trainer.scalars is not None else None}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_real_model_keeps_codebook_and_teacher_identical_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(_real_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp"), str(tmp_path / "result")),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(2)]
    assert sum(ranks[0]["restarted"]) > 0  # dead-code restarts (and their broadcast) happened
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys()
    assert any(k.startswith("patch_codebook.codebook.ema_") for k in state0)
    assert any(k.startswith("teacher.") for k in state0)
    for name in state0:
        torch.testing.assert_close(state1[name], state0[name], rtol=0, atol=0, msg=name)


def _locked_out_worker(rank: int, world: int, init_file: str, out_dir: str, result_file: str) -> None:
    from pacofr.train.lock import RunFolderLockedError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        try:
            _train(Path(out_dir), PER_RANK_BATCH)
            outcome = "trained"
        except RunFolderLockedError as err:
            outcome = str(err)
        Path(f"{result_file}.{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_when_another_run_holds_the_folder(tmp_path: Path) -> None:
    from pacofr.train.lock import RunLock

    out = tmp_path / "ddp"
    with RunLock(out):  # the other writer, here this test's process
        mp.spawn(_locked_out_worker, args=(2, str(tmp_path / "init"), str(out), str(tmp_path / "result")),
                 nprocs=2, join=True)
    outcomes = [(tmp_path / f"result.{r}").read_text() for r in range(2)]
    assert all(f"in use by another pacofr run: pid {os.getpid()}" in text for text in outcomes), outcomes
    assert not (out / "checkpoints").exists() and not (out / "scalars.csv").exists()
