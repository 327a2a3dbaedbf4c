"""The op calls whose Triton launches the static check compiles.

Two sources, both read from the code that defines them:

* :func:`benchmark_workloads`: every shape of the benchmark families' tiers (quick by default)
  (``benchmarks/bench_nearest_token.py``, ``bench_soft_assign.py``, ``bench_patches.py``), in every
  input dtype the op accepts, every k / m the kernels support, forward and backward, called
  through the public ops with ``backend="triton"``. Shapes that differ only in their row or code
  count compile to the same variants (see :func:`representatives`), so one of each is called;
* :func:`model_workloads`: one optimiser step of every model preset
  (:meth:`pacofr.models.ModelConfig.preset_names`) and step kind of
  ``benchmarks/bench_train_step.py`` (incubation, end to end, MAE-face), as the trainer runs it
  (bf16 autocast, backward, clipping, AdamW, codebook maintenance), on the CPU with the torch
  backend; the op calls it makes are then replayed on the triton backend. Tile choices do not
  depend on the batch size, so a small batch gives the launches of the real one.

Each workload is a name and a callable; run them under a
:class:`~benchmarks.static.launches.KernelRecorder` (and :func:`compile_only_dispatch`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks.static.launches import KernelRecorder, OpCallRecorder, replay_on_triton, run_with_backward
from pacofr.ops.precision import PRECISIONS

#: input dtypes every float op accepts
FLOAT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: every power-of-two k / m up to the 16 the fused codebook kernels keep in registers
SELECTION_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16)
#: batch of the recorded model steps (the tile choices are independent of it)
MODEL_STEP_BATCH = 4


@dataclass(frozen=True)
class Workload:
    """A named call that launches kernels; ``training`` marks the training path (stricter rules)."""

    name: str
    run: Callable[[KernelRecorder], None]
    training: bool = False


def specialisation(size: int) -> tuple[bool, bool]:
    """What Triton's runtime specialises an integer argument on: being 1, being a multiple of 16."""
    return size == 1, size % 16 == 0


def representatives(geometries: set[tuple], sizes: tuple[int, ...]) -> list[tuple]:
    """One geometry (the first in sorted order) per class that compiles to the same variants: geometries
    equal but at the ``sizes`` positions (row and code counts, which change only the launch grid),
    whose values there share :func:`specialisation`."""
    best: dict[tuple, tuple] = {}
    for geometry in sorted(geometries):
        key = tuple(specialisation(v) if i in sizes else v for i, v in enumerate(geometry))
        best.setdefault(key, geometry)
    return sorted(best.values())


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).requires_grad_(requires_grad)


def _nearest_token_workloads(tiers: tuple[str, ...]) -> Iterator[Workload]:
    from benchmarks.bench_nearest_token import shapes
    from pacofr.ops import nearest_token

    geometry = representatives({(s.n, s.codes, s.dim, s.metric) for tier in tiers for s in shapes(tier)}, (0, 1))
    for (n, codes, dim, metric), k, (dtype_name, dtype) in itertools.product(
            geometry, SELECTION_SIZES, FLOAT_DTYPES.items()):
        for precision in PRECISIONS if dtype == torch.float32 else ("ieee",):
            def call(recorder: KernelRecorder, n=n, codes=codes, dim=dim, metric=metric, k=k, dtype=dtype,
                     precision=precision) -> None:
                nearest_token(empty_tensor((n, dim), dtype), empty_tensor((codes, dim), dtype), k, metric,
                              precision=precision, backend="triton")
            yield Workload(f"nearest_token N={n} K={codes} D={dim} k={k} {metric} {dtype_name} {precision}", call)


def _soft_assign_workloads(tiers: tuple[str, ...]) -> Iterator[Workload]:
    from benchmarks.bench_soft_assign import shapes, stats_shapes
    from pacofr.ops import codebook_stats, soft_assign

    geometry = representatives({(s.n, s.codes, s.dim, s.metric) for tier in tiers for s in shapes(tier)}, (0, 1))
    for (n, codes, dim, metric), m, (dtype_name, dtype), deterministic in itertools.product(
            geometry, SELECTION_SIZES, FLOAT_DTYPES.items(), (False, True)):
        # the ranking precision changes only the forward; the backward is recorded once per dtype
        for precision in PRECISIONS if dtype == torch.float32 and not deterministic else ("ieee",):
            def call(recorder: KernelRecorder, n=n, codes=codes, dim=dim, metric=metric, m=m, dtype=dtype,
                     deterministic=deterministic, precision=precision) -> None:
                q, book = empty_tensor((n, dim), dtype, True), empty_tensor((codes, dim), dtype, True)
                run_with_backward(lambda: soft_assign(q, book, m, 0.1, metric=metric, deterministic=deterministic,
                                                      precision=precision, backend="triton")[::2])
            yield Workload(f"soft_assign N={n} K={codes} D={dim} m={m} {metric} {dtype_name} {precision}"
                           f"{' deterministic' if deterministic else ''}", call)
    stats = representatives({(s.n, s.codes, s.dim, s.m) for tier in tiers for s in stats_shapes(tier)}, (0, 1))
    for (n, codes, dim, m), (dtype_name, dtype), deterministic in itertools.product(
            stats, FLOAT_DTYPES.items(), (False, True)):
        def call(recorder: KernelRecorder, n=n, codes=codes, dim=dim, m=m, dtype=dtype,
                 deterministic=deterministic) -> None:
            indices = torch.zeros((n, m), dtype=torch.int64)
            codebook_stats(indices, codes, weights=empty_tensor((n, m), torch.float32), x=empty_tensor((n, dim), dtype),
                           deterministic=deterministic, backend="triton")
        yield Workload(f"codebook_stats N={n} K={codes} D={dim} m={m} {dtype_name}"
                       f"{' deterministic' if deterministic else ''}", call)


def _patch_workloads(tiers: tuple[str, ...]) -> Iterator[Workload]:
    from benchmarks.bench_patches import CHANNELS, shapes
    from pacofr.ops import gather_patches, masked_patch_loss, patch_targets, scatter_tokens

    image_dtypes = {**FLOAT_DTYPES, "uint8": torch.uint8}
    geometry = {(s.batch, s.image_size, s.patch, s.len_keep, s.decoder_dim) for tier in tiers for s in shapes(tier)}
    for (batch, size, patch, keep, width), (dtype_name, dtype) in itertools.product(sorted(geometry),
                                                                                    image_dtypes.items()):
        def call(recorder: KernelRecorder, batch=batch, size=size, patch=patch, keep=keep, width=width,
                 dtype=dtype) -> None:
            length = (size // patch) ** 2
            float_images = dtype.is_floating_point
            images = empty_tensor((batch, CHANNELS, size, size), dtype, float_images)
            ids = torch.arange(length).expand(batch, -1)[:, :keep].contiguous()
            restore = torch.arange(length).expand(batch, -1).contiguous()
            stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
            run_with_backward(lambda: gather_patches(images, ids, patch, **stats, backend="triton", validate=False))
            patch_targets(images, ids, patch, backend="triton", validate=False)
            pred = empty_tensor((batch, keep, patch * patch * CHANNELS), torch.float32, True)
            run_with_backward(lambda: masked_patch_loss(pred, images, ids, patch, backend="triton", validate=False))
            visible = empty_tensor((batch, keep, width), dtype if float_images else torch.bfloat16, True)
            token = empty_tensor((width,), visible.dtype, True)
            pos = empty_tensor((1, length, width), visible.dtype, True)
            run_with_backward(lambda: scatter_tokens(visible, restore, token, pos_embed=pos, backend="triton",
                                                     validate=False))
        yield Workload(f"patches B={batch} S={size} p={patch} keep={keep} Dd={width} {dtype_name}", call)


def benchmark_workloads(tiers: tuple[str, ...] = ("quick",)) -> list[Workload]:
    """Every op call of the benchmark families' ``tiers`` (see the module docstring)."""
    return [*_nearest_token_workloads(tiers), *_soft_assign_workloads(tiers), *_patch_workloads(tiers)]


def model_workloads(presets: tuple[str, ...] | None = None) -> list[Workload]:
    """One recorded optimiser step per (model preset, step kind), replayed on the triton backend."""
    from benchmarks.bench_train_step import STEP_KINDS
    from pacofr.models import ModelConfig

    names = presets or ModelConfig.preset_names()
    return [Workload(f"model {preset} {step}", _model_step(preset, step), training=True)
            for preset in names for step in STEP_KINDS]


def _model_step(preset: str, step: str) -> Callable[[KernelRecorder], None]:
    def call(recorder: KernelRecorder) -> None:
        from benchmarks.bench_train_step import Shape, make_inputs, make_step, model_config
        from pacofr.models import ModelConfig, build_model

        img_size = ModelConfig.preset(preset).img_size
        shape = Shape(preset, img_size, MODEL_STEP_BATCH, step)
        cfg = model_config(shape, "torch")
        torch.manual_seed(0)
        model = build_model(cfg).train()
        inputs = make_inputs(shape, cfg, torch.device("cpu"))
        train_step = make_step(model, shape, inputs, torch.device("cpu"))
        with OpCallRecorder(origin=recorder.origin) as ops:
            train_step()
        replay_on_triton(ops.calls, recorder)

    return call
