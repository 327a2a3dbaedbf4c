"""Benchmark of the masked patch ops (``pacofr.ops.patches``); GPU tiers need a CUDA device, not run yet.

    python -m benchmarks.bench_patches --quick --out DIR      # or via benchmarks.run
    python -m benchmarks.bench_patches --full --out DIR
    python -m benchmarks.bench_patches --cpu-smoke --out DIR  # CPU, 32 px images, no times

MAE-Base geometry: 224 px images, patch 16 (L = 196, P = 768), B in {64, 256}, mask ratio in
{0.5, 0.6, 0.75} (``len_keep = int(L * (1 - ratio))`` as in MAE), decoder width Dd in {512, 768}.
Four stages; every implementation (the MAE baselines included) is first checked against the torch
reference (raises on a mismatch), then timed side by side: ``mae`` (the eager code of
facebookresearch/mae: full-image patchify copy, int64 index repeated to the feature size, loss
over all patches, ``repeat`` + ``cat`` + ``gather``), ``mae_compiled`` (``torch.compile`` of it),
``reference`` (our torch backend), ``triton`` and ``cuda``:

- ``gather``: patchify + gather the visible patches (+ uint8 scaling and mean/std);
- ``targets``: norm_pix targets of the masked patches, materialised in fp32;
- ``loss``: the norm_pix MSE loss, forward and forward + backward (our ops score the masked
  patches only; MAE scores all of them and masks the mean);
- ``unshuffle``: decoder unshuffle with mask tokens + pos_embed, forward and forward + backward.

Each row holds do_bench median/p20/p80 (ms), peak extra memory, the minimal HBM bytes of the
stage (read each needed input once, write each output once) and % of the copy-bandwidth floor.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import SMOKE_TIER, Bench, headline_first
from pacofr.models.config import IMAGENET_MEAN, IMAGENET_STD
from pacofr.ops import gather_patches, masked_patch_loss, patch_targets, scatter_tokens

FAMILY = "patches"
IMAGE_DTYPES = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}
IMAGE_SIZE, PATCH, CHANNELS = 224, 16, 3


@dataclass(frozen=True)
class Shape:
    batch: int
    mask_ratio: float
    decoder_dim: int
    image_dtype: str
    image_size: int = IMAGE_SIZE
    patch: int = PATCH

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def len_keep(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * CHANNELS


#: the headline shape of the GPU tiers (MAE-Base's training geometry), measured first
HEADLINE = Shape(256, 0.75, 512, "bf16")


def shapes(tier: str) -> Iterator[Shape]:
    """Quick tier: B=256, ratio 0.75, Dd 512, bf16 and uint8 pixels. Full: the issue's matrix.
    cpu-smoke: 32 px images of 8 px patches (L = 16), B = 2. The first is the headline shape."""
    if tier == SMOKE_TIER:
        yield Shape(2, 0.75, 32, "bf16", image_size=32, patch=8)
        yield Shape(2, 0.5, 32, "uint8", image_size=32, patch=8)
        yield Shape(2, 0.75, 24, "fp32", image_size=32, patch=8)
        return
    if tier == "quick":
        yield HEADLINE
        yield Shape(256, 0.75, 512, "uint8")
        return
    full = itertools.product((64, 256), (0.5, 0.6, 0.75), (512, 768), ("bf16", "uint8", "fp32"))
    yield from headline_first(HEADLINE, (Shape(batch, ratio, dim, dtype) for batch, ratio, dim, dtype in full))


# ----------------------------------------------------------------------------------------------
# MAE's eager code (facebookresearch/mae models_mae.py), the baseline
# ----------------------------------------------------------------------------------------------

def mae_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    n, c, h = imgs.shape[0], imgs.shape[1], imgs.shape[2] // p
    x = imgs.reshape(n, c, h, p, h, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * h, p * p * c)


def mae_normalise(imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """What a data pipeline does before MAE sees the pixels: uint8 -> float, /255, mean/std."""
    if imgs.dtype == torch.uint8:
        return (imgs.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return imgs


def mae_gather_visible(imgs, ids_keep, mean, std, p: int) -> torch.Tensor:
    x = mae_patchify(mae_normalise(imgs, mean, std), p)
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


def mae_targets(imgs, ids_masked, mean, std, p: int) -> torch.Tensor:
    target = mae_patchify(mae_normalise(imgs, mean, std), p).float()
    target = torch.gather(target, dim=1, index=ids_masked.unsqueeze(-1).repeat(1, 1, target.shape[-1]))
    m, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return (target - m) / (var + 1.0e-6) ** 0.5


def mae_forward_loss(imgs, pred_full, mask, mean, std, p: int) -> torch.Tensor:
    target = mae_patchify(mae_normalise(imgs, mean, std), p)
    m, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - m) / (var + 1.0e-6) ** 0.5
    loss = ((pred_full - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def mae_unshuffle(x, ids_restore, mask_token, pos_embed) -> torch.Tensor:
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
    x_ = torch.cat([x, mask_tokens.to(x.dtype)], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return x_ + pos_embed.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# inputs, checks, bytes
# ----------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    images: torch.Tensor
    ids_keep: torch.Tensor       # (B, len_keep) int64 (MAE) ...
    ids_masked: torch.Tensor     # (B, L - len_keep) int64
    ids_restore: torch.Tensor    # (B, L) int64
    mask: torch.Tensor           # (B, L) fp32, 1 = masked
    pred_full: torch.Tensor      # (B, L, P) bf16
    pred_masked: torch.Tensor    # (B, L - len_keep, P) bf16
    visible_tokens: torch.Tensor  # (B, len_keep, Dd) bf16
    mask_token: torch.Tensor     # (1, 1, Dd) fp32
    pos_embed: torch.Tensor      # (1, L, Dd) fp32
    mean: torch.Tensor
    std: torch.Tensor


def make_inputs(shape: Shape, device: torch.device, generator: torch.Generator) -> Inputs:
    dtype = IMAGE_DTYPES[shape.image_dtype]
    size = (shape.batch, CHANNELS, shape.image_size, shape.image_size)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, size, device=device, generator=generator, dtype=torch.uint8)
    else:
        images = torch.randn(size, device=device, generator=generator).to(dtype)
    noise = torch.rand(shape.batch, shape.num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(shape.batch, shape.num_patches, device=device)
    mask[:, :shape.len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    pred_full = torch.randn(shape.batch, shape.num_patches, shape.patch_dim, device=device,
                            generator=generator).to(torch.bfloat16)
    ids_masked = ids_shuffle[:, shape.len_keep:]
    pred_masked = torch.gather(pred_full, 1, ids_masked.unsqueeze(-1).expand(-1, -1, shape.patch_dim))
    dim = shape.decoder_dim
    return Inputs(
        images=images, ids_keep=ids_shuffle[:, :shape.len_keep].contiguous(), ids_masked=ids_masked.contiguous(),
        ids_restore=ids_restore, mask=mask, pred_full=pred_full, pred_masked=pred_masked.contiguous(),
        visible_tokens=torch.randn(shape.batch, shape.len_keep, dim, device=device,
                                   generator=generator).to(torch.bfloat16),
        mask_token=0.02 * torch.randn(1, 1, dim, device=device, generator=generator),
        pos_embed=torch.randn(1, shape.num_patches, dim, device=device, generator=generator),
        mean=torch.tensor(IMAGENET_MEAN, device=device), std=torch.tensor(IMAGENET_STD, device=device))


def assert_close(name: str, backend: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                  atol: float) -> None:
    try:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)
    except AssertionError as err:
        raise AssertionError(f"{backend} disagrees with the torch reference on {name}: {err}") from None


def _grad(fn: Callable[[torch.Tensor], torch.Tensor], leaf: torch.Tensor, grad_out: torch.Tensor | None = None):
    leaf = leaf.detach().requires_grad_()
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return out, grad


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------

def _with_baselines(bench: Bench, name: str, mae: Callable, args: tuple, ours: dict[str, Callable[[], object]],
                    expected: torch.Tensor, rtol: float, atol: float, with_compile: bool
                    ) -> dict[str, Callable[[], object]]:
    """``mae`` (and its compiled form) called on ``args``, checked against ``expected``, then ``ours``."""
    impls: dict[str, Callable[[], object]] = {"mae": lambda: mae(*args)}
    if with_compile:
        mae_c = bench.compile(mae)
        impls["mae_compiled"] = lambda: mae_c(*args)
    for impl, fn in impls.items():
        assert_close(name, impl, fn(), expected, rtol=rtol, atol=atol)
    return {**impls, **ours}


def _record_all(bench: Bench, stage: str, shape: Shape, impls: dict[str, Callable[[], object]],
                bytes_moved: float) -> None:
    """Every implementation of ``impls`` was checked before this call; record them all."""
    floor = bench.floor_ms(bytes_moved=bytes_moved)
    for impl, fn in impls.items():
        bench.record(family=FAMILY, impl=impl, shape={**asdict(shape), "stage": stage}, fn=fn,
                     floor_ms=floor, checked=True, extra={"stage": stage, "min_bytes": bytes_moved})


def bench_gather(bench: Bench, shape: Shape, x: Inputs, backends: list[str], with_compile: bool) -> None:
    is_uint8 = x.images.dtype == torch.uint8
    out_dtype = torch.bfloat16
    stats = {"mean": x.mean, "std": x.std} if is_uint8 else {}

    def ours(backend: str, ids: torch.Tensor) -> torch.Tensor:
        return gather_patches(x.images, ids, shape.patch, out_dtype=out_dtype, backend=backend, validate=False,
                              **stats)

    ids32 = x.ids_keep.int()
    expected = ours("torch", x.ids_keep)
    for backend in backends:
        assert_close("gather", backend, ours(backend, ids32), expected, rtol=8e-3, atol=8e-3)
    mae = lambda imgs, ids: mae_gather_visible(imgs, ids, x.mean, x.std, shape.patch).to(out_dtype)  # noqa: E731
    fused = {"reference": lambda: ours("torch", x.ids_keep),
             **{backend: (lambda backend=backend: ours(backend, ids32)) for backend in backends}}
    impls = _with_baselines(bench, "gather", mae, (x.images, x.ids_keep), fused, expected, 8e-3, 8e-3,
                            with_compile)
    rows = shape.batch * shape.len_keep
    bytes_moved = rows * shape.patch_dim * (x.images.element_size() + 2) + rows * 4
    _record_all(bench, "gather", shape, impls, bytes_moved)


def bench_targets(bench: Bench, shape: Shape, x: Inputs, backends: list[str], with_compile: bool) -> None:
    stats = {"mean": x.mean, "std": x.std} if x.images.dtype == torch.uint8 else {}
    ids32 = x.ids_masked.int()
    ours = lambda backend, ids: patch_targets(x.images, ids, shape.patch, backend=backend,  # noqa: E731
                                              validate=False, **stats)
    expected = ours("torch", x.ids_masked)
    for backend in backends:
        assert_close("targets", backend, ours(backend, ids32), expected, rtol=1e-4, atol=1e-4)
    mae = lambda imgs, ids: mae_targets(imgs, ids, x.mean, x.std, shape.patch)  # noqa: E731
    fused = {"reference": lambda: ours("torch", x.ids_masked),
             **{backend: (lambda backend=backend: ours(backend, ids32)) for backend in backends}}
    impls = _with_baselines(bench, "targets", mae, (x.images, x.ids_masked), fused, expected, 1e-4, 1e-4,
                            with_compile)
    rows = x.ids_masked.numel()
    bytes_moved = rows * shape.patch_dim * (x.images.element_size() + 4) + rows * 4
    _record_all(bench, "targets", shape, impls, bytes_moved)


def bench_loss(bench: Bench, shape: Shape, x: Inputs, backends: list[str], with_compile: bool) -> None:
    stats = {"mean": x.mean, "std": x.std} if x.images.dtype == torch.uint8 else {}
    ids32 = x.ids_masked.int()

    def ours(backend: str, pred: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(pred, x.images, ids, shape.patch, backend=backend, validate=False, **stats)

    expected, expected_grad = _grad(lambda p: ours("torch", p, x.ids_masked), x.pred_masked)
    # our reference against MAE's math with fp32 statistics
    pixels32 = x.images if x.images.dtype == torch.uint8 else x.images.float()
    mae_value = mae_forward_loss(pixels32, x.pred_full.float(), x.mask, x.mean, x.std, shape.patch)
    assert_close("loss (torch backend vs MAE forward_loss)", "torch", expected, mae_value, rtol=1e-3, atol=1e-5)
    for backend in backends:
        value, grad = _grad(lambda p, backend=backend: ours(backend, p, ids32), x.pred_masked)
        assert_close("loss", backend, value, expected, rtol=1e-5, atol=1e-6)
        assert_close("loss gradient", backend, grad, expected_grad, rtol=1e-2, atol=1e-9)
    # MAE's eager code computes the patch statistics in the pixel dtype (bf16 pixels: 8 bits)
    mae_rtol = 5e-2 if x.images.dtype == torch.bfloat16 else 1e-3
    mae = lambda pred: mae_forward_loss(x.images, pred, x.mask, x.mean, x.std, shape.patch)  # noqa: E731
    pred_full = x.pred_full.detach().requires_grad_()
    pred_masked = x.pred_masked.detach().requires_grad_()
    variants: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {"mae": (lambda: mae(pred_full), pred_full)}
    if with_compile:
        mae_c = bench.compile(mae)
        variants["mae_compiled"] = (lambda: mae_c(pred_full), pred_full)
    for impl, (fn, _) in variants.items():
        assert_close("loss (vs MAE forward_loss)", impl, fn().detach(), expected, rtol=mae_rtol, atol=1e-5)
    variants["reference"] = (lambda: ours("torch", pred_masked, x.ids_masked), pred_masked)
    for backend in backends:
        variants[backend] = (lambda backend=backend: ours(backend, pred_masked, ids32), pred_masked)
    rows = x.ids_masked.numel()
    pixel_bytes = rows * shape.patch_dim * x.images.element_size()
    pred_bytes = rows * shape.patch_dim * 2
    with torch.no_grad():
        forward = {impl: fn for impl, (fn, _) in variants.items()}
        _record_all(bench, "loss_forward", shape, forward, pixel_bytes + pred_bytes)
    both = {impl: (lambda fn=fn, leaf=leaf: torch.autograd.grad(fn(), leaf)) for impl, (fn, leaf) in variants.items()}
    # forward + backward: read pixels and pred twice (backward recomputes the target), write grad
    _record_all(bench, "loss_forward_backward", shape, both, 2 * (pixel_bytes + pred_bytes) + pred_bytes)


def bench_unshuffle(bench: Bench, shape: Shape, x: Inputs, backends: list[str], with_compile: bool) -> None:
    ids32 = x.ids_restore.int()
    grad_out = torch.randn(shape.batch, shape.num_patches, shape.decoder_dim, device=x.images.device,
                           dtype=torch.bfloat16)

    def ours(backend: str, visible: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return scatter_tokens(visible, ids, x.mask_token, pos_embed=x.pos_embed, backend=backend, validate=False)

    expected, expected_grad = _grad(lambda v: ours("torch", v, x.ids_restore), x.visible_tokens, grad_out)
    for backend in backends:
        value, grad = _grad(lambda v, backend=backend: ours(backend, v, ids32), x.visible_tokens, grad_out)
        assert_close("unshuffle", backend, value, expected, rtol=8e-3, atol=8e-3)
        assert_close("unshuffle gradient", backend, grad, expected_grad, rtol=8e-3, atol=8e-3)
    leaves = [x.visible_tokens.detach().requires_grad_(), x.mask_token.detach().requires_grad_(),
              x.pos_embed.detach().requires_grad_()]
    mae = lambda v, m, p: mae_unshuffle(v, x.ids_restore, m, p)  # noqa: E731
    fused: dict[str, Callable[[], torch.Tensor]] = {
        "reference": lambda: scatter_tokens(leaves[0], x.ids_restore, leaves[1], pos_embed=leaves[2],
                                            backend="torch", validate=False),
        **{backend: (lambda backend=backend: scatter_tokens(leaves[0], ids32, leaves[1], pos_embed=leaves[2],
                                                            backend=backend, validate=False))
           for backend in backends}}
    with torch.no_grad():
        variants = _with_baselines(bench, "unshuffle (vs MAE)", mae, tuple(leaves), fused, expected, 8e-3, 8e-3,
                                   with_compile)
    token_bytes = 2 * shape.decoder_dim
    read_visible = shape.batch * shape.len_keep * token_bytes
    full = shape.batch * shape.num_patches * token_bytes
    pos_bytes = shape.num_patches * shape.decoder_dim * 4
    with torch.no_grad():
        _record_all(bench, "unshuffle_forward", shape, dict(variants), read_visible + full + pos_bytes)
    both = {impl: (lambda fn=fn: torch.autograd.grad(fn(), leaves, grad_out)) for impl, fn in variants.items()}
    _record_all(bench, "unshuffle_forward_backward", shape, both,
                (read_visible + full + pos_bytes) + (full + read_visible + pos_bytes))


def run(tier: str, bench: Bench) -> None:
    """Check then time every stage on the shapes of ``tier`` that ``bench`` selects; rows go into ``bench``."""
    generator = torch.Generator(device=bench.device).manual_seed(0)
    backends = bench.fused_backends(FAMILY, "gather_patches")
    for shape, headline in bench.select(shapes(tier)):
        with_compile = bench.should_compile(headline)
        inputs = make_inputs(shape, bench.device, generator)
        bench_gather(bench, shape, inputs, backends, with_compile)
        bench_targets(bench, shape, inputs, backends, with_compile)
        bench_loss(bench, shape, inputs, backends, with_compile)
        bench_unshuffle(bench, shape, inputs, backends, with_compile)
        del inputs
        bench.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.run --only patches`` with the same options."""
    from benchmarks.run import main as run_main

    return run_main(["--only", FAMILY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
