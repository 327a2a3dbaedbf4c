"""Chunked softmax losses over the codes (pacofr.models.code_softmax) against dense float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tolerances import U32

from pacofr.models.code_softmax import code_cross_entropy, code_kl, mean_code_probs, row_chunks
from pacofr.ops.precision import round_operands

pytestmark = pytest.mark.usefixtures("one_thread")

TAU = 0.1
# (N, K, dc, budget): budgets that force ragged chunks, one row per chunk, and a single chunk
CASES = [(37, 11, 8, 40), (5, 64, 16, 1), (64, 7, 4, 1 << 22), (1, 1, 3, 5), (50, 33, 16, 33 * 3 + 1)]


def make(n: int, k: int, dc: int, generator: torch.Generator, clustered: bool = False):
    codes = F.normalize(torch.randn(k, dc, generator=generator), dim=1)
    if clustered:  # queries near codes: peaked softmaxes, near-ties between duplicated codes
        codes[k // 2:] = codes[: k - k // 2] + 1e-4 * torch.randn(k - k // 2, dc, generator=generator)
        owner = torch.randint(0, k, (n,), generator=generator)
        q = F.normalize(codes[owner] + 0.05 * torch.randn(n, dc, generator=generator), dim=1)
    else:
        q = F.normalize(torch.randn(n, dc, generator=generator), dim=1)
    labels = torch.randint(0, k, (n,), generator=generator)
    return q.requires_grad_(), codes.requires_grad_(), labels


def dense_grads(loss_fn, q, codes):
    q64, c64 = q.detach().double().requires_grad_(), codes.detach().double().requires_grad_()
    loss = loss_fn(q64, c64)
    loss.backward()
    return loss.detach(), q64.grad, c64.grad


def rounding_bound(n: int, k: int, dc: int) -> float:
    """Relative error bound (to the reference's largest element) of the fp32 chunked losses.

    First-order error model for unit-norm q and codes: a logit q.c / TAU is off by at most (dc + 1) u / TAU (dc
    products summed, one scaling); a probability exp(s - lse) carries that error twice (its own logit and the
    log-sum-exp's) plus K u from the sum over the codes; a gradient then sums K codes (grad q) or N rows (grad
    codes); a few more u for exp, log and the final scaling (8). So ``(2 (dc + 1) / TAU + K + N + 8) u``.
    Measured worst over 150 seeds of every case and loss: 43 u (mean_code_probs' gradients, whose random
    weights make them cancel), at least 4x below the bound in every case (179 u at N = 64, K = 7, dc = 4).
    """
    return (2 * (dc + 1) / TAU + k + n + 8) * U32


def assert_close(got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    assert got.dtype == torch.float32
    scale = want.abs().max().clamp_min(1e-6)
    assert (got.double() - want).abs().max() <= bound * scale, (got, want)


@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("n,k,dc,budget", CASES)
def test_cross_entropy_matches_dense(n, k, dc, budget, clustered, generator):
    q, codes, labels = make(n, k, dc, generator, clustered)
    loss, acc = code_cross_entropy(q, codes, labels, TAU, budget=budget)
    loss.backward()
    want, gq, gc = dense_grads(lambda a, b: F.cross_entropy(a @ b.T / TAU, labels), q, codes)
    bound = rounding_bound(n, k, dc)
    assert_close(loss.detach(), want, bound)
    assert_close(q.grad, gq, bound)
    assert_close(codes.grad, gc, bound)
    dense = q.detach() @ codes.detach().T
    assert acc.item() == pytest.approx((dense.argmax(1) == labels).float().mean().item())
    assert not acc.requires_grad


@pytest.mark.parametrize("n,k,dc,budget", CASES)
def test_mean_probs_matches_dense(n, k, dc, budget, generator):
    q, codes, _ = make(n, k, dc, generator)
    weights = torch.randn(k, generator=generator)  # a generic downstream gradient
    probs = mean_code_probs(q, codes, TAU, budget=budget)
    (probs * weights).sum().backward()
    want, gq, gc = dense_grads(lambda a, b: ((a @ b.T / TAU).softmax(1).mean(0) * weights.double()).sum(), q, codes)
    bound = rounding_bound(n, k, dc)
    assert_close(probs.detach(), (q.detach().double() @ codes.detach().double().T / TAU).softmax(1).mean(0), bound)
    assert_close((probs * weights).sum().detach(), want, bound)
    assert_close(q.grad, gq, bound)
    assert_close(codes.grad, gc, bound)


@pytest.mark.parametrize("n,k,dc,budget", CASES)
def test_kl_matches_dense_and_ignores_target_gradient(n, k, dc, budget, generator):
    q, codes, _ = make(n, k, dc, generator)
    target = F.normalize(torch.randn(n, dc, generator=generator), dim=1).requires_grad_()
    loss = code_kl(q, codes, target, TAU, budget=budget)
    loss.backward()
    t64 = target.detach().double()

    def dense(a, b):
        return F.kl_div((a @ b.T / TAU).log_softmax(1), (t64 @ b.detach().T / TAU).log_softmax(1),
                        reduction="batchmean", log_target=True)

    want, gq, gc = dense_grads(dense, q, codes)
    bound = rounding_bound(n, k, dc)
    assert_close(loss.detach(), want, bound)
    assert_close(q.grad, gq, bound)
    assert_close(codes.grad, gc, bound)
    assert target.grad is None


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precision_uses_rounded_operands(precision, generator):
    q, codes, labels = make(40, 24, 16, generator)
    loss, _ = code_cross_entropy(q, codes, labels, TAU, precision=precision, budget=100)
    qr, cr = round_operands(q.detach(), precision).double(), round_operands(codes.detach(), precision).double()
    assert_close(loss.detach(), F.cross_entropy(qr @ cr.T / TAU, labels), rounding_bound(40, 24, 16))
    exact, _ = code_cross_entropy(q, codes, labels, TAU)
    assert loss.item() != exact.item()  # the setting is applied, not ignored


def test_empty_batch_and_budget_bound(generator):
    q, codes, labels = make(0, 9, 4, generator)
    loss, acc = code_cross_entropy(q, codes, labels, TAU)
    assert loss.item() == 0.0 and acc.item() == 0.0
    assert mean_code_probs(q, codes, TAU).shape == (9,)
    chunks = list(row_chunks(10, 4, budget=9))
    assert [c.stop - c.start for c in chunks] == [2, 2, 2, 2, 2]
    assert list(row_chunks(3, 100, budget=7)) == [slice(0, 1), slice(1, 2), slice(2, 3)]


def test_bad_input_is_named(generator):
    q, codes, labels = make(6, 5, 4, generator)
    with pytest.raises(ValueError, match="precision"):
        code_cross_entropy(q, codes, labels, TAU, precision="fp8")
    with pytest.raises(ValueError, match="tau"):
        mean_code_probs(q, codes, 0.0)
    with pytest.raises(ValueError, match="labels"):
        code_cross_entropy(q, codes, labels.int(), TAU)
    with pytest.raises(ValueError, match="same dc"):
        mean_code_probs(q, codes[:, :3], TAU)
    with pytest.raises(ValueError, match="q_target"):
        code_kl(q, codes, q[:3], TAU)
