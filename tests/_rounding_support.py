"""A measured scale of fp32 rounding error, for tests that compare two fp32 computations of one model.

The torch reference and the fused (Triton / CUDA) backends compute the same function in fp32 and
round in different orders, so their results differ by the difference of two rounding errors. How
large that is depends on the model, its weights, the batch and the device, so no fixed tolerance
fits: :func:`reference_and_rounding_spread` measures it where the test runs, in the way Monte Carlo
arithmetic does. It reruns the fp32 reference with every parameter moved by one ulp in a random
direction: each rerun rounds every intermediate value differently, and on top moves the result by
the model's conditioning times a unit-roundoff change of its inputs, so its distance from the
unperturbed reference is the size of one fp32 computation's rounding error at these inputs.

:func:`assert_within_rounding` then bounds the fused backend's distance from the reference by
:data:`ROUNDING_FACTOR` times that spread, norm-wise per tensor, never below the rounding of the
result itself (the unit roundoff times its norm: a scalar's spread is a whole number of ulps and
can be 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _tolerances import U32
from torch import nn

from pacofr.models.output import ModelOutput

UNIT_ROUNDOFF = U32
"""fp32's unit roundoff u: storing a value rounds it by at most u relative."""

ROUNDING_FACTOR = 8.0
"""How many times the measured rounding spread two correct fp32 backends may differ by.

Both distances (fused vs reference, nudged rerun vs reference) are differences of two fp32
rounding errors of the same size, so their ratio is of order 1. Measured on the tiny PaCo-FR and
MAE-face models (incubation and end to end) and the FRA-style model, 5 seeds each, 3 reruns, on the
CPU (Triton interpreter): at most 3.0, met by scalar losses whose reruns moved them by 0-1 ulp while
the fused backend was 2-3 ulps away; no gradient tensor was over 2.1 times its spread. 8 keeps a
margin of more than 2 over that. Scaling one fused op's output by 1 + 1e-2 put the results 7e3 to
3e5 times their spread away (gather_patches, patch_targets, masked_patch_loss, scatter_tokens,
soft_assign; nearest_token's distances and codebook_stats feed no loss or gradient).
tests/test_train_ddp.py uses it for DDP against one process, both against float64 (measured ratio
at most 1.51 there).
"""

Results = dict[str, torch.Tensor]


def losses_and_gradients(model: nn.Module, out: ModelOutput) -> Results:
    """Backpropagate ``out.loss`` through ``model`` (gradients zeroed first by the caller) and return the
    fp32 results to compare: every loss by name (0-d), "total" and every parameter's gradient ("grad:" + name)."""
    out.loss.backward()
    results = {name: value.detach().clone() for name, value in out.losses.items()}
    results["total"] = out.loss.detach().clone()
    results.update({"grad:" + n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return results


def _nudge_by_one_ulp(model: nn.Module, saved: list[torch.Tensor], generator: torch.Generator) -> None:
    """Set every parameter to its ``saved`` value moved one ulp up or down (a fair coin per element)."""
    with torch.no_grad():
        for param, value in zip(model.parameters(), saved):
            up = (torch.rand(value.shape, generator=generator) < 0.5).to(value.device)
            param.copy_(torch.nextafter(value, torch.where(up, torch.inf, -torch.inf).to(value.dtype)))


def reference_and_rounding_spread(model: nn.Module, run: Callable[[nn.Module], Results], reruns: int,
                                  generator: torch.Generator) -> tuple[Results, dict[str, float]]:
    """``run(model)``'s results and, per result, the largest L2 distance of a rerun's from them.

    ``run`` must be deterministic (seed its own generators) and return fp32 tensors by name (losses,
    gradients). Each of the ``reruns`` reruns first nudges every parameter of ``model`` by one ulp
    (:func:`_nudge_by_one_ulp`, coins from ``generator``); the parameters are restored afterwards.
    """
    want = run(model)
    saved = [p.detach().clone() for p in model.parameters()]
    spread = dict.fromkeys(want, 0.0)
    try:
        for _ in range(reruns):
            _nudge_by_one_ulp(model, saved, generator)
            again = run(model)
            for name, value in want.items():
                spread[name] = max(spread[name], float((again[name].double() - value.double()).norm()))
    finally:
        with torch.no_grad():
            for param, value in zip(model.parameters(), saved):
                param.copy_(value)
    return want, spread


def assert_within_rounding(got: Results, want: Results, spread: dict[str, float],
                           factor: float = ROUNDING_FACTOR) -> None:
    """Every ``got[name]`` within ``factor`` times the rounding scale of ``want[name]`` (L2 norm).

    The scale is ``max(spread[name], UNIT_ROUNDOFF * |want[name]|)``: a measured size of an fp32
    rounding error (the spread of :func:`reference_and_rounding_spread`, or an fp32 run's distance
    from a float64 ``want``), at least the rounding of the result itself.
    """
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name, value in want.items():
        reference = value.double()
        scale = max(spread[name], UNIT_ROUNDOFF * float(reference.norm()))
        distance = float((got[name].double() - reference).norm())
        assert distance <= factor * scale, (
            f"{name}: |got - reference| = {distance:.3g} is over {factor:g} x the fp32 rounding scale {scale:.3g} "
            f"(|reference| = {float(reference.norm()):.3g})")
