"""Fuzz suite: hypothesis throws random shapes, dtypes, strides, ties and non-finite values at every
public op on both CPU backends (torch; triton through its interpreter) and checks each answer
against the float64 oracles of tests/_oracles.py.

Hypothesis draws the structure of a case (sizes, dtypes, layouts, how values are made, where NaN /
inf / out-of-range values go) and a seed for the values themselves. Profiles:

* default: derandomized, a few examples per op and backend, so that CI always runs the same cases
  and the file stays around a minute on 2 CPU cores;
* ``PACOFR_FUZZ_EXAMPLES=N``: N random examples per op and backend (a longer local hunt; a failure
  prints the drawn case and hypothesis's reproducer).

Values stay inside each op's documented domain except where the op documents what happens past
it (nearest_token's finite range, NaN rows and codes). Not held to float64: cosine gradients of
rows with norm below 1e-3 (``1 / max(||v||, 1e-12)`` amplifies fp32 rounding without bound).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _oracles import (
    assert_close_rel,
    assert_matches_oracle,
    check_selection,
    oracle_given,
    oracle_loss,
    oracle_patches,
    oracle_scatter,
    oracle_targets,
    stats_oracle,
)
from _tolerances import U16, U32, U64, UBF16, gamma

from pacofr.ops import (
    codebook_stats,
    gather_patches,
    masked_patch_loss,
    nearest_token,
    patch_targets,
    scatter_tokens,
    soft_assign,
)
from pacofr.ops.nearest_token import MAX_SQUARED_NORM

pytestmark = pytest.mark.usefixtures("one_thread")

_EXAMPLES = int(os.environ.get("PACOFR_FUZZ_EXAMPLES", "0"))


def fuzz_test(ci_examples: int) -> Callable[[Callable], Callable]:
    """A fuzz test ``fn(backend, data)`` on every CPU backend: ``ci_examples`` derandomized examples
    (or ``PACOFR_FUZZ_EXAMPLES`` random ones); the interpreter's numpy warnings on NaN / inf muted."""
    def decorate(fn: Callable) -> Callable:
        fn = given(data=st.data())(fn)
        fn = settings(max_examples=_EXAMPLES or ci_examples, derandomize=not _EXAMPLES, deadline=None,
                      database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(fn)
        fn = pytest.mark.parametrize("backend", BACKENDS)(fn)
        return pytest.mark.filterwarnings("ignore::RuntimeWarning")(fn)

    return decorate


BACKENDS = ["torch", "triton"]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "column_step", "row_step"]
STORE_TOL = {torch.float32: (64 * U32, 64 * U32), torch.float16: (4 * U16, 4 * U16),
             torch.bfloat16: (4 * UBF16, 4 * UBF16)}
"""(rtol, atol) of a result computed in fp32 and stored in this dtype against float64 (values of order 1).

fp16 / bf16: the store rounds once (u relative); 4 u leaves room for the fp32 work before it and for intermediates
kept in the dtype. fp32: gamma(64), the longest fp32 reduction these cases draw (a patch of 4 x 4 x 4 values;
scores sum <= 24 products, tokens <= 16 weighted codes). Measured over 150 random examples per op and backend:
the worst result used 21 % of the bf16 bound (scatter_tokens), 12 % of the fp16 one and 1 % of the fp32 one
(gather_patches)."""


# ------------------------------------------------------------------------------------------
# drawing cases
# ------------------------------------------------------------------------------------------

def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of ``t`` in another memory layout (a view into a larger or permuted buffer)."""
    if t.dim() < 2 or layout == "contiguous":
        return t.clone(memory_format=torch.contiguous_format)
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "column_step":
        buffer = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        buffer[..., ::2] = t
        return buffer[..., ::2]
    buffer = t.new_zeros(2 * t.shape[0], *t.shape[1:])  # row_step
    buffer[::2] = t
    return buffer[::2]


def values(shape: tuple[int, ...], kind: str, generator: torch.Generator) -> torch.Tensor:
    """fp32 values: gaussian, small integers (exact ties everywhere) or wide (spanning 1e-3..1e3)."""
    if kind == "integers":
        return torch.randint(-2, 3, shape, generator=generator).float()
    x = torch.randn(shape, generator=generator)
    if kind == "wide":
        x = x * 10.0 ** torch.randint(-3, 4, shape, generator=generator).float()
    return x


def queries_and_codes(n: int, codes: int, dim: int, kind: str, data: st.DataObject,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 queries (n, dim) of ``kind`` ("clustered": 1e-3 around random codes, else :func:`values`)
    and codes (codes, dim), a drawn number of them duplicates of others."""
    codebook = values((codes, dim), "integers" if kind == "integers" else "gaussian", generator)
    if kind == "clustered":
        owners = torch.randint(codes, (n,), generator=generator)
        queries = codebook[owners] + 1e-3 * torch.randn(n, dim, generator=generator)
    else:
        queries = values((n, dim), kind, generator)
    for _ in range(data.draw(st.integers(0, 3), label="duplicate codes")):
        source, target = torch.randint(codes, (2,), generator=generator).tolist()
        codebook[target] = codebook[source]
    return queries, codebook


def spoil(t: torch.Tensor, rows: list[str], generator: torch.Generator) -> list[int]:
    """Put one NaN / inf / out-of-range entry or row into random rows of ``t`` (N, D) in place;
    return the spoiled rows."""
    spoiled = []
    for how in rows:
        if t.shape[0] == 0:
            break
        row = int(torch.randint(t.shape[0], (1,), generator=generator))
        col = int(torch.randint(t.shape[1], (1,), generator=generator))
        if how == "nan":
            t[row, col] = math.nan
        elif how == "inf":
            t[row, col] = -math.inf if col % 2 else math.inf
        else:  # "huge": squares overflow fp32
            t[row] = t[row].sign().where(t[row] != 0, torch.ones_like(t[row])) * 1e20
        spoiled.append(row)
    return spoiled


def _seed(data: st.DataObject) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


# ------------------------------------------------------------------------------------------
# nearest_token
# ------------------------------------------------------------------------------------------

@fuzz_test(120)
def test_nearest_token(backend: str, data: st.DataObject) -> None:
    generator = _seed(data)
    n, codes, dim = data.draw(st.integers(0, 40)), data.draw(st.integers(1, 70)), data.draw(st.integers(1, 24))
    k = data.draw(st.integers(1, min(codes, 16)), label="k")
    dtype, metric = data.draw(st.sampled_from(FLOATS)), data.draw(st.sampled_from(["l2", "cosine"]))
    kind = data.draw(st.sampled_from(["gaussian", "integers", "wide", "clustered"]))
    x, codebook = queries_and_codes(n, codes, dim, kind, data, generator)
    bad = st.lists(st.sampled_from(["nan", "inf", "huge"]), max_size=2)
    spoil(x, data.draw(bad, label="spoiled rows"), generator)
    spoil(codebook, data.draw(bad, label="spoiled codes"), generator)
    x, codebook = x.to(dtype), codebook.to(dtype)
    index_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]))
    leading = (2, n // 2) if data.draw(st.booleans(), label="3-d queries") and n % 2 == 0 else (n,)
    queries = laid_out(x.reshape(*leading, dim), data.draw(st.sampled_from(LAYOUTS)))
    codes_in = laid_out(codebook, data.draw(st.sampled_from(LAYOUTS)))

    dist, idx = nearest_token(queries, codes_in, k, metric, index_dtype=index_dtype, backend=backend)

    assert dist.shape == (*leading, k) and idx.shape == (*leading, k) and idx.dtype == index_dtype
    dist, idx = dist.reshape(n, k), idx.reshape(n, k).long()
    in_range = lambda t: t.double().square().sum(1) <= MAX_SQUARED_NORM  # noqa: E731 - fp64: no overflow
    good_rows, good_codes = in_range(x), torch.nonzero(in_range(codebook)).squeeze(1)
    assert torch.isnan(dist[~good_rows]).all() and (idx[~good_rows] == -1).all()
    found = min(k, len(good_codes))  # out-of-range codes only fill the slots nothing else can
    assert torch.isnan(dist[good_rows, found:]).all() and (idx[good_rows, found:] == -1).all()
    if found and good_rows.any():
        picked = idx[good_rows, :found]
        assert torch.isin(picked, good_codes).all(), "an out-of-range or NaN code was returned"
        positions = torch.searchsorted(good_codes, picked)
        assert_matches_oracle(x[good_rows], codebook[good_codes], found, metric, dist[good_rows, :found], positions)


# ------------------------------------------------------------------------------------------
# soft_assign (forward and backward)
# ------------------------------------------------------------------------------------------

@fuzz_test(40)
def test_soft_assign(backend: str, data: st.DataObject) -> None:
    generator = _seed(data)
    n, codes, dim = data.draw(st.integers(0, 40)), data.draw(st.integers(1, 60)), data.draw(st.integers(1, 24))
    dtype, metric = data.draw(st.sampled_from(FLOATS)), data.draw(st.sampled_from(["cosine", "l2"]))
    kind = data.draw(st.sampled_from(["gaussian", "integers", "clustered"]))
    q, codebook = queries_and_codes(n, codes, dim, kind, data, generator)
    nan_rows = spoil(q, ["nan"] * data.draw(st.integers(0, 2), label="NaN rows"), generator)
    nan_codes = set(spoil(codebook, ["nan"] * data.draw(st.integers(0, 1), label="NaN codes"), generator))
    m = data.draw(st.integers(1, max(1, min(16, codes - len(nan_codes)))), label="m")
    assume_enough = codes - len(nan_codes) >= m
    keep = torch.tensor([c for c in range(codes) if c not in nan_codes] if assume_enough else range(codes))
    tau = data.draw(st.sampled_from([0.05, 0.3, 1.0, "tensor"]))
    tau_value = torch.tensor(0.4) if tau == "tensor" else tau
    straight_through = data.draw(st.booleans(), label="straight_through")
    q, codebook = q.to(dtype), codebook.to(dtype)
    q_leaf = laid_out(q, data.draw(st.sampled_from(LAYOUTS))).requires_grad_()
    cb_leaf = laid_out(codebook, data.draw(st.sampled_from(LAYOUTS))).requires_grad_()
    tau_leaf = tau_value.clone().requires_grad_() if isinstance(tau_value, torch.Tensor) else tau_value

    token, idx, weights = soft_assign(q_leaf, cb_leaf, m, tau_leaf, metric=metric, straight_through=straight_through,
                                      deterministic=data.draw(st.booleans(), label="deterministic"), backend=backend)

    assert token.shape == (n, dim) and token.dtype == dtype and idx.shape == (n, m) and weights.shape == (n, m)
    if n == 0:
        return
    good = torch.ones(n, dtype=torch.bool)
    good[nan_rows] = False
    assert torch.isnan(weights[~good]).all() and torch.isnan(token[~good]).all()
    assert ((idx >= 0) & (idx < codes)).all()
    if assume_enough and good.any():
        assert not torch.isin(idx[good], torch.tensor(sorted(nan_codes), dtype=torch.int64)).any()
        shifted = torch.searchsorted(keep, idx[good])
        # the near-tie width of fp32 scores: a cosine of unit vectors is off by about gamma(dim + 4) <= 1.7e-6, an
        # l2 score of these values (|score| <~ 100) by a few U32 sqrt(dim) |score| <~ 1e-4. Measured: every returned
        # code's float64 score equal to the oracle's pick to 1e-11 of this width (150 random examples per backend)
        check_selection(shifted, q[good], codebook[keep], m, metric, atol=1e-5 if metric == "cosine" else 1e-4)
    # values and gradients: the float64 oracle at the returned indices (NaN rows included, equal_nan)
    q64 = q.double().requires_grad_()
    cb64 = codebook.double().requires_grad_()
    tau64 = torch.tensor(float(tau_value), dtype=torch.float64, requires_grad=True)
    want_token, want_weights = oracle_given(q64, cb64, idx, tau64, metric, straight_through)
    scale = max(1.0, codebook[keep].double().abs().nan_to_num().max().item())
    rtol, atol = STORE_TOL[dtype]
    # cosine scores lie in [-1, 1]; an l2 score's terms |q|^2 + 2 |q.c| + |c|^2 stay within 4 scale^2 dim for
    # entries up to scale (the queries are drawn like the codes)
    score_range = 2.0 if metric == "cosine" else 4 * scale**2 * dim
    # a weight moves by at most its logits' largest error (the softmax is 1-Lipschitz in the max norm); a logit
    # s / tau carries the fp32 score's rounding, taken as 16 U32 of the scores' range (a few U32 sqrt(dim), not
    # the worst case gamma(dim)); 1e-5 floors it. Measured: at most 1.5 % of it used (150 examples per backend)
    weight_atol = 1e-5 + 16 * U32 * score_range / float(tau_value)
    torch.testing.assert_close(weights[good].double(), want_weights[good].detach(), atol=weight_atol, rtol=0,
                               equal_nan=True)  # NaN where a NaN code had to be chosen
    # token = sum of m weights times codes (|c| <= scale): the store's rounding plus m weight errors times scale
    torch.testing.assert_close(token[good].double(), want_token[good].detach(), rtol=rtol,
                               atol=atol * scale + weight_atol * m * scale, equal_nan=True)
    g_token = torch.randn(n, dim, generator=generator)
    g_weights = torch.randn(n, m, generator=generator)
    inputs = [q_leaf, cb_leaf] + ([tau_leaf] if isinstance(tau_leaf, torch.Tensor) else [])
    grads = torch.autograd.grad((token.float() * g_token).sum() + (weights * g_weights).sum(), inputs)
    wants = torch.autograd.grad((want_token * g_token.double()).sum() + (want_weights * g_weights.double()).sum(),
                                [q64, cb64] + ([tau64] if isinstance(tau_leaf, torch.Tensor) else []))
    # gradients pass the softmax's Jacobian and sums over codes and rows in the input dtype: 8 store roundings'
    # room (was 20). Measured: at most 13 % of it used (bf16 grad tau; 150 random examples per backend)
    rel = 8 * rtol
    # cosine gradients carry 1 / max(||v||, 1e-12): near-zero rows amplify fp32 rounding without
    # bound (up to 1e12), so only rows of norm >= 1e-3 can be held to a float64 tolerance
    finite = good & ~torch.isin(idx, torch.tensor(sorted(nan_codes), dtype=torch.int64)).any(dim=1)
    sound_rows = finite & (q.double().norm(dim=1) >= 1e-3 if metric == "cosine" else True)
    sound_codes = codebook.double().norm(dim=1) >= 1e-3 if metric == "cosine" else slice(None)
    # weight errors reach the inputs' gradients through the softmax Jacobian (1 / tau) times upstream gradients
    # and code values (randn, each <~ 4, m <= 16 codes): 1e2 weight errors / tau
    assert_close_rel(grads[0][sound_rows], wants[0][sound_rows], rel, "grad q",
                     atol=weight_atol * 1e2 / float(tau_value))
    if finite.all():  # the gradient of a NaN row (or of a forced NaN code) reaches the rows it chose
        assert_close_rel(grads[1][sound_codes], wants[1][sound_codes], rel, "grad codebook",
                         atol=weight_atol * 1e2 / float(tau_value))
        if len(grads) == 3:
            # tau's gradient sums all n m logit terms (<= 640): gamma(640) ~ 3.8e-5 of their size, floored at 1e-4
            assert_close_rel(grads[2], wants[2], max(rel, 1e-4), "grad tau", atol=weight_atol * 1e2)


# ------------------------------------------------------------------------------------------
# codebook_stats
# ------------------------------------------------------------------------------------------

@fuzz_test(60)
def test_codebook_stats(backend: str, data: st.DataObject) -> None:
    generator = _seed(data)
    n, per_row, dim = data.draw(st.integers(0, 60)), data.draw(st.integers(0, 5)), data.draw(st.integers(1, 20))
    index_dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8]))
    num_codes = data.draw(st.integers(1, 127 if index_dtype in (torch.uint8, torch.int8) else 300))
    shape = (n,) if per_row == 0 else (n, per_row)
    indices = torch.randint(num_codes, shape, generator=generator).to(index_dtype)
    weights = None
    if data.draw(st.booleans(), label="weights"):
        weights = torch.rand(shape, generator=generator).to(data.draw(st.sampled_from([*FLOATS, torch.float64])))
    x = None
    if data.draw(st.booleans(), label="x"):
        x = values((n, dim), data.draw(st.sampled_from(["gaussian", "wide"])), generator)
        spoil(x, data.draw(st.lists(st.sampled_from(["nan", "inf"]), max_size=2)), generator)
        x = x.to(data.draw(st.sampled_from([*FLOATS, torch.float64])))
    views = {name: laid_out(t, data.draw(st.sampled_from(LAYOUTS), label=f"{name} layout"))
             for name, t in (("indices", indices), ("weights", weights), ("x", x)) if t is not None}

    counts, sums = codebook_stats(views["indices"], num_codes, weights=views.get("weights"), x=views.get("x"),
                                  deterministic=data.draw(st.booleans(), label="deterministic"), backend=backend)

    want_counts, want_sums = stats_oracle(indices, num_codes, weights, x)
    assert counts.dtype == torch.float32 and counts.shape == (num_codes,)
    if weights is None:  # integer counts below 2^24: exact in float32
        assert torch.equal(counts.double(), want_counts)
    else:  # summed in float64 (op and oracle, each within gamma(terms, U64)), then rounded to float32 once
        torch.testing.assert_close(counts.double(), want_counts, rtol=U32 + 2 * gamma(indices.numel() + 1, U64), atol=0)
    if x is None:
        assert sums is None
        return
    assert sums.dtype == torch.float32 and sums.shape == (num_codes, dim)
    # a code's sum of its t products w x, in any order: t - 1 additions and a product each, plus rounding w and x
    # to float32 (fp64 inputs) and the fp32 store: within gamma(t + 3) of sum |w| |x| per entry
    terms = torch.bincount(indices.reshape(-1).long(), minlength=num_codes).double()
    magnitude = stats_oracle(indices, num_codes, weights, x.abs())[1]  # float64 sum |w| |x|
    bound = (terms + 3) * U32 / (1 - (terms + 3) * U32)  # gamma(t + 3) per code
    finite = torch.isfinite(want_sums)
    error = (sums.double() - want_sums).abs()
    assert (error[finite] <= (bound[:, None] * magnitude)[finite]).all(), f"max error {error[finite].max():.3e}"
    # inf and NaN land exactly where the oracle has them
    torch.testing.assert_close(sums.double()[~finite], want_sums[~finite], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------
# masked patch ops
# ------------------------------------------------------------------------------------------

IMAGE_LAYOUTS = ["contiguous", "channels_last", "column_step", "row_step", "transposed"]


def image_case(data: st.DataObject, generator: torch.Generator, *, float_only: bool = False):
    """(images in a drawn layout, the same values contiguous, ids, patch size, mean, std, NaN drawn)."""
    batch, channels = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 4))
    p, rows, cols = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    dtypes = FLOATS if float_only else [torch.uint8, *FLOATS]
    dtype = data.draw(st.sampled_from(dtypes), label="image dtype")
    shape = (batch, channels, rows * p, cols * p)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    else:
        images = values(shape, data.draw(st.sampled_from(["gaussian", "integers", "wide"])), generator)
        if data.draw(st.booleans(), label="constant patch") and batch:
            images[0, :, :p, :p] = 0.25
        has_nan = data.draw(st.booleans(), label="NaN pixel") and batch
        if has_nan:
            images[-1, -1, -1, 0] = math.nan
        images = images.to(dtype)
    layout = data.draw(st.sampled_from(IMAGE_LAYOUTS), label="image layout")
    laid = images.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else laid_out(images, layout)
    length = rows * cols
    count = data.draw(st.integers(0, 2 * length), label="ids per image")
    ids = torch.randint(length, (batch, count), generator=generator)  # duplicates allowed
    ids = laid_out(ids.to(data.draw(st.sampled_from([torch.int32, torch.int64]))), data.draw(st.sampled_from(LAYOUTS)))
    mean = std = None
    if data.draw(st.booleans(), label="mean/std"):
        mean = (torch.rand(channels, generator=generator) - 0.5).tolist()
        std = (torch.rand(channels, generator=generator) + 0.5).tolist()
    return laid, images, ids, p, mean, std


def patch_tolerance(dtype: torch.dtype, reference: torch.Tensor, amplification: float = 1.0) -> dict[str, float]:
    """assert_close tolerances for a result in ``dtype`` (computed in fp32) against float64."""
    rtol, atol = STORE_TOL.get(dtype, STORE_TOL[torch.float32])
    magnitude = reference.abs().nan_to_num(posinf=0.0, neginf=0.0).amax().item() if reference.numel() else 1.0
    return {"rtol": rtol, "atol": atol * max(1.0, magnitude) * amplification}


@fuzz_test(100)
def test_gather_patches(backend: str, data: st.DataObject) -> None:
    generator = _seed(data)
    laid, images, ids, p, mean, std = image_case(data, generator)
    out_dtype = data.draw(st.sampled_from([None, *FLOATS]), label="out_dtype")
    differentiable = images.dtype.is_floating_point
    leaf = laid.detach().requires_grad_() if differentiable else laid
    out = gather_patches(leaf, ids, p, mean=mean, std=std, out_dtype=out_dtype, backend=backend)
    want = oracle_patches(images, ids, p, mean, std)
    expected = out_dtype or (torch.float32 if images.dtype == torch.uint8 else images.dtype)
    assert out.dtype == expected and out.shape == want.shape
    amplification = 1.0 / min(std) if std else 1.0  # dividing by std scales the pixels' rounding by 1 / std
    torch.testing.assert_close(out.double(), want, equal_nan=True, **patch_tolerance(expected, want, amplification))
    if differentiable and out.numel():
        grad_out = torch.randn(out.shape, generator=generator).to(out.dtype)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
        images64 = images.double().requires_grad_()
        (want_grad,) = torch.autograd.grad(oracle_patches(images64, ids, p, mean, std), images64, grad_out.double())
        assert grad.dtype == images.dtype and grad.shape == images.shape
        # a pixel's gradient sums the (1 / std-scaled) gradients of its copies, in the image dtype: 4 roundings'
        # room (measured: at most 7 % of this bound used, 150 examples per backend)
        torch.testing.assert_close(grad.double(), want_grad, **patch_tolerance(images.dtype, want_grad, 4 * amplification))


@fuzz_test(100)
def test_patch_targets_and_masked_patch_loss(backend: str, data: st.DataObject) -> None:
    generator = _seed(data)
    laid, images, ids, p, mean, std = image_case(data, generator)
    patch_dim = p * p * images.shape[1]
    norm_pix = data.draw(st.booleans(), label="norm_pix") and patch_dim >= 2
    eps = data.draw(st.sampled_from([1e-6, 1e-3, 0.5]), label="eps")
    kwargs = {"norm_pix": norm_pix, "eps": eps, "mean": mean, "std": std}
    targets = patch_targets(laid, ids, p, backend=backend, **kwargs)
    want = oracle_targets(images, ids, p, **kwargs)
    assert targets.dtype == torch.float32 and targets.shape == want.shape
    # norm_pix divides fp32 rounding of ~1e-7 * |pixel| by sqrt(var + eps)
    pixel_scale = oracle_patches(images, ids, p, mean, std).abs().nan_to_num().amax().item() if want.numel() else 1.0
    amplification = (max(1.0, pixel_scale) / math.sqrt(eps)) if norm_pix else (1.0 / min(std) if std else 1.0)
    # mean, variance, difference and division: 4 roundings, amplified as above (measured: at most 0.4 % used)
    torch.testing.assert_close(targets.double(), want, equal_nan=True,
                               **patch_tolerance(torch.float32, want, 4 * amplification))
    pred_dtype = data.draw(st.sampled_from(FLOATS), label="pred dtype")
    pred = laid_out(torch.randn(want.shape, generator=generator).to(pred_dtype), data.draw(st.sampled_from(LAYOUTS)))
    pred = pred.requires_grad_()
    loss = masked_patch_loss(pred, laid, ids, p, backend=backend, **kwargs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    if want.numel() == 0:
        assert loss.item() == 0.0
        return
    pred64 = pred.detach().double().requires_grad_()
    want_loss = oracle_loss(pred64, images, ids, p, **kwargs)
    loss_scale = max(1.0, abs(want_loss.item())) if math.isfinite(want_loss.item()) else 1.0
    # a mean of up to 3 * 32 * 64 squared errors in fp32: worst case gamma(6144) = 3.7e-4, but blocked sums err
    # like sqrt(n) U32; rtol 1e-4. Measured: at most 0.16 % of this bound used (150 examples per backend)
    torch.testing.assert_close(loss.double(), want_loss.detach(), equal_nan=True, rtol=1e-4,
                               atol=1e-5 * amplification * loss_scale)
    (grad,) = torch.autograd.grad(loss, pred)
    (want_grad,) = torch.autograd.grad(want_loss, pred64)
    assert grad.dtype == pred_dtype
    # 2 (pred - target) / count carries the targets' error (4 roundings, amplified) into pred's dtype
    # (measured: at most 7 % used)
    torch.testing.assert_close(grad.double(), want_grad, equal_nan=True,
                               **patch_tolerance(pred_dtype, want_grad, 4 * amplification))


@fuzz_test(80)
def test_scatter_tokens(backend: str, data: st.DataObject) -> None:
    generator = _seed(data)
    batch, length, dim = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 20)), data.draw(st.integers(1, 24))
    n_visible = data.draw(st.integers(0, length), label="n_visible")
    dtype = data.draw(st.sampled_from(FLOATS), label="token dtype")
    visible = values((batch, n_visible, dim), data.draw(st.sampled_from(["gaussian", "integers"])), generator)
    if data.draw(st.booleans(), label="NaN token") and visible.numel():
        visible.view(-1)[0] = math.nan
    visible = laid_out(visible.to(dtype), data.draw(st.sampled_from(LAYOUTS))).requires_grad_()
    if data.draw(st.booleans(), label="permutation"):
        ids = torch.argsort(torch.rand(batch, length, generator=generator), dim=1)
    else:
        ids = torch.randint(length, (batch, length), generator=generator)  # duplicates
    ids = laid_out(ids.to(data.draw(st.sampled_from([torch.int32, torch.int64]))), data.draw(st.sampled_from(LAYOUTS)))
    mask_shape = data.draw(st.sampled_from([(dim,), (1, dim), (1, 1, dim)]), label="mask token shape")
    mask_token = torch.randn(mask_shape, generator=generator).to(data.draw(st.sampled_from([*FLOATS, torch.float64])))
    mask_token.requires_grad_()
    pos = None
    if data.draw(st.booleans(), label="pos_embed"):
        pos_shape = data.draw(st.sampled_from([(length, dim), (1, length, dim)]))
        pos = torch.randn(pos_shape, generator=generator).to(data.draw(st.sampled_from([*FLOATS, torch.float64])))
        pos.requires_grad_()

    out = scatter_tokens(visible, ids, mask_token, pos_embed=pos, backend=backend)

    want = oracle_scatter(visible.detach(), ids, mask_token.detach(), None if pos is None else pos.detach())
    assert out.dtype == dtype and out.shape == (batch, length, dim)
    # a token plus its position: the operands' magnitudes add, up to twice the result's (measured: at most 21 %)
    torch.testing.assert_close(out.double(), want, equal_nan=True, **patch_tolerance(dtype, want, 2.0))
    if out.numel() == 0:
        return
    grad_out = torch.randn(out.shape, generator=generator).to(dtype)
    leaves = [visible, mask_token] + ([pos] if pos is not None else [])
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want_out = oracle_scatter(leaves64[0], ids, leaves64[1], leaves64[2] if pos is not None else None)
    wants = torch.autograd.grad(want_out, leaves64, grad_out.double(), allow_unused=True)
    for name, leaf, grad, want_grad in zip(("visible", "mask_token", "pos_embed"), leaves, grads, wants):
        want_grad = torch.zeros_like(leaf, dtype=torch.float64) if want_grad is None else want_grad
        grad = torch.zeros_like(leaf) if grad is None else grad
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        # every gradient flows through tensors of the token dtype (sums over B * L positions) and is
        # stored in the leaf's: the coarser of the two sets the tolerance (measured: at most 3 % used)
        coarser = max((dtype, leaf.dtype), key=lambda t: STORE_TOL.get(t, STORE_TOL[torch.float32])[0])
        tolerance = patch_tolerance(coarser, want_grad, 4.0 * batch * length)
        torch.testing.assert_close(grad.double(), want_grad, **tolerance, msg=lambda m, name=name: f"grad {name}: {m}")
