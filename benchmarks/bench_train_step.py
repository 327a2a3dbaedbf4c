"""End-to-end cost of a pre-training step (GPU tiers need a CUDA device; not run yet).

    python -m benchmarks.bench_train_step --quick --out DIR      # or via benchmarks.run
    python -m benchmarks.bench_train_step --cpu-smoke --out DIR  # CPU, "tiny" model, no times

One step is what :class:`pacofr.train.trainer.Trainer` does per optimiser step, without data
loading: ``zero_grad``, forward under bf16 autocast, backward, ``clip_grad_norm_``
(``train.clip_grad``), AdamW step (the trainer's defaults) and the model's step maintenance (codebook
maintenance, EMA teacher). Inputs are random images in [0, 1] already on the device, with the
template region ids of :class:`pacofr.train.regions.RegionAssigner`.

Rows, per encoder (ViT-S/16, ViT-B/16 at 224 px), batch (64, 256) and step kind:

- ``paco_incubation``: PaCo-FR in the incubation phase (nearest-prototype labels k*, L_bp, L_code);
- ``paco_end_to_end``: PaCo-FR after incubation (L_align);
- ``mae``: the MAE-face control (``method="mae"``);
- ``mcf``, ``fra``: the MCF-style and FRA-style peers (``method="mcf"`` / ``"fra"``);

each with ``cfg.backend="torch"`` and ``"auto"`` (the fused kernels where available; the row
records which backend every op resolved to). Before any time is recorded, the ``auto`` model,
loaded with the torch model's weights, must reproduce the torch model's loss terms and its
whole-model gradient (cosine and norm) on the same batch and masks. Each row holds the
median/p20/p80 step time (CUDA events, after warm-up steps), images/s, peak memory (weights, AdamW state and activations), the model FLOPs of one
forward + backward counted by ``torch.utils.flop_counter`` on the torch model, and model-FLOPs
utilisation against the bf16 GEMM rate measured in this run (so 100% = cuBLAS's dense GEMM rate,
not the datasheet peak). ``torch.compile`` is not applied (the trainer's default).

The cpu-smoke tier runs the ``tiny`` preset (32 px, batch 2) with backends torch and triton (the
interpreter), one step each after the same check, and records no time or memory.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import SMOKE_TIER, Bench, headline_first, time_steps_ms
from pacofr.models import ModelConfig, build_model
from pacofr.ops._dispatch import backend_status, registered_ops
from pacofr.train.config import TrainConfig
from pacofr.train.regions import RegionAssigner

FAMILY = "train_step"
#: step kind -> (ModelConfig.method, incubation)
STEP_KINDS: dict[str, tuple[str, bool]] = {"paco_incubation": ("paco", True),
                                           "paco_end_to_end": ("paco", False),
                                           "mae": ("mae", False), "mcf": ("mcf", False), "fra": ("fra", False)}
#: tier -> (warm-up steps, timed steps)
STEP_COUNTS = {"quick": (3, 10), "full": (5, 30), SMOKE_TIER: (0, 1)}
#: loss terms of the checked backend vs the torch backend: |a - b| <= RTOL * |b| + ATOL
GATE_RTOL, GATE_ATOL = 5e-2, 1e-2
#: whole-model gradient of the checked backend vs the torch backend: cosine >= MIN_COS and the
#: norms within NORM_RTOL of each other (bf16 autocast reorders sums, so not bitwise)
GATE_MIN_COS, GATE_NORM_RTOL = 0.99, 5e-2
TEACHER_MOMENTUM = 0.996


@dataclass(frozen=True)
class Shape:
    """One training-step configuration (``backend`` is recorded as the row's ``impl``)."""

    preset: str
    img_size: int
    batch: int
    step: str
    precision: str = "bf16"


#: the headline shape of the GPU tiers (PaCo-FR's incubation step at MAE-Base geometry), measured first
HEADLINE = Shape("vit_base", 224, 256, "paco_incubation")


def shapes(tier: str) -> Iterator[Shape]:
    """ViT-S/16 and ViT-B/16 at 224 px, batch 64 and 256, every step kind; cpu-smoke: ``tiny``, batch 2.
    The first is the headline shape."""
    if tier == SMOKE_TIER:
        for step in STEP_KINDS:
            yield Shape("tiny", 32, 2, step)
        return
    yield from headline_first(HEADLINE, (Shape(preset, 224, batch, step) for preset in ("vit_small", "vit_base")
                                         for batch in (64, 256) for step in STEP_KINDS))


def backends(bench: Bench, tier: str) -> tuple[str, ...]:
    """The torch backend first (the reference), then the one under test: ``auto`` on a GPU, or the
    single fused backend the session is restricted to; ``triton`` (its interpreter) in the smoke tier."""
    if tier == SMOKE_TIER:
        return ("torch", "triton")
    return ("torch", bench.fused[0] if len(bench.fused) == 1 else "auto")


def model_config(shape: Shape, backend: str) -> ModelConfig:
    """The preset of ``shape`` with its method and ``backend``."""
    method, _ = STEP_KINDS[shape.step]
    return ModelConfig.preset(shape.preset, img_size=shape.img_size, method=method, backend=backend)


def auto_resolution(device: torch.device) -> dict[str, str]:
    """Which backend ``auto`` picks for every registered op on tensors of ``device``."""
    probe = [torch.empty(0, device=device)]
    return {name: op.implementation("auto", probe)[0] for name, op in sorted(registered_ops().items())}


@dataclass
class StepInputs:
    """A batch on the device: images (B, 3, S, S) in [0, 1] and region ids (B, L) int64."""

    images: torch.Tensor
    region_ids: torch.Tensor


def make_inputs(shape: Shape, cfg: ModelConfig, device: torch.device, seed: int = 0) -> StepInputs:
    """Random images and the template region ids of ``cfg``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    images = torch.rand(shape.batch, 3, shape.img_size, shape.img_size, device=device, generator=generator)
    region_ids = RegionAssigner(cfg)({"image": images}).to(device)
    return StepInputs(images, region_ids)


def _autocast(shape: Shape, device: torch.device) -> contextlib.AbstractContextManager:
    if shape.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def gate_step(model: torch.nn.Module, shape: Shape, inputs: StepInputs, device: torch.device
              ) -> tuple[dict[str, float], torch.Tensor]:
    """Loss terms and the flat fp32 gradient (all parameters, zeros where none) of one forward and
    backward, masks from a generator seeded with 0. Leaves no gradient and no codebook work behind."""
    _, incubation = STEP_KINDS[shape.step]
    generator = torch.Generator(device=device).manual_seed(0)
    model.zero_grad(set_to_none=True)
    with _autocast(shape, device):
        out = model(inputs.images, inputs.region_ids, incubation=incubation, generator=generator)
    out.loss.float().backward()
    grads = torch.cat([(p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)).flatten()
                       for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    losses = {"loss": out.loss.item(), **{name: value.item() for name, value in out.losses.items()}}
    return losses, grads


def check_gradients(backend: str, shape: Shape, got: torch.Tensor, want: torch.Tensor) -> float:
    """Raise unless the flat gradient ``got`` points where ``want`` does with a similar norm;
    return their cosine similarity."""
    cos = float(torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=0))
    ratio = float(got.double().norm() / want.double().norm().clamp_min(1e-30))
    if not (cos >= GATE_MIN_COS and abs(ratio - 1.0) <= GATE_NORM_RTOL):  # also catches NaN
        raise AssertionError(f"{backend} backend: gradient differs from the torch backend's on {shape} "
                             f"(cosine {cos:.4f}, norm ratio {ratio:.4f})")
    return cos


def check_losses(backend: str, shape: Shape, got: dict[str, float], want: dict[str, float]) -> float:
    """Raise unless every term of ``got`` matches ``want``; return the largest relative difference."""
    if set(got) != set(want):
        raise AssertionError(f"{backend} reports loss terms {sorted(got)}, the torch backend {sorted(want)}")
    worst = 0.0
    for name, value in want.items():
        diff = abs(got[name] - value)
        if not (diff <= GATE_RTOL * abs(value) + GATE_ATOL):  # also catches NaN
            raise AssertionError(f"{backend} backend: loss term {name!r} = {got[name]:.6g} but the torch backend "
                                 f"gives {value:.6g} on {shape}")
        worst = max(worst, diff / max(abs(value), 1e-12))
    return worst


def make_step(model: torch.nn.Module, shape: Shape, inputs: StepInputs, device: torch.device) -> Callable[[], torch.Tensor]:
    """One optimiser step as the trainer does it (see the module docstring); returns the detached loss."""
    train = TrainConfig()
    optimizer = torch.optim.AdamW(model.param_groups(train.weight_decay), lr=train.base_lr, betas=train.betas)
    _, incubation = STEP_KINDS[shape.step]
    generator = torch.Generator(device=device).manual_seed(1)
    maintenance = model.step_maintenance()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(shape, device):
            out = model(inputs.images, inputs.region_ids, incubation=incubation, generator=generator)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip_grad)
        optimizer.step()
        maintenance.record(out)
        maintenance.apply(teacher_momentum=TEACHER_MOMENTUM)
        return out.loss.detach()

    return step


def count_flops(step: Callable[[], torch.Tensor]) -> float:
    """FLOPs of one call of ``step`` as ``torch.utils.flop_counter`` counts them (GEMMs, convs, attention)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(bench: Bench, step: Callable[[], torch.Tensor], tier: str) -> dict[str, Any]:
    """Time and peak memory of ``step`` (GPU); in the smoke tier or a check-only session run it once,
    finite loss required."""
    warmup, iters = STEP_COUNTS[tier]
    if not bench.timed:
        loss = step()
        if not torch.isfinite(loss):
            raise AssertionError(f"non-finite training loss {loss.item()}")
        return {"median_ms": None, "p20_ms": None, "p80_ms": None, "iters": 1, "peak_mib": None}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    timing = time_steps_ms(step, warmup=warmup, iters=iters)
    return {**timing, "peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def derived(bench: Bench, shape: Shape, timing: dict[str, Any], flops: float | None) -> dict[str, Any]:
    """images/s, achieved TFLOP/s and model-FLOPs utilisation (None where unknown)."""
    median = timing["median_ms"]
    if median is None:
        return {"images_per_s": None, "achieved_tflops": None, "mfu_pct": None}
    seconds = median * 1e-3
    tflops = flops / seconds / 1e12 if flops else None
    ceiling = (bench.ceilings or {}).get("bf16_gemm_tflops")
    mfu = 100.0 * tflops / ceiling if (tflops is not None and ceiling) else None
    return {"images_per_s": shape.batch / seconds, "achieved_tflops": tflops, "mfu_pct": mfu}


def bench_shape(bench: Bench, tier: str, shape: Shape) -> None:
    """Build the torch model, then check, time and record every backend of ``tier`` on ``shape``."""
    device = bench.device
    torch.manual_seed(0)
    reference = build_model(model_config(shape, "torch")).to(device)
    state = copy.deepcopy(reference.state_dict())
    del reference
    inputs = make_inputs(shape, model_config(shape, "torch"), device)
    want: tuple[dict[str, float], torch.Tensor] | None = None
    flops: float | None = None
    for backend in backends(bench, tier):
        if backend in ("triton", "cuda"):
            ok, why = backend_status(backend, device)
            if not ok:
                bench.skip(FAMILY, backend, why)
                continue
        model = build_model(model_config(shape, backend)).to(device)
        model.load_state_dict(state)
        model.train()
        losses, grads = gate_step(model, shape, inputs, device)
        if want is None:
            want, gate_diff, gate_cos = (losses, grads), 0.0, 1.0
        else:
            gate_diff = check_losses(backend, shape, losses, want[0])
            gate_cos = check_gradients(backend, shape, grads, want[1])
        del grads
        step = make_step(model, shape, inputs, device)
        if flops is None:  # model FLOPs, counted once on the torch model (kernels are invisible to the counter)
            flops = count_flops(step)
        timing = measure(bench, step, tier)
        row = {"family": FAMILY, "impl": backend, "shape": asdict(shape), "checked": True, **timing,
               **derived(bench, shape, timing, flops), "model_gflop_per_step": flops / 1e9,
               "gate_max_rel_diff": gate_diff, "gate_grad_cos": gate_cos, "floor_ms": None, "pct_of_floor": None}
        if backend == "auto":
            row["auto_backends"] = auto_resolution(device)
        bench.add_row(row)
        del model, step
        bench.empty_cache()


def run(tier: str, bench: Bench) -> None:
    """The shapes of ``tier`` that ``bench`` selects (steps run eagerly: no compiled baseline).

    A shape that runs out of GPU memory is recorded with ``"error": "out of memory"`` and no numbers.
    """
    for shape, _ in bench.select(shapes(tier)):
        try:
            bench_shape(bench, tier, shape)
        except torch.cuda.OutOfMemoryError:
            bench.empty_cache()
            bench.add_row({"family": FAMILY, "impl": "all", "shape": asdict(shape), "checked": False,
                           "error": "out of memory", "median_ms": None})


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.run --only train_step`` with the same options."""
    from benchmarks.run import main as run_main

    return run_main(["--only", FAMILY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
