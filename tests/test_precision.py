"""pacofr.ops.precision and the ``precision`` argument of nearest_token / soft_assign.

* :func:`round_to_tf32` against an independent float64 rounding (ties away from zero), with
  non-finite values passed through.
* The torch backends rank by the *rounded* operands: on clustered codes whose exact ranking and
  rounded ranking disagree, the result follows a float64 oracle of the rounded operands (and the
  same check fails for the exact ``ieee`` ranking, so the test can tell the two apart).
* The triton backend under the interpreter: ``bf16`` ranks by the rounded operands as the torch
  reference does (both multiply exact bf16 values), and both weight with fp32 cosines; TF32
  rounding happens only in GPU tensor cores, so the interpreter is held to the documented
  tolerance in tests/test_nearest_token.py instead.
* The CUDA backend's missing fp32 + ``bf16`` path is a clear ValueError; the model passes its
  ``codebook_precision`` to both ops, and its nearest-prototype labels are exact under bf16 autocast.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tolerances import U32, cosine_error

from pacofr.ops import nearest_token
from pacofr.ops.precision import (
    PRECISIONS,
    check_precision,
    cuda_input_precision,
    kernel_precision,
    round_operands,
    round_to_tf32,
)
from pacofr.ops.soft_assign import NORM_EPS, soft_assign

def tf32_oracle(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to 10 mantissa bits, half away from zero, computed in float64."""
    x = values.astype(np.float64)
    mantissa, exponent = np.frexp(np.abs(x))  # |x| = mantissa * 2^exponent, mantissa in [0.5, 1)
    scaled = mantissa * 2.0**11  # 11 significant bits: the implicit one and 10 stored
    rounded = np.floor(scaled + 0.5) * 2.0 ** (exponent - 11)
    return (np.sign(x) * rounded).astype(np.float32)


# --------------------------------------------------------------------------------------------
# rounding
# --------------------------------------------------------------------------------------------
def test_round_to_tf32_matches_float64_rounding(generator: torch.Generator) -> None:
    x = torch.cat([torch.randn(4096, generator=generator) * 10.0 ** torch.randint(-20, 20, (4096,), generator=generator),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0**-126, 3.0e38])])
    got = round_to_tf32(x)
    want = torch.from_numpy(tf32_oracle(x.numpy()))
    assert torch.equal(got, want)
    assert (got.view(torch.int32) & ((1 << 13) - 1) == 0).all(), "low 13 mantissa bits must be cleared"


def test_round_to_tf32_ties_away_from_zero() -> None:
    base = torch.tensor([1.0, 1.5, 3.0, 1.25 * 2.0**-10], dtype=torch.float32)  # TF32-exact
    bits = base.view(torch.int32)
    half_way = (bits | (1 << 12)).view(torch.float32)  # exactly half a TF32 ulp above
    below_half = (bits | ((1 << 12) - 1)).view(torch.float32)
    ulp_up = (bits + (1 << 13)).view(torch.float32)
    assert torch.equal(round_to_tf32(half_way), ulp_up)
    assert torch.equal(round_to_tf32(-half_way), -ulp_up)
    assert torch.equal(round_to_tf32(below_half), base)


def test_round_to_tf32_passes_non_finite_and_keeps_shape() -> None:
    x = torch.tensor([[math.inf, -math.inf], [math.nan, 1.0 + 2.0**-11]])
    got = round_to_tf32(x)
    assert got.shape == x.shape
    assert got[0, 0] == math.inf and got[0, 1] == -math.inf and math.isnan(got[1, 0])
    assert got[1, 1] == 1.0 + 2.0**-10  # the half-way value rounds up
    strided = torch.randn(8, 6)[:, ::2]
    assert torch.equal(round_to_tf32(strided), round_to_tf32(strided.contiguous()))


def test_round_operands_only_changes_fp32_reduced_settings() -> None:
    x = torch.randn(64)
    assert round_operands(x, "ieee") is x and round_operands(x, "tf32x3") is x
    assert torch.equal(round_operands(x, "bf16"), x.bfloat16().float())
    assert torch.equal(round_operands(x, "tf32"), round_to_tf32(x))
    half = x.half()
    assert round_operands(half, "bf16") is half


def test_kernel_precision_table() -> None:
    assert kernel_precision("ieee", torch.float32) == ("ieee", False)
    assert kernel_precision("tf32", torch.float32) == ("tf32", False)
    assert kernel_precision("tf32x3", torch.float32) == ("tf32x3", False)
    assert kernel_precision("bf16", torch.float32) == ("ieee", True)
    for precision in PRECISIONS:
        assert kernel_precision(precision, torch.bfloat16) == ("ieee", False)
        assert kernel_precision(precision, torch.float16) == ("ieee", False)


def test_precision_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp8")
    with pytest.raises(ValueError, match="cuda backend has no precision='bf16'"):
        cuda_input_precision("nearest_token", "bf16", torch.float32)
    assert cuda_input_precision("nearest_token", "bf16", torch.bfloat16) == "ieee"
    q, cb = torch.randn(4, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="precision must be one of"):
        soft_assign(q, cb, 2, 0.1, precision="half", backend="torch")


# --------------------------------------------------------------------------------------------
# the torch reference follows the rounded operands
# --------------------------------------------------------------------------------------------
def clustered(generator: torch.Generator, n: int = 256, codes: int = 64, dim: int = 32,
              spread: float = 2e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries near a cluster of codes that differ by ``spread``: rounding decides the ranking."""
    centre = torch.randn(dim, generator=generator)
    codebook = centre + spread * torch.randn(codes, dim, generator=generator)
    x = centre + spread * torch.randn(n, dim, generator=generator)
    return x, codebook


def rounded_l2_scores64(x: torch.Tensor, codebook: torch.Tensor, precision: str) -> torch.Tensor:
    """The op's l2 ranking score in float64: 0.5 ||e||^2 (given values) - round(x) . round(e)."""
    xr, er = round_operands(x, precision).double(), round_operands(codebook, precision).double()
    return 0.5 * codebook.double().square().sum(1) - xr @ er.T


def rounded_cosine_scores64(q: torch.Tensor, codebook: torch.Tensor, precision: str) -> torch.Tensor:
    """soft_assign's cosine ranking score in float64: round(q) . round(e) / max(||e||, eps)."""
    qr, er = round_operands(q, precision).double(), round_operands(codebook, precision).double()
    return (qr @ er.T) / codebook.double().norm(dim=1).clamp_min(NORM_EPS)


def follows(scores: torch.Tensor, picked: torch.Tensor, tol: torch.Tensor, best_first: str) -> torch.Tensor:
    """Per row: is every picked code within ``tol`` of the oracle's optimum at its rank?"""
    ranked = torch.sort(scores, dim=1, descending=best_first == "max").values[:, :picked.shape[1]]
    return ((scores.gather(1, picked.long()) - ranked).abs() <= tol[:, None]).all(dim=1)


def l2_score_error(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Per row, a worst-case bound on the fp32 error of one l2 ranking score 0.5 ||e||^2 - x . e.

    A dot of D terms summed in any order is off by at most D u sum |x_i e_i| <= D u ||x|| ||e|| (Cauchy-Schwarz);
    0.5 ||e||^2 by (D + 1) u 0.5 ||e||^2; the subtraction adds one rounding: (D + 2) u (||x|| ||e|| + 0.5 ||e||^2).
    """
    dim = x.shape[1]
    e_norm = codebook.double().norm(dim=1).max()
    return (dim + 2) * U32 * (x.double().norm(dim=1) * e_norm + 0.5 * e_norm**2)


def cosine_score_error(q: torch.Tensor) -> torch.Tensor:
    """Per row, a worst-case bound on the fp32 error of one cosine score q . e / ||e||: the dot as in
    :func:`l2_score_error` (D u, with |q . e / ||e||| <= ||q||), ||e|| from an fp32 sum of D squares (D / 2 u
    relative after the square root) and the root, reciprocal and product (4 u): (1.5 D + 4) u ||q||."""
    return (1.5 * q.shape[1] + 4) * U32 * q.double().norm(dim=1)


def weight_error(dim: int, m: int, tau: float) -> float:
    """Bound on the fp32 error of a softmax weight over m cosines of unit vectors at temperature tau: each
    cosine is off by cosine_error(dim), so each exp by that over tau and the normaliser by as much again, plus
    m u for the normaliser's sum and two roundings (exp, division)."""
    return 2 * cosine_error(dim) / tau + (m + 2) * U32


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_torch_nearest_token_ranks_by_rounded_operands(precision: str, generator: torch.Generator) -> None:
    x, codebook = clustered(generator)
    scores = rounded_l2_scores64(x, codebook, precision)
    tol = 2 * l2_score_error(x, codebook)  # a pick and the optimum, each scored with that error
    _, idx = nearest_token(x, codebook, 3, precision=precision, backend="torch")
    assert follows(scores, idx, tol, "min").all()
    _, exact_idx = nearest_token(x, codebook, 3, precision="ieee", backend="torch")
    assert not follows(scores, exact_idx, tol, "min").all(), "the clustered case must separate the settings"


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_torch_soft_assign_ranks_by_rounded_operands(precision: str, generator: torch.Generator) -> None:
    q, codebook = clustered(generator)
    scores = rounded_cosine_scores64(q, codebook, precision)
    tol = 2 * cosine_score_error(q)
    got = soft_assign(q, codebook, 4, 0.1, precision=precision, backend="torch")
    assert follows(scores, got.indices, tol, "max").all()
    exact = soft_assign(q, codebook, 4, 0.1, precision="ieee", backend="torch")
    assert not follows(scores, exact.indices, tol, "max").all(), "the clustered case must separate the settings"


# --------------------------------------------------------------------------------------------
# triton (interpreter) at bf16 follows the rounded ranking; the weights are fp32 cosines
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_triton_bf16_nearest_token_follows_rounded_ranking(metric: str, generator: torch.Generator) -> None:
    x, codebook = clustered(generator, n=70, codes=40, dim=24)
    _, i_ref = nearest_token(x, codebook, 2, metric, precision="bf16", backend="torch")
    _, i_tri = nearest_token(x, codebook, 2, metric, precision="bf16", backend="triton")
    scores = (rounded_l2_scores64(x, codebook, "bf16") if metric == "l2"
              else -rounded_cosine_scores64(x, codebook, "bf16"))
    score_error = l2_score_error(x, codebook) if metric == "l2" else cosine_score_error(x)
    assert follows(scores, i_tri, 2 * score_error, "min").all()
    assert follows(scores, i_ref, 2 * score_error, "min").all()
    # The distances are not compared here: between points 2e-3 apart around a centre of norm ~5, ||x||^2 + 2 score
    # (and 1 + score / ||x||) cancel to values below their own fp32 error bound, so any bound would pass anything.
    # tests/test_nearest_token.py compares bf16 distances with a float64 oracle on well-conditioned inputs.


def test_triton_bf16_soft_assign_follows_rounded_ranking(generator: torch.Generator) -> None:
    q, codebook = clustered(generator, n=70, codes=40, dim=24)
    got = soft_assign(q, codebook, 4, 0.1, precision="bf16", backend="triton")
    scores = rounded_cosine_scores64(q, codebook, "bf16")
    assert follows(scores, got.indices, 2 * cosine_score_error(q), "max").all()
    # The tokens are not compared here: the clustered codes are all within 2e-3 of one point, so any weighting of
    # them gives the same token to ~5e-7. tests/test_soft_assign.py compares tokens with a float64 oracle.


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_soft_assign_weights_are_fp32_cosines_of_the_chosen_codes(backend: str, generator: torch.Generator) -> None:
    """Whatever the ranking precision, the weights are the softmax of fp32 cosines of the chosen codes (the rounding
    only decides which codes). On well-conditioned random inputs the bf16 cosines are off by far more than the fp32
    bound, so the check tells the two apart."""
    q, codebook = torch.randn(64, 32, generator=generator), torch.randn(48, 32, generator=generator)
    got = soft_assign(q, codebook, 4, 0.1, precision="bf16", backend=backend)
    bound = weight_error(q.shape[1], 4, 0.1)

    def weights64(q_values: torch.Tensor, code_values: torch.Tensor) -> torch.Tensor:
        chosen = F.normalize(code_values.double(), dim=1)[got.indices]
        return torch.softmax((F.normalize(q_values.double(), dim=1)[:, None, :] * chosen).sum(-1) / 0.1, dim=1)

    assert ((got.weights.double() - weights64(q, codebook)).abs() <= bound).all()
    rounded = weights64(round_operands(q, "bf16"), round_operands(codebook, "bf16"))
    assert ((got.weights.double() - rounded).abs() > bound).any(), "bf16 cosines must be told apart from fp32 ones"


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def test_patch_codebook_passes_its_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    from pacofr.models import patch_codebook as belief
    from pacofr.models.config import ModelConfig

    seen: list[str] = []

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(kwargs["precision"])
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(belief, "soft_assign", spy(belief.soft_assign))
    monkeypatch.setattr(belief, "nearest_token", spy(belief.nearest_token))
    cfg = ModelConfig.preset("tiny", codebook_precision="bf16", backend="torch")
    book = belief.PatchCodebook(cfg)
    q = F.normalize(torch.randn(10, cfg.code_dim), dim=1)
    book.soft_token(q, book.codes())
    book.nearest_prototype(torch.randn(10, cfg.patch_dim))
    assert seen == ["bf16", "bf16"]


def test_patch_codebook_labels_ignore_autocast(generator: torch.Generator) -> None:
    # inside the model's bf16 autocast forward the torch backend's score GEMM must stay fp32, so the
    # nearest-prototype labels are the exact ones (bf16 scores flip near ties; they did before)
    from pacofr.models import patch_codebook as belief
    from pacofr.models.config import ModelConfig

    cfg = ModelConfig.preset("tiny", backend="torch", codebook_precision="ieee")
    book = belief.PatchCodebook(cfg)
    patches = torch.randn(8192, cfg.patch_dim, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels = book.nearest_prototype(patches)
    distance = torch.cdist(patches.double(), book.prototype_table().double()).square()
    best = distance.topk(2, dim=1, largest=False).values
    # gaps fp32 resolves (its rounding of a distance is ~1e-7 of it); bf16 scores flip ~0.4 % of these rows
    clear = (best[:, 1] - best[:, 0]) > 1e-5 * best[:, 0]
    assert clear.sum() > 8000
    assert torch.equal(labels[clear], distance.argmin(dim=1)[clear])


def test_torch_backends_ignore_autocast(generator: torch.Generator) -> None:
    """Autocast must not round the reference's products (the fused kernels ignore it too)."""
    x, codebook = clustered(generator)
    want_d, want_i = nearest_token(x, codebook, 3, backend="torch")
    want = soft_assign(x, codebook, 4, 0.1, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_d, got_i = nearest_token(x, codebook, 3, backend="torch")
        got = soft_assign(x, codebook, 4, 0.1, backend="torch")
    assert torch.equal(got_i, want_i) and torch.equal(got_d, want_d)
    assert torch.equal(got.indices, want.indices) and got.token.dtype == torch.float32
    torch.testing.assert_close(got.token, want.token, atol=0, rtol=0)
