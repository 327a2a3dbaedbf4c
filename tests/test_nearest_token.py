"""pacofr.ops.nearest_token: every backend against a float64 oracle, ties, NaN, layouts, errors.

The oracle is the exact fp64 distance matrix of the *same* (possibly fp16/bf16) input values. A
returned index may differ from the oracle's only on near-ties: the j-th returned code must have
an fp64 distance within a tolerance of the j-th smallest fp64 distance, and the index must be
exactly the oracle's wherever the j-th distance is separated from its neighbours by more than the
tolerance (design notes, section 6, pitfall 2). Exact ties use integer-valued data, on which every
fp32 product is exact whatever the summation order, so "smallest index wins" is testable exactly.

That tolerance is the oracle's (tests/_oracles.py: REL_TOL (||x||^2 + max ||e||^2) for l2, COSINE_TOL for
cosine). Measured on the CPU backends (torch and triton's interpreter, fp32 and bf16 inputs, D = 8 to 768,
gaussian and clustered queries, 15 seeds), the reported distances were at most 0.046 of it from the exact
ones. Distances are checked against the oracle, not one backend against another.
"""

from __future__ import annotations

import pytest
import torch

from _oracles import assert_matches_oracle, nearest_token_sorted, recorded_sorts, row_tolerance, sorted_share
from _oracles import nearest_token_distances64 as oracle_distances
from pacofr.ops import BackendUnavailableError, _launch, nearest_token
from pacofr.ops.nearest_token import MAX_K, nearest_token_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_BACKENDS = ("torch", "triton")

# (backend, device): triton on CPU runs under TRITON_INTERPRET=1 (tests/conftest.py sets it).
BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("triton", "cpu", id="triton-interp"),
    pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
]

# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------

def make_inputs(kind: str, n: int, codes: int, dim: int, dtype: torch.dtype, generator: torch.Generator,
                sigma: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian queries, or queries clustered at codes (x = code + sigma * noise)."""
    codebook = torch.randn(codes, dim, generator=generator)
    if kind == "gaussian":
        x = torch.randn(n, dim, generator=generator)
    elif kind == "clustered":
        owners = torch.randint(0, codes, (n,), generator=generator)
        x = codebook[owners] + sigma * torch.randn(n, dim, generator=generator)
    else:
        raise ValueError(kind)
    return x.to(dtype), codebook.to(dtype)


def integer_inputs(n: int, codes: int, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                   low: int = -4, high: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integers: every product and sum is exact in fp32 (and representable in fp16/bf16)."""
    x = torch.randint(low, high, (n, dim), generator=generator).to(dtype)
    codebook = torch.randint(low, high, (codes, dim), generator=generator).to(dtype)
    return x, codebook


# ------------------------------------------------------------------------------------------
# accuracy against the oracle
# ------------------------------------------------------------------------------------------

SHAPES = [  # (N, K, D, k): ragged sizes, tiles split over rows, codes and D
    (7, 33, 8, 1),
    (33, 129, 48, 4),
    (1, 7, 96, 4),
    (129, 33, 8, 16),
    (7, 33, 768, 4),
]


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n,codes,dim,k", SHAPES)
def test_l2_gaussian_matches_oracle(backend: str, device_name: str, dtype: torch.dtype, n: int, codes: int,
                                    dim: int, k: int, generator: torch.Generator) -> None:
    x, codebook = make_inputs("gaussian", n, codes, dim, dtype, generator)
    x, codebook = x.to(device_name), codebook.to(device_name)
    dist, idx = nearest_token(x, codebook, k, backend=backend)
    checked = assert_matches_oracle(x, codebook, k, "l2", dist, idx)
    assert checked >= n * k // 2, "too few separated slots: the test would not catch wrong indices"


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("sigma", [1e-1, 1e-2, 1e-3])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_clustered_queries_match_oracle(backend: str, device_name: str, dtype: torch.dtype, sigma: float,
                                        metric: str, generator: torch.Generator) -> None:
    x, codebook = make_inputs("clustered", 65, 97, 40, dtype, generator, sigma=sigma)
    x, codebook = x.to(device_name), codebook.to(device_name)
    dist, idx = nearest_token(x, codebook, 4, metric, backend=backend)
    checked = assert_matches_oracle(x, codebook, 4, metric, dist, idx)
    assert checked >= 65 * 4 // 2


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n,codes,dim,k", [(33, 129, 48, 1), (7, 33, 768, 16)])
def test_cosine_gaussian_matches_oracle(backend: str, device_name: str, dtype: torch.dtype, n: int, codes: int,
                                        dim: int, k: int, generator: torch.Generator) -> None:
    x, codebook = make_inputs("gaussian", n, codes, dim, dtype, generator)
    # rows of very different norms: cosine must not depend on them
    x = x * torch.logspace(-2, 2, n, dtype=torch.float32)[:, None].to(dtype)
    x, codebook = x.to(device_name), codebook.to(device_name)
    dist, idx = nearest_token(x, codebook, k, "cosine", backend=backend)
    assert_matches_oracle(x, codebook, k, "cosine", dist, idx)


def test_reference_chunk_boundaries(generator: torch.Generator) -> None:
    """Tiny chunks: the running merge across row and code chunks gives the unchunked answer."""
    x, codebook = make_inputs("clustered", 50, 61, 12, torch.float32, generator, sigma=0.3)
    for metric in ("l2", "cosine"):
        chunked = nearest_token_reference(x, codebook, 5, metric, buffer_elements=21, codes_per_chunk=7)
        assert_matches_oracle(x, codebook, 5, metric, *chunked)
    # integer data: exact arithmetic, so chunking must not change a single bit (ties included)
    x, codebook = integer_inputs(50, 61, 12, generator, low=-1, high=2)
    for metric in ("l2", "cosine"):
        whole = nearest_token_reference(x, codebook, 5, metric)
        chunked = nearest_token_reference(x, codebook, 5, metric, buffer_elements=21, codes_per_chunk=7)
        assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[0], chunked[0])


# ------------------------------------------------------------------------------------------
# the sort-free torch backend against the sort-based oracle (tests/_oracles.py)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("codes", [1, 40, 128, 1000, 4096 + 33])
def test_torch_backend_equals_the_sort_oracle_on_exact_data(dtype: torch.dtype, metric: str, codes: int,
                                                            generator: torch.Generator) -> None:
    """Integer data make every score exact, so the fast path must return the oracle's bits: ties
    everywhere (duplicate codes, equidistant codes), NaN query rows and NaN codes, every k."""
    x, codebook = integer_inputs(61, codes, 12, generator, dtype, low=-2, high=3)
    codebook[codes // 2:codes // 2 + 3] = codebook[min(3, codes - 1)]  # duplicates across the block
    if codes > 8:
        codebook[5, 1] = float("nan")
    x[7] = codebook[min(3, codes - 1)]
    x[9, 4] = float("nan")
    every_k = range(1, min(codes, MAX_K) + 1)
    for k in every_k if codes <= 1000 else (1, 2, 7, 16):
        got = nearest_token(x, codebook, k, metric, backend="torch")
        want = nearest_token_sorted(x, codebook, k, metric)
        assert torch.equal(got[1], want[1]), f"k={k}: indices differ in rows {(got[1] != want[1]).any(1).nonzero()}"
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["gaussian", "clustered"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_backend_on_large_codebooks_matches_float64(dtype: torch.dtype, kind: str, metric: str,
                                                         generator: torch.Generator) -> None:
    """Codebooks wide enough for every path of the selection (runs, groups, the ragged tail)."""
    for n, codes, dim, ks in [(70, 4096 + 33, 16, (1, 5, 16)), (50, 1000, 40, (2, 8)), (40, 8192 + 64, 8, (1, 3))]:
        x, codebook = make_inputs(kind, n, codes, dim, dtype, generator, sigma=0.05)
        for k in ks:
            dist, idx = nearest_token(x, codebook, k, metric, backend="torch")
            assert_matches_oracle(x, codebook, k, metric, dist, idx)


@pytest.mark.parametrize("k", [1, 8])
def test_torch_backend_sorts_no_block(k: int, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous data: beyond the 2k-value merges of code blocks, only the rare rows with an exact
    tie among their best scores are sorted (the old backend sorted every score)."""
    x, codebook = make_inputs("gaussian", 300, 9000, 16, torch.float32, generator)
    with recorded_sorts(monkeypatch) as sorts:
        dist, idx = nearest_token(x, codebook, k, backend="torch")
    assert sorted_share(sorts, 2 * k, 300 * 9000) <= 0.02, f"sorted: {sorts}"
    assert_matches_oracle(x, codebook, k, "l2", dist, idx)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,precision", [("triton", "tf32"), ("triton", "tf32x3"), ("triton", "bf16"),
                                               ("cuda", "tf32"), ("cuda", "tf32x3")])
def test_reduced_precision_within_documented_tolerance(backend: str, precision: str,
                                                       generator: torch.Generator) -> None:
    x, codebook = make_inputs("gaussian", 257, 1031, 256, torch.float32, generator)
    x, codebook = x.cuda(), codebook.cuda()
    dist, idx = nearest_token(x, codebook, 4, precision=precision, backend=backend)
    assert_matches_oracle(x, codebook, 4, "l2", dist, idx, rel={"tf32": 1e-3, "tf32x3": 1e-5, "bf16": 8e-3}[precision])


# ------------------------------------------------------------------------------------------
# ties, NaN, zero norms
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_duplicate_codes_in_later_tiles_lose_to_the_smallest_index(
        backend: str, device_name: str, dtype: torch.dtype, metric: str, generator: torch.Generator) -> None:
    codes, dim = 200, 16
    x, codebook = integer_inputs(40, codes, dim, generator, dtype)
    # code 5 is repeated at 70, 131 and 199 (later tiles / chunks); code 64 at 65
    for copy in (70, 131, 199):
        codebook[copy] = codebook[5]
    codebook[65] = codebook[64]
    x[:20] = codebook[5]
    x[20:30] = codebook[64]
    x, codebook = x.to(device_name), codebook.to(device_name)
    dist, idx = nearest_token(x, codebook, 4, metric, backend=backend)
    idx = idx.cpu()
    expected_5 = torch.tensor([5, 70, 131, 199])
    assert torch.equal(idx[:20], expected_5.expand(20, 4))
    assert torch.equal(idx[20:30, :2], torch.tensor([64, 65]).expand(10, 2))
    assert (dist[:20] == dist[:20, :1]).all(), "exact duplicates must report equal distances"
    if metric == "l2":
        assert (dist[:20] == 0).all()
    assert_matches_oracle(x, codebook, 4, metric, dist, idx.to(device_name))
    _, idx1 = nearest_token(x, codebook, 1, metric, backend=backend)
    assert (idx1[:20].cpu() == 5).all() and (idx1[20:30].cpu() == 64).all()


def column_major_duplicates(trials: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """``(x, codebook, i, j)``: Gaussian (not integer: summation order matters) codebooks of random
    size, code ``j`` an exact copy of code ``i < j``, laid out column-major (a ``.t()`` view), and
    queries next to code ``i`` (noise 1e-3: the pair is nearest by a margin of about D)."""
    cases = []
    for _ in range(trials):
        codes = int(torch.randint(2, 150, (1,), generator=generator))
        dim = int(torch.randint(8, 100, (1,), generator=generator))
        codebook = torch.randn(codes, dim, generator=generator)
        i, j = sorted(torch.randperm(codes, generator=generator)[:2].tolist())
        codebook[j] = codebook[i]
        x = codebook[i] + 1e-3 * torch.randn(3, dim, generator=generator)
        cases.append((x, codebook.t().contiguous().t(), i, j))
    return cases


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_identical_codes_tie_to_the_smaller_index_in_a_column_major_codebook(
        backend: str, device_name: str, metric: str, generator: torch.Generator) -> None:
    """Issue 32 item 8: code norms summed along a strided dimension rounded differently for identical
    codes, so the larger index could win (before the fix, with the norms summed on the view: 3-5
    duplicate pairs in 25 got different norms, and the answers of 17-19 of the 25 cases differed
    from those for the contiguous copy, torch backend, three seeds).

    Now every answer for the column-major codebook equals the answer for its contiguous copy, and
    wherever the two copies score equally the smaller index comes first. The fused kernels compute
    every column of a tile by the same instructions, so there identical codes always score equally;
    the torch backend's CPU GEMM may round an edge column of its blocking differently (seen on 6 rows
    in 600), which no layout change of the codebook can fix: equal scores are asserted for triton.
    """
    for x, codebook, i, j in column_major_duplicates(25, generator):
        assert not codebook.is_contiguous()
        x, codebook = x.to(device_name), codebook.to(device_name)
        dist, idx = nearest_token(x, codebook, 2, metric, backend=backend)
        contiguous = nearest_token(x, codebook.contiguous(), 2, metric, backend=backend)
        assert torch.equal(dist, contiguous[0]) and torch.equal(idx, contiguous[1])
        tied = (dist[:, 0] == dist[:, 1]).cpu()
        assert torch.equal(idx.cpu()[tied], torch.tensor([i, j]).expand(int(tied.sum()), 2)), (i, j, codebook.shape)
        if backend != "torch":
            assert tied.all()


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("k", [1, 4, 16])
def test_equidistant_codes_come_out_in_index_order(backend: str, device_name: str, k: int,
                                                   generator: torch.Generator) -> None:
    """The origin is equidistant to signed permutations of one vector; every order must be by index."""
    base = torch.tensor([3.0, -1.0, 2.0, 0.0, 1.0, -2.0, 1.0, 4.0])
    perms = torch.stack([torch.randperm(8, generator=generator) for _ in range(150)])
    signs = torch.randint(0, 2, (150, 8), generator=generator) * 2 - 1
    codebook = (base[perms] * signs).to(device_name)
    x = torch.zeros(3, 8, device=device_name)
    dist, idx = nearest_token(x, codebook, k, backend=backend)
    assert torch.equal(idx.cpu(), torch.arange(k).expand(3, k))
    assert (dist == base.square().sum()).all()


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nan_rows_return_nan_and_minus_one(backend: str, device_name: str, metric: str,
                                           generator: torch.Generator) -> None:
    x, codebook = make_inputs("gaussian", 9, 40, 24, torch.float32, generator)
    x[3, 7] = float("nan")
    codebook[0, 2] = float("nan")  # a NaN code: never returned while other codes exist
    codebook[33, :] = float("nan")
    x, codebook = x.to(device_name), codebook.to(device_name)
    dist, idx = nearest_token(x, codebook, 3, metric, index_dtype=torch.int32, backend=backend)
    dist, idx = dist.cpu(), idx.cpu()
    assert torch.isnan(dist[3]).all() and (idx[3] == -1).all()
    finite_rows = [r for r in range(9) if r != 3]
    assert torch.isfinite(dist[finite_rows]).all()
    assert not torch.isin(idx[finite_rows], torch.tensor([0, 33], dtype=torch.int32)).any()
    clean = torch.ones(40, dtype=torch.bool)
    clean[[0, 33]] = False
    kept = torch.nonzero(clean).squeeze(1)
    # on the other rows: the right answer of the problem without the NaN codes
    positions = torch.searchsorted(kept, idx[finite_rows].long())
    assert torch.equal(kept[positions], idx[finite_rows].long())
    assert_matches_oracle(x[finite_rows].cpu(), codebook[clean].cpu(), 3, metric, dist[finite_rows],
                          positions)


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
def test_nan_codes_fill_the_list_only_when_nothing_else_is_left(backend: str, device_name: str) -> None:
    codebook = torch.tensor([[float("nan"), 0.0], [1.0, 0.0], [float("nan"), 1.0]], device=device_name)
    x = torch.tensor([[0.0, 0.0]], device=device_name)
    dist, idx = nearest_token(x, codebook, 3, backend=backend)
    assert idx.cpu().tolist() == [[1, -1, -1]]
    assert dist[0, 0].item() == 1.0 and torch.isnan(dist[0, 1:]).all()


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_k1_skips_nan_codes_in_every_lane_and_keeps_the_smallest_index(backend: str, device_name: str,
                                                                      metric: str) -> None:
    """k = 1 keeps a running minimum per column lane (codes j, j + BLOCK_K, ... for BLOCK_K of 32 or
    64): a lane whose first codes are NaN takes the first number after them, a later equal code
    never replaces it, and a codebook of NaN codes only gives NaN / -1. Codes are unit vectors, so
    the answer is known without computing: the query e_0 is nearest to the codes equal to e_0."""
    codes, dim = 200, 8
    codebook = torch.zeros(codes, dim)
    codebook[:, 1] = 1.0  # every code e_1: distance 2 (l2) / 1 (cosine) from the query
    nan_codes = [0, 32, 64, 96, 128]  # the first codes of lane 0 whatever the tile width
    codebook[nan_codes, 0] = float("nan")
    for nearest in (160, 192):  # lane 0 again, in later tiles: the first of them must win
        codebook[nearest] = torch.eye(dim)[0]
    x = torch.eye(dim)[:1].repeat(3, 1)
    dist, idx = nearest_token(x.to(device_name), codebook.to(device_name), 1, metric, backend=backend)
    assert (idx.cpu() == 160).all() and (dist.cpu() == 0.0).all()
    dist, idx = nearest_token(x.to(device_name), torch.full((70, dim), float("nan"), device=device_name), 1, metric,
                              backend=backend)
    assert (idx.cpu() == -1).all() and torch.isnan(dist.cpu()).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy overflowing on purpose
@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_inputs_past_the_finite_range_are_nan_rows_and_nan_codes(backend: str, device_name: str, metric: str,
                                                                generator: torch.Generator) -> None:
    """Issue 18: past ~1.8e19 squares overflowed silently (inf distances, wrong indices) and the
    backends disagreed at 1e30. Rows whose fp32 squared norm exceeds 2^124 are out of range: a query
    row returns NaN / -1, a code is treated as a NaN code; every other row keeps its exact answer."""
    x, codebook = make_inputs("gaussian", 12, 30, 8, torch.float32, generator)
    x, codebook = x * 1e17, codebook * 1e17  # in range: squared norms ~1e35 < 2^124 ~ 2.1e37
    bad_rows = [1, 4, 7, 10]
    x[1] *= 1e3  # 1e20: squares overflow
    x[4, 2] = 3e19
    x[7, 0] = float("inf")
    x[10] = 1e30
    bad_codes = [0, 9, 29]
    codebook[0] *= 1e3
    codebook[9, 5] = float("-inf")
    codebook[29] = 1e30
    good_rows = [r for r in range(12) if r not in bad_rows]
    good_codes = torch.tensor([c for c in range(30) if c not in bad_codes])
    x, codebook = x.to(device_name), codebook.to(device_name)
    dist, idx = nearest_token(x, codebook, 4, metric, backend=backend)
    dist, idx = dist.cpu(), idx.cpu()
    assert torch.isnan(dist[bad_rows]).all() and (idx[bad_rows] == -1).all()
    assert not torch.isin(idx[good_rows], torch.tensor(bad_codes)).any()
    positions = torch.searchsorted(good_codes, idx[good_rows])
    assert_matches_oracle(x[good_rows].cpu(), codebook.cpu()[good_codes], 4, metric, dist[good_rows], positions)
    # with k = K the out-of-range codes fill the last slots, reported as NaN / -1
    sixteen = codebook[torch.cat([torch.tensor(bad_codes[:2]), good_codes[:13], torch.tensor(bad_codes[2:])])]
    dist, idx = nearest_token(x[good_rows], sixteen, 16, metric, backend=backend)
    assert torch.isnan(dist[:, -3:].cpu()).all() and (idx[:, -3:].cpu() == -1).all()
    assert torch.isfinite(dist[:, :-3].cpu()).all() and ((idx[:, :-3] >= 2) & (idx[:, :-3] < 15)).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_out_of_range_answers_agree_on_both_cpu_backends(metric: str, generator: torch.Generator) -> None:
    x, codebook = make_inputs("gaussian", 9, 20, 6, torch.float32, generator)
    half_x, half_codes = x.clone(), codebook.clone()
    half_x[::2] *= 1e30
    half_codes[1::2] *= 1e30
    for queries, codes in [(half_x, half_codes), (x * 1e30, codebook * 1e30), (x * 1e30, codebook)]:
        for k in (1, 3):
            torch_result = nearest_token(queries, codes, k, metric, backend="torch")
            triton_result = nearest_token(queries, codes, k, metric, backend="triton")
            assert torch.equal(torch_result[1], triton_result[1])
            # NaN in the same places; elsewhere each backend's distance within the oracle's row tolerance of
            # the exact one (scaled by the in-range codes only: the 1e30 codes would make it vacuous)
            assert torch.equal(torch_result[0].isnan(), triton_result[0].isnan())
            rows = ~torch_result[0].isnan().any(dim=1)
            if rows.any():
                in_range = codes.square().sum(dim=1).isfinite()
                exact = oracle_distances(queries[rows], codes, metric).gather(1, torch_result[1][rows].long())
                tol = row_tolerance(queries[rows], codes[in_range], metric)[:, None]
                for dist, _ in (torch_result, triton_result):
                    assert ((dist[rows].double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
def test_cosine_zero_norm_rows_are_zero_vectors(backend: str, device_name: str, generator: torch.Generator) -> None:
    x, codebook = make_inputs("gaussian", 5, 20, 16, torch.float32, generator)
    x[2] = 0.0
    codebook[4] = 0.0
    x, codebook = x.to(device_name), codebook.to(device_name)
    dist, idx = nearest_token(x, codebook, 16, "cosine", backend=backend)
    dist, idx = dist.cpu(), idx.cpu()
    assert (dist[2] == 1.0).all() and torch.equal(idx[2], torch.arange(16))
    exact = oracle_distances(x.cpu(), codebook.cpu(), "cosine")
    assert (exact[:, 4] == 1.0).all()
    rows = [0, 1, 3, 4]
    assert_matches_oracle(x[rows], codebook, 16, "cosine", dist[rows].to(device_name), idx[rows].to(device_name))


# ------------------------------------------------------------------------------------------
# layouts, shapes, outputs
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_non_contiguous_and_expanded_inputs(backend: str, device_name: str, dtype: torch.dtype,
                                            generator: torch.Generator) -> None:
    big = torch.randn(3, 24, 11, generator=generator).to(dtype).to(device_name)
    x = big.permute(0, 2, 1)[:, 1:, 3:19]  # (3, 10, 16), no unit stride in the last dimension
    codebook = torch.randn(16, 50, generator=generator).to(dtype).to(device_name).T[5:45]  # (40, 16) transposed view
    assert not x.is_contiguous() and not codebook.is_contiguous()
    dist, idx = nearest_token(x, codebook, 4, backend=backend)
    assert dist.shape == (3, 10, 4)
    assert_matches_oracle(x, codebook, 4, "l2", dist, idx)
    # the contiguous copies against the oracle too (the two answers then agree within twice its tolerance)
    dense_dist, dense_idx = nearest_token(x.contiguous(), codebook.contiguous(), 4, backend=backend)
    assert_matches_oracle(x.contiguous(), codebook.contiguous(), 4, "l2", dense_dist, dense_idx)

    one_query = x[0, 0].expand(6, 16)  # stride 0 rows
    dist, idx = nearest_token(one_query, codebook, 4, backend=backend)
    assert_matches_oracle(one_query, codebook, 4, "l2", dist, idx)  # every row, so the rows agree within 2 tol

    # every code equal (stride-0 codebook): ties everywhere. Integer values keep every product
    # exact, so the tie is exact whatever the matmul's summation order per column.
    x_int = torch.randint(-3, 4, (3, 24, 11), generator=generator).to(dtype).to(device_name)
    x_int = x_int.permute(0, 2, 1)[:, 1:, 3:19]
    same_code = torch.randint(-3, 4, (16,), generator=generator).to(dtype).to(device_name).expand(30, 16)
    dist, idx = nearest_token(x_int, same_code, 4, backend=backend)
    assert torch.equal(idx.cpu(), torch.arange(4).expand(3, 10, 4))


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_empty_queries(backend: str, device_name: str, index_dtype: torch.dtype) -> None:
    codebook = torch.randn(10, 8, device=device_name)
    for shape in [(0, 8), (2, 0, 8)]:
        x = torch.randn(shape, device=device_name)
        dist, idx = nearest_token(x, codebook, 3, index_dtype=index_dtype, backend=backend)
        assert dist.shape == (*shape[:-1], 3) and idx.shape == dist.shape
        assert dist.dtype == torch.float32 and idx.dtype == index_dtype
        assert dist.device == x.device


@pytest.mark.parametrize("backend,device_name", BACKEND_DEVICES)
@pytest.mark.parametrize("poison_index", [-7, 0])
def test_poisoned_outputs_are_fully_overwritten(backend: str, device_name: str, poison_index: int,
                                                monkeypatch: pytest.MonkeyPatch, generator: torch.Generator) -> None:
    """Outputs pre-filled with NaN and a fake index: anything left unwritten shows up."""
    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan") if dtype.is_floating_point else poison_index, dtype=dtype, device=device)

    monkeypatch.setattr(_launch, "new_output", poisoned)
    x, codebook = make_inputs("gaussian", 70, 45, 20, torch.float32, generator)
    x, codebook = x.to(device_name), codebook.to(device_name)
    for k, index_dtype in [(1, torch.int64), (5, torch.int32)]:
        dist, idx = nearest_token(x, codebook, k, index_dtype=index_dtype, backend=backend)
        assert_matches_oracle(x, codebook, k, "l2", dist, idx, index_dtype=index_dtype)  # finite, right values


# ------------------------------------------------------------------------------------------
# an independent oracle: faiss-cpu exact search
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_agrees_with_faiss_exact_search(backend: str, metric: str, generator: torch.Generator) -> None:
    faiss = pytest.importorskip("faiss")
    x, codebook = make_inputs("clustered", 150, 300, 32, torch.float32, generator, sigma=0.5)
    k = 8
    dist, idx = nearest_token(x, codebook, k, metric, backend=backend)
    xs, es = x.numpy(), codebook.numpy()
    if metric == "l2":
        index = faiss.IndexFlatL2(32)
        index.add(es)
        faiss_dist, faiss_idx = index.search(xs, k)
        faiss_dist = torch.from_numpy(faiss_dist).double()
    else:
        xs = torch.nn.functional.normalize(x, dim=1).numpy()
        index = faiss.IndexFlatIP(32)
        index.add(torch.nn.functional.normalize(codebook, dim=1).numpy())
        sims, faiss_idx = index.search(xs, k)
        faiss_dist = 1.0 - torch.from_numpy(sims).double()
    faiss_idx = torch.from_numpy(faiss_idx).long()
    tol = row_tolerance(x, codebook, metric)[:, None]
    assert ((dist.double() - faiss_dist).abs() <= tol).all()
    gaps = torch.minimum(faiss_dist.diff(dim=1, prepend=faiss_dist[:, :1] - 1e9),
                         faiss_dist.diff(dim=1, append=faiss_dist[:, -1:] + 1e9))
    separated = gaps > 2 * tol
    assert separated[:, :-1].float().mean() > 0.5
    # faiss's k-th gap to the (k+1)-th is unknown: exclude the last slot from exact checks
    separated[:, -1] = False
    assert torch.equal(idx[separated], faiss_idx[separated])


# ------------------------------------------------------------------------------------------
# argument errors and dispatch
# ------------------------------------------------------------------------------------------

def test_errors_name_the_argument() -> None:
    x, codebook = torch.randn(4, 8), torch.randn(10, 8)
    cases = [
        (lambda: nearest_token(x.numpy(), codebook), TypeError, "x must be a torch.Tensor"),
        (lambda: nearest_token(x, codebook[0]), ValueError, "codebook must have 2 dimensions"),
        (lambda: nearest_token(torch.tensor(1.0), codebook), ValueError, "x must have at least 1 dimension"),
        (lambda: nearest_token(x.double(), codebook.double()), TypeError, "x must have dtype"),
        (lambda: nearest_token(x.long(), codebook), TypeError, "x must have dtype"),
        (lambda: nearest_token(x, codebook.half()), TypeError, "codebook has dtype"),
        (lambda: nearest_token(x, torch.randn(10, 9)), ValueError, "x has last dimension D=8 but codebook has D=9"),
        (lambda: nearest_token(torch.randn(4, 0), torch.randn(10, 0)), ValueError, "codebook must have D >= 1"),
        (lambda: nearest_token(x, torch.randn(0, 8)), ValueError, r"codebook must have at least one row \(K >= 1\)"),
        (lambda: nearest_token(x, codebook, 0), ValueError, "k must be >= 1"),
        (lambda: nearest_token(x, codebook, 11), ValueError, "k must be <= 10"),
        (lambda: nearest_token(x, torch.randn(40, 8), 17), ValueError, "k must be <= 16"),
        (lambda: nearest_token(x, codebook, 2.0), TypeError, "k must be an int"),
        (lambda: nearest_token(x, codebook, metric="l1"), ValueError, "metric must be one of"),
        (lambda: nearest_token(x, codebook, index_dtype=torch.int16), TypeError, "index_dtype must be"),
        (lambda: nearest_token(x, codebook, precision="fp8"), ValueError, "precision must be one of"),
        (lambda: nearest_token(x, codebook, backend="cuDNN"), ValueError, "backend must be one of"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_mixed_devices_are_rejected() -> None:
    x, codebook = torch.randn(4, 8), torch.randn(10, 8, device="meta")
    with pytest.raises(ValueError, match="codebook is on meta but x is on cpu"):
        nearest_token(x, codebook)


def test_auto_uses_the_reference_on_cpu_and_cuda_backend_needs_cuda_tensors(generator: torch.Generator) -> None:
    x, codebook = make_inputs("gaussian", 6, 12, 8, torch.float32, generator)
    auto = nearest_token(x, codebook, 2)
    ref = nearest_token_reference(x, codebook, 2)
    assert torch.equal(auto[1], ref[1]) and torch.equal(auto[0], ref[0])
    with pytest.raises(BackendUnavailableError, match="cuda"):
        nearest_token(x, codebook, 2, backend="cuda")
