"""Triton kernels for multi-candidate soft assignment and codebook statistics.

Forward (:func:`soft_assign_fwd_kernel`), one program per BLOCK_N query rows:

1. the ranking tile loop shared with ``nearest_token`` (:func:`pacofr.kernels._ranking.best_codes`):
   fp32 scores ``-(q . e) / max(||e||, eps)`` (cosine; the positive per-row factor ``1/||q||`` and
   ``1/tau`` do not change the order) or ``0.5 ||e||^2 - q . e`` (l2; ``||q||^2`` is constant per
   row, kernels.md pitfall 5), lower is better, and the running best M_PAD (score, index) keys per
   row (ties to the smaller index, NaN after every number);
2. epilogue: take the M keys in order, gather the M code rows, recompute the scores exactly from
   the rows (``cos`` via ``q.e`` and the two norms, ``-sum (q - e)^2`` for l2), softmax of
   ``(c - max c) / tau`` (``tau`` read from memory, so no recompilation per value), weighted sum.
   Saved for backward: indices, weights, raw scores ``c`` and ``||q||``.

Backward (:func:`soft_assign_bwd_kernel`), M-sparse: ``g_w = <dtoken, e_j> + dweights``, softmax
backward, chain through the scores to ``q`` (written once per row) and to the M chosen code rows
(relaxed fp32 ``tl.atomic_add`` into a K x D buffer: nothing reads it in the launch, so no
fences; or, in deterministic mode, per-pair coefficients that
:func:`codebook_grad_segment_kernel` reduces over the pairs of each code after a stable sort).

Statistics: :func:`codebook_stats_atomic_kernel` (relaxed fp64 / fp32 atomics) and
:func:`codebook_stats_segment_kernel` (sorted segments, deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

from pacofr.kernels._ranking import KEY_PAD, best_codes, key_index, pop_smallest


@triton.jit
def soft_assign_fwd_kernel(
    q_ptr, cb_ptr, code_stat_ptr, rank_term_ptr, tau_ptr,
    token_ptr, idx_ptr, w_ptr, raw_ptr, qnorm_ptr,
    N, K, D,
    stride_qn, stride_qd, stride_cbk, stride_cbd,
    norm_eps,
    M: tl.constexpr, M_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DE: tl.constexpr,
    COSINE: tl.constexpr, HARD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_BF16: tl.constexpr, UPCAST: tl.constexpr, RESIDENT: tl.constexpr,
):
    """code_stat: (K,) fp32 code norms (cosine) or squared norms (l2); rank_term: (K,) fp32
    ``1 / max(||e||, eps)`` (cosine) or ``0.5 ||e||^2`` (l2), the ranking's per-code term. Outputs
    contiguous: token (N, D) q dtype, idx (N, M) int64, w and raw (N, M) fp32, qnorm (N,) fp32."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    slot = tl.arange(0, M_PAD)
    active = slot < M

    # ---- 1. ranking: the M_PAD best keys per row ------------------------------------------------
    best = best_codes(q_ptr, cb_ptr, rank_term_ptr, rows, row_ok, K, D,
                      stride_qn, stride_qd, stride_cbk, stride_cbd,
                      M_PAD, COSINE, BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION, CAST_BF16, UPCAST, RESIDENT)

    # ---- 2. epilogue: the M winners in order, their exact scores, softmax, weighted sum -----------
    ordered = tl.full((BLOCK_N, M_PAD), KEY_PAD, tl.int64)
    for j in tl.static_range(M):
        smallest, best = pop_smallest(best)
        ordered = tl.where(slot[None, :] == j, smallest[:, None], ordered)
    idx = tl.where(active[None, :], key_index(ordered), 0)
    idx64 = idx.to(tl.int64)
    pair_ok = row_ok[:, None] & active[None, :]

    qq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dots = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DE):
        dd = d0 + tl.arange(0, BLOCK_DE)
        d_ok = dd < D
        qt = tl.load(q_ptr + rows64[:, None] * stride_qn + dd[None, :] * stride_qd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        e3 = tl.load(cb_ptr + idx64[:, :, None] * stride_cbk + dd[None, None, :] * stride_cbd,
                     mask=pair_ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        if COSINE:
            qq += tl.sum(qt * qt, axis=1)
            dots += tl.sum(qt[:, None, :] * e3, axis=2)
        else:
            diff = qt[:, None, :] - e3
            dots += tl.sum(diff * diff, axis=2)
    if COSINE:
        qnorm = tl.sqrt(qq)
        enorm = tl.load(code_stat_ptr + idx, mask=pair_ok, other=1.0)
        raw = dots / tl.maximum(qnorm, norm_eps)[:, None] / tl.maximum(enorm, norm_eps)
        tl.store(qnorm_ptr + rows64, qnorm, mask=row_ok)
    else:
        raw = -dots
    tau = tl.load(tau_ptr).to(tl.float32)
    raw = tl.where(active[None, :], raw, float("-inf"))
    top = tl.max(raw, axis=1)
    p = tl.exp((raw - top[:, None]) / tau)
    p = tl.where(active[None, :], p, 0.0)
    w = p / tl.sum(p, axis=1)[:, None]
    out_off = rows64[:, None] * M + slot[None, :]
    tl.store(idx_ptr + out_off, idx64, mask=pair_ok)
    tl.store(w_ptr + out_off, w, mask=pair_ok)
    tl.store(raw_ptr + out_off, raw, mask=pair_ok)

    first = (slot == 0)[None, :, None]
    for d0 in range(0, D, BLOCK_DE):
        dd = d0 + tl.arange(0, BLOCK_DE)
        d_ok = dd < D
        e3 = tl.load(cb_ptr + idx64[:, :, None] * stride_cbk + dd[None, None, :] * stride_cbd,
                     mask=pair_ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        if HARD:
            tok = tl.sum(tl.where(first, e3, 0.0), axis=1)
        else:
            tok = tl.sum(w[:, :, None] * e3, axis=1)
        tl.store(token_ptr + rows64[:, None] * D + dd[None, :], tok.to(token_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def soft_assign_bwd_kernel(
    gtok_ptr, gw_ptr, q_ptr, cb_ptr, code_stat_ptr, tau_ptr,
    idx_ptr, w_ptr, raw_ptr, qnorm_ptr,
    gq_ptr, gcb_ptr, gcoef_ptr, gtau_ptr,
    N, D,
    stride_gtn, stride_gtd, stride_qn, stride_qd, stride_cbk, stride_cbd,
    norm_eps,
    M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    COSINE: tl.constexpr, HAS_GW: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Gradients of one block of rows. gq (N, D) in q's dtype; gcb (K, D) fp32 receives atomics
    when ATOMIC, else gcoef (N, M) fp32 gets d(loss)/d(raw score) for the segment kernel; gtau (N,)
    fp32 gets sum_j g_s_j (c_j - max c) per row (d tau = -sum / tau^2, summed by the caller)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    slot = tl.arange(0, M_PAD)
    active = slot < M
    pair_ok = row_ok[:, None] & active[None, :]
    pair_off = rows64[:, None] * M + slot[None, :]
    idx64 = tl.load(idx_ptr + pair_off, mask=pair_ok, other=0)
    w = tl.load(w_ptr + pair_off, mask=pair_ok, other=0.0)
    raw = tl.load(raw_ptr + pair_off, mask=pair_ok, other=0.0)
    tau = tl.load(tau_ptr).to(tl.float32)

    # pass 1: g_w = <dtoken, e_j> (+ upstream gradient of the weights)
    gw = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        gt = tl.load(gtok_ptr + rows64[:, None] * stride_gtn + dd[None, :] * stride_gtd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        e3 = tl.load(cb_ptr + idx64[:, :, None] * stride_cbk + dd[None, None, :] * stride_cbd,
                     mask=pair_ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        gw += tl.sum(gt[:, None, :] * e3, axis=2)
    if HAS_GW:
        gw += tl.load(gw_ptr + pair_off, mask=pair_ok, other=0.0)
    g_s = w * (gw - tl.sum(w * gw, axis=1)[:, None])
    g_s = tl.where(pair_ok, g_s, 0.0)
    g_c = g_s / tau
    top = tl.max(tl.where(active[None, :], raw, float("-inf")), axis=1)
    tl.store(gtau_ptr + rows64, tl.sum(tl.where(pair_ok, g_s * (raw - top[:, None]), 0.0), axis=1), mask=row_ok)
    if not ATOMIC:
        tl.store(gcoef_ptr + pair_off, g_c, mask=pair_ok)

    if COSINE:
        qnorm = tl.load(qnorm_ptr + rows64, mask=row_ok, other=1.0)
        inv_q = 1.0 / tl.maximum(qnorm, norm_eps)
        q_free = qnorm >= norm_eps  # F.normalize: no gradient through the norm when it is clamped
        enorm = tl.load(code_stat_ptr + idx64, mask=pair_ok, other=1.0)
        inv_e = 1.0 / tl.maximum(enorm, norm_eps)
        e_free = enorm >= norm_eps
        gc_c = tl.sum(g_c * raw, axis=1)
    else:
        gc_sum = tl.sum(g_c, axis=1)

    # pass 2: gradient of q (one write per element) and of the chosen rows (scatter)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        qt = tl.load(q_ptr + rows64[:, None] * stride_qn + dd[None, :] * stride_qd,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        e3 = tl.load(cb_ptr + idx64[:, :, None] * stride_cbk + dd[None, None, :] * stride_cbd,
                     mask=pair_ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        if COSINE:
            qn = qt * inv_q[:, None]
            en = e3 * inv_e[:, :, None]
            gq = tl.sum(g_c[:, :, None] * en, axis=1)
            gq = tl.where(q_free[:, None], gq - gc_c[:, None] * qn, gq) * inv_q[:, None]
        else:
            gq = 2.0 * (tl.sum(g_c[:, :, None] * e3, axis=1) - gc_sum[:, None] * qt)
        tl.store(gq_ptr + rows64[:, None] * D + dd[None, :], gq.to(gq_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        if ATOMIC:
            gt = tl.load(gtok_ptr + rows64[:, None] * stride_gtn + dd[None, :] * stride_gtd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            ge = w[:, :, None] * gt[:, None, :]
            if COSINE:
                score_part = tl.where(e_free[:, :, None], qn[:, None, :] - raw[:, :, None] * en, qn[:, None, :])
                ge += (g_c * inv_e)[:, :, None] * score_part
            else:
                ge += 2.0 * g_c[:, :, None] * (qt[:, None, :] - e3)
            tl.atomic_add(gcb_ptr + idx64[:, :, None] * D + dd[None, None, :], ge,
                          mask=pair_ok[:, :, None] & d_ok[None, None, :], sem="relaxed")


@triton.jit
def codebook_grad_segment_kernel(
    order_ptr, starts_ptr, gtok_ptr, q_ptr, cb_ptr, code_stat_ptr, qnorm_ptr,
    w_ptr, raw_ptr, gcoef_ptr, gcb_ptr,
    D,
    stride_gtn, stride_gtd, stride_qn, stride_qd, stride_cbk, stride_cbd,
    norm_eps,
    M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, COSINE: tl.constexpr,
):
    """Deterministic codebook gradient: program (k, d-chunk) sums, in a fixed order, the
    contributions of the (row, slot) pairs assigned to code k. ``order`` lists pair ids n*M+j
    sorted by code (stable), ``starts`` (K+1,) the segment bounds. gcb (K, D) in the codebook's
    dtype, written once per element."""
    code = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    code64 = code.to(tl.int64)
    start = tl.load(starts_ptr + code)
    end = tl.load(starts_ptr + code + 1)
    e = tl.load(cb_ptr + code64 * stride_cbk + dd * stride_cbd, mask=d_ok, other=0.0).to(tl.float32)
    if COSINE:
        enorm = tl.load(code_stat_ptr + code)
        inv_e = 1.0 / tl.maximum(enorm, norm_eps)
        e_free = enorm >= norm_eps
        en = e * inv_e
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        p_ok = pp < end
        pair = tl.load(order_ptr + pp, mask=p_ok, other=0)
        rows64 = pair // M
        w = tl.load(w_ptr + pair, mask=p_ok, other=0.0)
        g_c = tl.load(gcoef_ptr + pair, mask=p_ok, other=0.0)
        both = p_ok[:, None] & d_ok[None, :]
        gt = tl.load(gtok_ptr + rows64[:, None] * stride_gtn + dd[None, :] * stride_gtd,
                     mask=both, other=0.0).to(tl.float32)
        qt = tl.load(q_ptr + rows64[:, None] * stride_qn + dd[None, :] * stride_qd,
                     mask=both, other=0.0).to(tl.float32)
        contrib = w[:, None] * gt
        if COSINE:
            raw = tl.load(raw_ptr + pair, mask=p_ok, other=0.0)
            qnorm = tl.load(qnorm_ptr + rows64, mask=p_ok, other=1.0)
            qn = qt / tl.maximum(qnorm, norm_eps)[:, None]
            part = tl.where(e_free, qn - raw[:, None] * en[None, :], qn)
            contrib += (g_c * inv_e)[:, None] * part
        else:
            contrib += 2.0 * g_c[:, None] * (qt - e[None, :])
        acc += tl.sum(tl.where(both, contrib, 0.0), axis=0)
    tl.store(gcb_ptr + code64 * D + dd, acc.to(gcb_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def codebook_stats_atomic_kernel(
    idx_ptr, w_ptr, x_ptr, counts_ptr, sums_ptr,
    N, D, stride_in, stride_ij, stride_wn, stride_wj, stride_xn, stride_xd,
    M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_W: tl.constexpr, HAS_X: tl.constexpr,
):
    """counts[k] += w (fp64 atomics: integer counts exact to 2^53), sums[k, :] += w * x[n, :] (fp32
    atomics) over the (row, slot) entries of BLOCK_N rows. The atomics are relaxed: nothing is read
    back in this launch, so no ordering (and no fence around each atomic) is needed."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    slot = tl.arange(0, M_PAD)
    ok = (rows < N)[:, None] & (slot < M)[None, :]
    idx64 = tl.load(idx_ptr + rows64[:, None] * stride_in + slot[None, :] * stride_ij, mask=ok, other=0).to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + rows64[:, None] * stride_wn + slot[None, :] * stride_wj, mask=ok, other=0.0)
    else:
        w = tl.where(ok, 1.0, 0.0)
    tl.atomic_add(counts_ptr + idx64, w.to(tl.float64), mask=ok, sem="relaxed")
    if HAS_X:
        w32 = w.to(tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            xt = tl.load(x_ptr + rows64[:, None] * stride_xn + dd[None, :] * stride_xd,
                         mask=(rows < N)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            tl.atomic_add(sums_ptr + idx64[:, :, None] * D + dd[None, None, :], w32[:, :, None] * xt[:, None, :],
                          mask=ok[:, :, None] & d_ok[None, None, :], sem="relaxed")


@triton.jit
def codebook_stats_segment_kernel(
    order_ptr, starts_ptr, w_ptr, x_ptr, counts_ptr, sums_ptr,
    D, stride_xn, stride_xd,
    M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr, HAS_X: tl.constexpr,
):
    """Deterministic statistics: program (k, d-chunk) sums the entries of code k in sorted order.
    ``order`` (N*M,) entry ids n*M+j sorted by code (stable); ``w`` flat (N*M,) when HAS_W; counts
    fp64 (integer counts exact to 2^53), sums fp32."""
    code = tl.program_id(0)
    chunk = tl.program_id(1)
    dd = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    start = tl.load(starts_ptr + code)
    end = tl.load(starts_ptr + code + 1)
    count = tl.zeros((BLOCK_P,), dtype=tl.float64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        p_ok = pp < end
        entry = tl.load(order_ptr + pp, mask=p_ok, other=0)
        if HAS_W:
            w = tl.load(w_ptr + entry, mask=p_ok, other=0.0)
        else:
            w = tl.where(p_ok, 1.0, 0.0)
        count += w.to(tl.float64)
        w = w.to(tl.float32)
        if HAS_X:
            rows64 = entry // M
            xt = tl.load(x_ptr + rows64[:, None] * stride_xn + dd[None, :] * stride_xd,
                         mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * xt, axis=0)
    if chunk == 0:
        tl.store(counts_ptr + code, tl.sum(count, axis=0))
    if HAS_X:
        tl.store(sums_ptr + code.to(tl.int64) * D + dd, acc, mask=d_ok)
