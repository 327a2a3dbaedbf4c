"""The CUDA backend (pacofr._C) where a GPU would catch what the CPU cannot: tensor-core ranking
over many code tiles and D chunks, the precision modes, the fixed-order segment reductions under
skew, out-of-range indices, poisoned outputs, a non-default stream, a second device, launch limits.

Every test needs a CUDA device (marked ``gpu``: skipped without one); the oracles are the float64
ones of tests/test_nearest_token.py and tests/test_soft_assign.py.
"""

from __future__ import annotations

import pytest
import torch

from pacofr import _extension
from pacofr.ops import gather_patches, masked_patch_loss, nearest_token, scatter_tokens, soft_assign
from pacofr.ops.nearest_token import code_terms
from test_nearest_token import assert_matches_oracle, integer_inputs
from test_nearest_token import make_inputs as nearest_inputs
from test_soft_assign import assert_close_rel, check_selection, oracle_given, stats_oracle
from test_soft_assign import make_inputs as assign_inputs

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PRECISION_TOLERANCE = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2e-3}
"""Score error relative to ||x||^2 + max ||e||^2 (the nearest_token tests' scale) per fp32 precision."""


@pytest.fixture(autouse=True)
def _needs_extension() -> None:
    ok, why = _extension.status()
    if not ok:
        pytest.skip(why)


def ops():
    return torch.ops.pacofr_cuda


# ------------------------------------------------------------------------------------------
# nearest_token
# ------------------------------------------------------------------------------------------

# (N, K, D): K far above a block's 256 threads and its 128-code tile; D over many 64-byte chunks
# (D = 1000 fp32 is 4000 bytes: the query tile no longer fits, the streaming layout runs); ragged D
# (33: padded to 16-byte rows); one row; N across several 128-row blocks.
NEAREST_SHAPES = [(1, 5000, 64), (300, 5000, 256), (129, 4099, 1000), (257, 33, 33), (64, 130, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n,codes,dim", NEAREST_SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_token_matches_the_oracle(dtype, n, codes, dim, k, metric, generator) -> None:
    x, codebook = nearest_inputs("clustered", n, codes, dim, dtype, generator)
    distances, indices = nearest_token(x.cuda(), codebook.cuda(), k, metric, backend="cuda")
    assert_matches_oracle(x, codebook, k, metric, distances.cpu(), indices.cpu())


@pytest.fixture()
def hopper_wgmma(monkeypatch) -> None:
    """Switch on the sm_90a wgmma ranking kernel (csrc/ranking_dispatch.h) for a test; skip off Hopper."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma ranking kernel needs a compute capability 9.0 device")
    monkeypatch.setenv("PACOFR_CUDA_WGMMA", "1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("n,codes,dim", NEAREST_SHAPES)
@pytest.mark.parametrize("k", [1, 3, 8, 16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_hopper_wgmma_kernel_matches_the_oracle(hopper_wgmma, dtype, n, codes, dim, k, metric, generator) -> None:
    """The same oracle as the mma.sync kernel's (shapes over many tiles, chunks, ragged N, K and D)."""
    x, codebook = nearest_inputs("clustered", n, codes, dim, dtype, generator)
    distances, indices = nearest_token(x.cuda(), codebook.cuda(), k, metric, backend="cuda")
    assert_matches_oracle(x, codebook, k, metric, distances.cpu(), indices.cpu())


@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_hopper_wgmma_kernel_breaks_ties_to_the_smallest_index(hopper_wgmma, k, generator) -> None:
    """Duplicates of the nearest code in other warps' columns, later tiles and the ragged last tile (bf16:
    the small integers are exact)."""
    x, codebook = integer_inputs(200, 4500, 24, generator)
    twins = [70, 130, 2000, 4497]
    codebook[twins] = codebook[5]
    x[:] = codebook[5]
    distances, indices = nearest_token(x.cuda().bfloat16(), codebook.cuda().bfloat16(), k, backend="cuda")
    assert (indices.cpu() == torch.tensor([5, *twins][:k])).all()
    assert (distances.cpu() == 0).all()


@pytest.mark.parametrize("precision", ["ieee", "tf32", "tf32x3"])
@pytest.mark.parametrize("n,codes,dim", [(300, 5000, 256), (129, 700, 1000)])
def test_fp32_input_precisions_are_within_their_tolerance(precision, n, codes, dim, generator) -> None:
    x, codebook = nearest_inputs("gaussian", n, codes, dim, torch.float32, generator)
    xc, cc = x.cuda(), codebook.cuda()
    distances = torch.full((n, 4), float("nan"), device="cuda")
    indices = torch.full((n, 4), -7, dtype=torch.int64, device="cuda")
    ops().nearest_token(xc, cc, code_terms(cc, "l2"), False, precision, distances, indices)
    assert_matches_oracle(x, codebook, 4, "l2", distances.cpu(), indices.cpu(), rel=PRECISION_TOLERANCE[precision])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_equal_codes_in_other_warps_and_tiles_lose_to_the_smallest_index(k, generator) -> None:
    """Exact duplicates of the nearest code in the other warp of a tile (codes 64..127), in later
    tiles and in the last ragged tile: every tie goes to the smaller index, in order."""
    x, codebook = integer_inputs(200, 4500, 24, generator)
    twins = [70, 130, 2000, 4497]
    codebook[twins] = codebook[5]
    x[:] = codebook[5]
    distances, indices = nearest_token(x.cuda(), codebook.cuda(), k, backend="cuda")
    want = torch.tensor([5, *twins][:k])
    assert (indices.cpu() == want).all()
    assert (distances.cpu() == 0).all()


def test_nearest_token_rejects_tensors_on_two_devices() -> None:
    x = torch.randn(4, 8, device="cuda")
    codebook = torch.randn(5, 8)
    distances = torch.empty(4, 1, device="cuda")
    indices = torch.empty(4, 1, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="codebook is on cpu but x is on cuda"):
        ops().nearest_token(x, codebook, code_terms(codebook, "l2"), False, "ieee", distances, indices)


# ------------------------------------------------------------------------------------------
# soft_assign
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
def test_soft_assign_forward_and_backward_against_float64(metric, deterministic, m, generator) -> None:
    n, codes, dim, tau = 300, 3000, 96, 0.1
    q, cb = assign_inputs(n, codes, dim, torch.float32, generator, kind="clustered")
    qc, cbc = q.cuda().requires_grad_(), cb.cuda().requires_grad_()
    out = soft_assign(qc, cbc, m, tau, metric=metric, deterministic=deterministic, backend="cuda")
    g = torch.randn(n, dim, generator=generator)
    (out.token * g.cuda()).sum().backward()
    idx = out.indices.cpu()
    check_selection(idx, q, cb, m, metric, atol=1e-5)
    q64, cb64 = q.double().requires_grad_(), cb.double().requires_grad_()
    token64, weights64 = oracle_given(q64, cb64, idx, tau, metric)
    (token64 * g.double()).sum().backward()
    assert_close_rel(out.weights.cpu(), weights64.detach(), 1e-4, "weights")
    assert_close_rel(out.token.detach().cpu(), token64.detach(), 1e-4, "token")
    assert_close_rel(qc.grad.cpu(), q64.grad, 1e-3, "grad q")
    assert_close_rel(cbc.grad.cpu(), cb64.grad, 1e-3, "grad codebook")


def test_deterministic_codebook_gradient_repeats_bitwise_under_skew(generator) -> None:
    """Most queries pick the same two codes: their segments span hundreds of 128-entry chunks."""
    n, codes, dim = 20000, 512, 64
    q, cb = assign_inputs(n, codes, dim, torch.float32, generator)
    q[: n - 100] = cb[3] + 1e-3 * torch.randn(n - 100, dim, generator=generator)
    grads = []
    for _ in range(2):
        cbc = cb.cuda().requires_grad_()
        out = soft_assign(q.cuda(), cbc, 2, 0.1, metric="cosine", deterministic=True, backend="cuda")
        out.token.square().sum().backward()
        grads.append(cbc.grad.clone())
    assert torch.equal(grads[0], grads[1])
    cb64 = cb.double().requires_grad_()
    token64, _ = oracle_given(q.double(), cb64, out.indices.cpu(), 0.1, "cosine")
    token64.square().sum().backward()
    assert_close_rel(grads[0].cpu(), cb64.grad, 1e-3, "grad codebook")


@pytest.mark.parametrize("dim", [12229, 12288, 12300])
def test_soft_assign_runs_at_the_old_shared_memory_limit(dim, generator) -> None:
    q, cb = assign_inputs(5, 6, dim, torch.float32, generator)
    out = soft_assign(q.cuda(), cb.cuda(), 2, 0.5, backend="cuda")
    check_selection(out.indices.cpu(), q, cb, 2, "cosine", atol=1e-5)


# ------------------------------------------------------------------------------------------
# codebook_stats: out-of-range indices, both paths
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_x", [False, True])
def test_out_of_range_indices_are_skipped_the_same_way_on_both_paths(with_x, generator) -> None:
    codes = 40
    indices = torch.randint(0, codes, (500, 3), generator=generator)
    indices[::7, 0] = -1  # nearest_token's NaN rows
    indices[::11, 1] = codes
    indices[::13, 2] = codes + 5
    weights = torch.rand(500, 3, generator=generator)
    x = torch.randn(500, 16, generator=generator) if with_x else None
    valid = (indices >= 0) & (indices < codes)
    want_counts, want_sums = stats_oracle(indices.clamp(0, codes - 1), codes, weights * valid, x)
    results = []
    for deterministic in (False, True):  # straight to the op: the public one asserts the range first
        counts, sums = ops().codebook_stats(indices.cuda(), codes, weights.cuda(),
                                            None if x is None else x.cuda(), deterministic)
        torch.cuda.synchronize()  # an out-of-bounds write would surface here
        results.append((counts.cpu(), sums.cpu()))
        assert_close_rel(counts.cpu(), want_counts, 1e-5, "counts")
        if with_x:
            assert_close_rel(sums.cpu(), want_sums, 1e-5, "sums")
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_counts_are_exact_past_2_to_the_24(deterministic) -> None:
    """fp32 sums stop at 2^24 (2^24 + 1 rounds back to 2^24); the op's fp64 counts must not."""
    big = (1 << 24) + 3
    indices = torch.zeros(big + 5, 1, dtype=torch.int32, device="cuda")
    indices[big:] = 1
    counts, _ = ops().codebook_stats(indices, 2, None, None, deterministic)
    assert counts.dtype == torch.float64
    assert counts.tolist() == [float(big), 5.0]


def test_rows_outside_the_finite_range_report_nan_and_no_index(generator) -> None:
    """nearest_token's rule: a row whose fp32 squared norm is NaN, inf or above 2^124 gets NaN distances
    and index -1 in every slot (pacofr/ops/nearest_token.py); the other rows are untouched."""
    x, cb = nearest_inputs("gaussian", 6, 50, 32, torch.float32, generator)
    x[1, 0] = float("nan")
    x[2, 3] = 1e20  # squared: 1e40, inf in fp32
    x[3, :] = 2.0 ** 62  # squared norm 32 * 2^124 > 2^124, finite
    distances = torch.empty(6, 2, device="cuda")
    indices = torch.empty(6, 2, dtype=torch.int64, device="cuda")
    ops().nearest_token(x.cuda(), cb.cuda(), code_terms(cb.cuda(), "l2"), False, "ieee", distances, indices)
    outside = torch.tensor([False, True, True, True, False, False])
    assert torch.isnan(distances.cpu()[outside]).all() and (indices.cpu()[outside] == -1).all()
    assert torch.isfinite(distances.cpu()[~outside]).all() and (indices.cpu()[~outside] >= 0).all()


def test_outputs_allocated_in_cpp_are_fully_written(generator) -> None:
    """Fill the caching allocator's free blocks with NaN, then run: no NaN may leak out."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    q, cb = assign_inputs(1000, 300, 64, torch.float32, generator)
    out = soft_assign(q.cuda(), cb.cuda(), 4, 0.2, backend="cuda")
    for t in out:
        assert torch.isfinite(t.float()).all()
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    counts, sums = ops().codebook_stats(out.indices, 300, None, q.cuda(), True)
    assert torch.isfinite(counts).all() and torch.isfinite(sums).all()


# ------------------------------------------------------------------------------------------
# streams and devices
# ------------------------------------------------------------------------------------------

def test_kernels_run_on_the_current_stream(generator) -> None:
    """Inputs are produced on a side stream just before each op: a kernel launched on another
    stream would race with them."""
    x_cpu, cb_cpu = nearest_inputs("gaussian", 4096, 2048, 128, torch.bfloat16, generator)
    want_d, want_i = nearest_token(x_cpu.cuda(), cb_cpu.cuda(), 2, backend="cuda")
    want_q = soft_assign(x_cpu.cuda().float(), cb_cpu.cuda().float(), 3, 0.1, backend="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(3):
            x = torch.zeros(4096, 128, dtype=torch.bfloat16, device="cuda")
            x.copy_(x_cpu.cuda(non_blocking=False)).mul_(1.0)
            cb = torch.zeros(2048, 128, dtype=torch.bfloat16, device="cuda").add_(cb_cpu.cuda())
            d, i = nearest_token(x, cb, 2, backend="cuda")
            out = soft_assign(x.float(), cb.float(), 3, 0.1, backend="cuda")
    side.synchronize()
    assert torch.equal(d, want_d) and torch.equal(i, want_i)
    assert torch.equal(out.indices, want_q.indices) and torch.equal(out.weights, want_q.weights)


def test_a_second_device(generator) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device")
    x, cb = nearest_inputs("clustered", 300, 2000, 64, torch.float16, generator)
    with torch.cuda.device(0):
        distances, indices = nearest_token(x.to("cuda:1"), cb.to("cuda:1"), 2, backend="cuda")
        out = soft_assign(x.float().to("cuda:1"), cb.float().to("cuda:1"), 2, 0.1, backend="cuda")
    assert distances.device == torch.device("cuda:1") and out.token.device == torch.device("cuda:1")
    assert_matches_oracle(x, cb, 2, "l2", distances.cpu(), indices.cpu())
    check_selection(out.indices.cpu(), x.float(), cb.float(), 2, "cosine", atol=1e-5)


# ------------------------------------------------------------------------------------------
# patch kernels at a training batch size
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16])
def test_patch_ops_match_the_reference_on_many_rows(dtype, generator) -> None:
    images = torch.randint(0, 256, (256, 3, 224, 224), generator=generator).to(dtype).cuda()
    images = images.to(memory_format=torch.channels_last)
    ids = torch.argsort(torch.rand(256, 196, generator=generator), dim=1)[:, :120].cuda()
    got = gather_patches(images, ids, 16, backend="cuda")
    want = gather_patches(images, ids, 16, backend="torch")
    torch.testing.assert_close(got, want)
    pred = torch.randn_like(want, dtype=torch.float32)
    torch.testing.assert_close(masked_patch_loss(pred, images, ids, 16, backend="cuda"),
                               masked_patch_loss(pred, images, ids, 16, backend="torch"), rtol=1e-5, atol=1e-6)
    tokens = torch.randn(256, 49, 64, device="cuda")
    restore = torch.argsort(torch.rand(256, 196, generator=generator), dim=1).cuda()
    mask = torch.randn(64, device="cuda")
    torch.testing.assert_close(scatter_tokens(tokens, restore, mask, backend="cuda"),
                               scatter_tokens(tokens, restore, mask, backend="torch"))
