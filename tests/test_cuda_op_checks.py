"""The C++ entry points of pacofr._C validate their own arguments before any device work.

Each op is registered for CPU tensors too: the same validation runs and, when everything is valid,
the op raises "needs CUDA tensors". So these checks are exercised here without a GPU, calling
``torch.ops.pacofr_cuda`` directly (the Python ops validate first and never pass bad arguments).
"""

from __future__ import annotations

import pytest
import torch

from pacofr import _extension

pytestmark = pytest.mark.skipif(not _extension.status()[0], reason="pacofr._C is not built here")

NEEDS_CUDA = "needs CUDA tensors"
BIG = 2**31  # one past the 32-bit range; expanded views give such sizes without memory


def ops():
    return torch.ops.pacofr_cuda


# ------------------------------------------------------------------------------------------
# nearest_token
# ------------------------------------------------------------------------------------------

def nearest_args(n=4, codes=6, dim=8, k=2, dtype=torch.float32, index_dtype=torch.int64):
    return dict(x=torch.randn(n, dim).to(dtype), codebook=torch.randn(codes, dim).to(dtype),
                code_term=torch.rand(codes), cosine=False, input_precision="ieee",
                distances=torch.empty(n, k), indices=torch.empty(n, k, dtype=index_dtype))


def call_nearest(**changes):
    args = nearest_args()
    args.update(changes)
    ops().nearest_token(args["x"], args["codebook"], args["code_term"], args["cosine"], args["input_precision"],
                        args["distances"], args["indices"])


@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nearest_token_valid_cpu_arguments_reach_the_device_check(precision, dtype) -> None:
    args = nearest_args(dtype=dtype)
    with pytest.raises(RuntimeError, match=f"nearest_token: the cuda backend {NEEDS_CUDA}, got x on cpu"):
        ops().nearest_token(args["x"], args["codebook"], args["code_term"], True, precision, args["distances"],
                            args["indices"])


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(x=torch.randn(8)), ValueError, r"x must be 2-D \(N, D\)"),
    (dict(codebook=torch.randn(2, 3, 8)), ValueError, r"codebook must be 2-D \(K, D\)"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "x must be float32, float16 or bfloat16"),
    (dict(codebook=torch.randn(6, 8).half()), TypeError, "codebook has dtype Half but x has Float"),
    (dict(codebook=torch.randn(6, 9)), ValueError, "x has D=8 but codebook has D=9"),
    (dict(codebook=torch.randn(0, 8), code_term=torch.rand(0)), ValueError,
     r"codebook must have at least one row \(K >= 1\)"),
    (dict(code_term=torch.rand(7)), ValueError, r"code_term must have shape \[6\]"),
    (dict(code_term=torch.rand(6).double()), TypeError, "code_term must be Float"),
    (dict(input_precision="fast"), ValueError, "input_precision must be 'ieee', 'tf32' or 'tf32x3', got 'fast'"),
    (dict(distances=torch.empty(4, 17), indices=torch.empty(4, 17, dtype=torch.int64)), ValueError,
     r"k \(distances.size\(1\)\) must lie in \[1, min\(K, 16\)\] = \[1, 6\], got 17"),
    (dict(distances=torch.empty(4, 7), indices=torch.empty(4, 7, dtype=torch.int64)), ValueError,
     r"k \(distances.size\(1\)\) must lie in \[1, min\(K, 16\)\] = \[1, 6\], got 7"),
    (dict(distances=torch.empty(4, 0), indices=torch.empty(4, 0, dtype=torch.int64)), ValueError,
     r"k \(distances.size\(1\)\) must lie in .*, got 0"),
    (dict(distances=torch.empty(5, 2)), ValueError, r"distances must be \(N, k\) with N = 4"),
    (dict(distances=torch.empty(4, 2).half()), TypeError, "distances must be Float"),
    (dict(distances=torch.empty(2, 4).T), ValueError, "distances must be contiguous"),
    (dict(indices=torch.empty(4, 2, dtype=torch.int16)), TypeError, "indices must be int64 or int32"),
    (dict(indices=torch.empty(4, 3, dtype=torch.int64)), ValueError, r"indices must have shape \[4, 2\]"),
    (dict(indices=torch.empty(2, 4, dtype=torch.int32).T), ValueError, "indices must be contiguous"),
    (dict(codebook=torch.randn(1, 8).expand(BIG, 8), code_term=torch.rand(1).expand(BIG)), ValueError,
     r"K \(codebook rows\) = 2147483648 is outside the 32-bit range"),
    (dict(x=torch.randn(4, 1).expand(4, BIG), codebook=torch.randn(6, 1).expand(6, BIG)), ValueError,
     "D = 2147483648 is outside the 32-bit range"),
])
def test_nearest_token_bad_arguments_are_named(changes, error, pattern) -> None:
    with pytest.raises(error, match=f"nearest_token: {pattern}"):
        call_nearest(**changes)


# ------------------------------------------------------------------------------------------
# soft_assign and its backward
# ------------------------------------------------------------------------------------------

def assign_args(n=5, codes=20, dim=8, m=3):
    return dict(q=torch.randn(n, dim), codebook=torch.randn(codes, dim), code_stat=torch.rand(codes),
                tau=torch.tensor(0.1), m=m, cosine=True, hard=False, norm_eps=1e-12, input_precision="ieee")


def call_assign(**changes):
    a = assign_args()
    a.update(changes)
    ops().soft_assign(a["q"], a["codebook"], a["code_stat"], a["tau"], a["m"], a["cosine"], a["hard"],
                      a["norm_eps"], a["input_precision"])


def test_soft_assign_valid_cpu_arguments_reach_the_device_check() -> None:
    with pytest.raises(RuntimeError, match=f"soft_assign: the cuda backend {NEEDS_CUDA}, got q on cpu"):
        call_assign()


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(m=17), ValueError, r"m must lie in \[1, min\(16, K\)\] = \[1, 16\], got 17"),
    (dict(m=0), ValueError, r"m must lie in \[1, min\(16, K\)\] = \[1, 16\], got 0"),
    (dict(m=5, codebook=torch.randn(4, 8), code_stat=torch.rand(4)), ValueError,
     r"m must lie in \[1, min\(16, K\)\] = \[1, 4\], got 5"),
    (dict(tau=torch.tensor([0.1, 0.2])), ValueError, r"tau must be a one-element tensor, got shape \[2\]"),
    (dict(tau=torch.tensor(0.1, dtype=torch.float64)), TypeError, "tau must be Float"),
    (dict(code_stat=torch.rand(21)), ValueError, r"code_stat must have shape \[20\]"),
    (dict(code_stat=torch.rand(20).half()), TypeError, "code_stat must be Float"),
    (dict(norm_eps=0.0), ValueError, "norm_eps must be a positive finite number"),
    (dict(q=torch.randn(5, 7)), ValueError, "q has D=7 but codebook has D=8"),
    (dict(q=torch.randn(5, 8).bfloat16()), TypeError, "codebook has dtype Float but q has BFloat16"),
    (dict(input_precision="tf64"), ValueError, "input_precision must be"),
])
def test_soft_assign_bad_arguments_are_named(changes, error, pattern) -> None:
    with pytest.raises(error, match=f"soft_assign: {pattern}"):
        call_assign(**changes)


def backward_args(n=5, codes=20, dim=8, m=3):
    return dict(g_token=torch.randn(n, dim), g_weights=None, q=torch.randn(n, dim), codebook=torch.randn(codes, dim),
                code_stat=torch.rand(codes), tau=torch.tensor(0.1), indices=torch.randint(0, codes, (n, m)),
                weights=torch.rand(n, m), raw=torch.rand(n, m), q_norm=torch.rand(n), cosine=True,
                deterministic=True, norm_eps=1e-12)


def call_backward(**changes):
    a = backward_args()
    a.update(changes)
    ops().soft_assign_backward(*a.values())


def test_soft_assign_backward_valid_cpu_arguments_reach_the_device_check() -> None:
    with pytest.raises(RuntimeError, match=f"soft_assign_backward: the cuda backend {NEEDS_CUDA}"):
        call_backward(g_weights=torch.rand(5, 3))


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(indices=torch.randint(0, 20, (5, 17)), weights=torch.rand(5, 17), raw=torch.rand(5, 17)), ValueError,
     r"m \(indices.size\(1\)\) must lie in \[1, min\(16, K\)\], got 17"),
    (dict(indices=torch.randint(0, 20, (5, 3), dtype=torch.int32)), TypeError, "indices must be Long"),
    (dict(indices=torch.randint(0, 20, (4, 3))), ValueError, r"indices must be \(N, m\) with N = 5"),
    (dict(weights=torch.rand(5, 2)), ValueError, r"weights must have shape \[5, 3\]"),
    (dict(raw=torch.rand(5, 3).double()), TypeError, "raw must be Float"),
    (dict(g_weights=torch.rand(5, 4)), ValueError, r"g_weights must have shape \[5, 3\]"),
    (dict(g_token=torch.randn(5, 8).half()), TypeError, "g_token has dtype Half but q has Float"),
    (dict(g_token=torch.randn(6, 8)), ValueError, r"g_token must have shape \[5, 8\]"),
    (dict(q_norm=torch.rand(4)), ValueError, r"q_norm must have shape \[5\]"),
    (dict(tau=torch.rand(1, 1, 2)), ValueError, "tau must be a one-element tensor"),
])
def test_soft_assign_backward_bad_arguments_are_named(changes, error, pattern) -> None:
    with pytest.raises(error, match=f"soft_assign_backward: {pattern}"):
        call_backward(**changes)


# ------------------------------------------------------------------------------------------
# codebook_stats
# ------------------------------------------------------------------------------------------

def call_stats(indices=None, codes=10, weights=None, x=None, deterministic=True):
    indices = torch.randint(0, 10, (6, 2)) if indices is None else indices
    ops().codebook_stats(indices, codes, weights, x, deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_codebook_stats_valid_cpu_arguments_reach_the_device_check(deterministic) -> None:
    with pytest.raises(RuntimeError, match=f"codebook_stats: the cuda backend {NEEDS_CUDA}, got indices on cpu"):
        call_stats(weights=torch.rand(6, 2), x=torch.randn(6, 4).half(), deterministic=deterministic)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(indices=torch.randint(0, 10, (6,))), ValueError, r"indices must be 2-D \(N, m\)"),
    (dict(indices=torch.randint(0, 10, (6, 2), dtype=torch.int16)), TypeError, "indices must be int64 or int32"),
    (dict(codes=0), ValueError, "K must be >= 1, got 0"),
    (dict(codes=BIG), ValueError, "K = 2147483648 is outside the 32-bit range"),
    (dict(weights=torch.rand(6, 3)), ValueError, r"weights must have shape \[6, 2\]"),
    (dict(weights=torch.rand(6, 2).double()), TypeError, "weights must be Float"),
    (dict(x=torch.randn(5, 4)), ValueError, r"x must be \(N, D\) with N = 6 and D >= 1"),
    (dict(x=torch.randn(6, 0)), ValueError, r"x must be \(N, D\) with N = 6 and D >= 1, got shape \[6, 0\]"),
    (dict(x=torch.randn(6, 4).double()), TypeError, "x must be float32, float16 or bfloat16"),
])
def test_codebook_stats_bad_arguments_are_named(kwargs, error, pattern) -> None:
    with pytest.raises(error, match=f"codebook_stats: {pattern}"):
        call_stats(**kwargs)
