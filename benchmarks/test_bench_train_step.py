"""pytest-benchmark suite of one pre-training step (see benchmarks/conftest.py for CPU vs GPU).

GPU: ViT-S/16 at 224 px, batch 64, bf16 autocast; CPU: the ``tiny`` preset, batch 2. The backend
under test must reproduce the torch backend's loss terms on the same weights, batch and masks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.bench_train_step import (
    Shape,
    check_gradients,
    check_losses,
    gate_step,
    make_inputs,
    make_step,
    model_config,
)
from benchmarks.conftest import ON_GPU
from pacofr.models import build_model

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

PRESET, SIZE, BATCH = ("vit_small", 224, 64) if ON_GPU else ("tiny", 32, 2)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("step_kind", ["paco_incubation", "paco_end_to_end", "mae", "mcf", "fra"])
def test_train_step(benchmark, bench_device: torch.device, step_kind: str, backend: str) -> None:
    shape = Shape(PRESET, SIZE, BATCH, step_kind)
    torch.manual_seed(0)
    reference = build_model(model_config(shape, "torch")).to(bench_device)
    inputs = make_inputs(shape, reference.cfg, bench_device)
    want_losses, want_grads = gate_step(reference, shape, inputs, bench_device)
    model = build_model(model_config(shape, backend)).to(bench_device)
    model.load_state_dict(copy.deepcopy(reference.state_dict()))
    del reference
    got_losses, got_grads = gate_step(model, shape, inputs, bench_device)
    check_losses(backend, shape, got_losses, want_losses)
    check_gradients(backend, shape, got_grads, want_grads)
    step = make_step(model, shape, inputs, bench_device)

    def synced() -> torch.Tensor:
        loss = step()
        if bench_device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    benchmark.extra_info.update(family="train_step", backend=backend, shape=str(shape),
                                images_per_call=BATCH, device=str(bench_device))
    if not ON_GPU:
        benchmark.extra_info["note"] = "CPU run of a toy model: not a performance number; GPU numbers need a GPU"
    loss = benchmark.pedantic(synced, rounds=10 if ON_GPU else 3, warmup_rounds=3 if ON_GPU else 1)
    assert torch.isfinite(loss)
