"""`torchrun --nproc_per_node 2 -m pacofr pretrain` with the real model on the CPU (gloo)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pacofr import checkpoint as ckpt


def _torchrun(out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pacofr", "pretrain", "--config", "demo", "--out", str(out_dir),
               "--set", "model.preset=tiny", "--set", "train.batch_size=4", "--set", "train.progress=false",
               "--set", "train.viz_every=0", "--set", "train.log_every=1", "--set", "model.backend=torch",
               *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


def test_two_process_run_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _torchrun(out, "--set", "train.max_steps=2", "--set", "train.ckpt_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = ckpt.load_checkpoint(out)
    assert saved.meta["world_size"] == 2 and saved.state["step"] == 2
    assert len(saved.state["rng"]) == 2  # both ranks' generators
    # rank 1 logs warnings only: the "saved checkpoint" line appears once
    assert first.stderr.count("saved checkpoint") == 1, first.stderr[-3000:]

    second = _torchrun(out, "--resume", "--set", "train.max_steps=4", "--set", "train.ckpt_every=2")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = ckpt.load_checkpoint(out)
    assert resumed.state["step"] == 4
    with open(out / "scalars.csv", newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert steps == [1, 2, 3, 4]
    weights = load_file(str(resumed.path / "model.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
