"""pytest-benchmark suite of the masked patch ops (see benchmarks/conftest.py for CPU vs GPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_patches import (
    Inputs,
    Shape,
    assert_close,
    mae_forward_loss,
    mae_gather_visible,
    mae_unshuffle,
    make_inputs,
)
from benchmarks.conftest import ON_GPU, require_backend
from pacofr.ops import gather_patches, masked_patch_loss, scatter_tokens

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

SHAPE = Shape(256, 0.75, 512, "uint8") if ON_GPU else Shape(4, 0.75, 64, "uint8", image_size=64, patch=16)
IMPLS = ["mae", "reference", "triton", "cuda"]


@pytest.fixture(scope="module")
def inputs(bench_device: torch.device) -> Inputs:
    return make_inputs(SHAPE, bench_device, torch.Generator(device=bench_device).manual_seed(0))


def _backend(impl: str, device: torch.device, op: str) -> str:
    backend = "torch" if impl == "reference" else impl
    require_backend(backend, device, op)
    return backend


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_visible(timed, inputs: Inputs, bench_device: torch.device, impl: str) -> None:
    x = inputs

    def ours(backend: str) -> torch.Tensor:
        return gather_patches(x.images, x.ids_keep.int(), SHAPE.patch, out_dtype=torch.bfloat16, mean=x.mean,
                              std=x.std, backend=backend, validate=False)

    if impl == "mae":
        fn = lambda: mae_gather_visible(x.images, x.ids_keep, x.mean, x.std, SHAPE.patch).to(torch.bfloat16)
    else:
        backend = _backend(impl, bench_device, "gather_patches")
        fn = lambda: ours(backend)
    assert_close("gather", impl, fn(), ours("torch"), rtol=8e-3, atol=8e-3)
    timed(fn, family="patches", impl=impl, stage="gather", shape=SHAPE)


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_forward_backward(timed, inputs: Inputs, bench_device: torch.device, impl: str) -> None:
    x = inputs
    if impl == "mae":
        leaf = x.pred_full.detach().requires_grad_()
        loss = lambda: mae_forward_loss(x.images, leaf, x.mask, x.mean, x.std, SHAPE.patch)
    else:
        backend = _backend(impl, bench_device, "masked_patch_loss")
        leaf = x.pred_masked.detach().requires_grad_()
        loss = lambda: masked_patch_loss(leaf, x.images, x.ids_masked.int(), SHAPE.patch, mean=x.mean,
                                         std=x.std, backend=backend, validate=False)
    expected = masked_patch_loss(x.pred_masked, x.images, x.ids_masked, SHAPE.patch, mean=x.mean, std=x.std,
                                 backend="torch")
    assert_close("loss", impl, loss().detach(), expected, rtol=1e-3, atol=1e-5)
    timed(lambda: torch.autograd.grad(loss(), leaf), family="patches", impl=impl, stage="loss_forward_backward",
          shape=SHAPE)


@pytest.mark.parametrize("impl", IMPLS)
def test_unshuffle_forward_backward(timed, inputs: Inputs, bench_device: torch.device, impl: str) -> None:
    x = inputs
    leaves = [x.visible_tokens.detach().requires_grad_(), x.mask_token.detach().requires_grad_(),
              x.pos_embed.detach().requires_grad_()]
    grad_out = torch.ones(SHAPE.batch, SHAPE.num_patches, SHAPE.decoder_dim, device=bench_device,
                          dtype=torch.bfloat16)
    if impl == "mae":
        fn = lambda: mae_unshuffle(leaves[0], x.ids_restore, leaves[1], leaves[2])
    else:
        backend = _backend(impl, bench_device, "scatter_tokens")
        fn = lambda: scatter_tokens(leaves[0], x.ids_restore.int(), leaves[1], pos_embed=leaves[2],
                                    backend=backend, validate=False)
    expected = scatter_tokens(x.visible_tokens, x.ids_restore, x.mask_token, pos_embed=x.pos_embed, backend="torch")
    assert_close("unshuffle", impl, fn().detach(), expected, rtol=8e-3, atol=8e-3)
    timed(lambda: torch.autograd.grad(fn(), leaves, grad_out), family="patches", impl=impl,
          stage="unshuffle_forward_backward", shape=SHAPE)
