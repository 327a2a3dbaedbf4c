"""The tile loop shared by the codebook kernels: fp32 scores of query rows against every code, and a
running set of the best ``KP`` candidates per row, without an N x K matrix.

Used by ``nearest_token_kernel`` (its k nearest codes) and ``soft_assign_fwd_kernel`` (its top-m
candidates). Both rank codes by the same fp32 *score*, lower is better:

* ``COSINE=False``: ``score = term - x . e`` with ``term = 0.5 ||e||^2`` (squared L2 distance minus
  the row constant ``0.5 ||x||^2``, halved);
* ``COSINE=True``: ``score = -(x . e) * term`` with ``term`` the code's inverse norm.

``term`` (fp32, one per code) comes from the launcher, so the callers decide how zero or tiny code
norms are treated. The dot products are accumulated in fp32 over ``D`` in ``BLOCK_D`` chunks.
Operand precision: ``INPUT_PRECISION`` ("ieee" exact fp32 FMAs, "tf32", "tf32x3") is passed to
``tl.dot``; ``CAST_BF16`` rounds fp32 tiles to bf16 first (the "bf16" precision: bf16 MMAs with
fp32 accumulation); ``UPCAST`` turns 16-bit tiles into fp32 before the dot (Triton's interpreter
computes bf16 dots wrongly; its fp32 dots of bf16 values are exact). The interpreter also casts
fp32 to bf16 by truncation where a GPU rounds to nearest even, so with ``UPCAST`` the bf16
rounding is done on the bits (:func:`round_to_bf16`) and stays in fp32.

Candidates are int64 keys: the high 32 bits hold the score's bits mapped to an order-preserving
signed integer, the low 32 bits the code index. Comparing keys compares (score, index)
lexicographically, so the smallest index wins every tie whatever the tiling; NaN scores map to the
largest score key (after +inf), masked columns to :data:`KEY_PAD`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# (Triton kernels may read only constexpr globals)
KEY_PAD = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # masked code columns / removed candidates: after every real key
KEY_NAN = tl.constexpr(0x7FFFFFFF)  # high word of a NaN score: after +inf (0x7F800000)
SIGN_FLIP = tl.constexpr(0x7FFFFFFF)
BF16_KEEP = tl.constexpr(-65536)  # 0xFFFF0000 as int32: the bits a bfloat16 keeps


@triton.jit
def ordered_score_bits(scores):
    """int32 of fp32 scores whose signed order is the scores' order (NaN after +inf, -0.0 as +0.0)."""
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 -> +0.0: equal scores must give equal keys
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & SIGN_FLIP)
    return tl.where(scores != scores, KEY_NAN, ordered)


@triton.jit
def score_keys(scores, cols, col_mask):
    """int64 keys ``(ordered score bits << 32) | index`` of a fp32 score tile; masked columns ``KEY_PAD``."""
    keys = (ordered_score_bits(scores).to(tl.int64) << 32) | cols.to(tl.int64)[None, :]
    return tl.where(col_mask[None, :], keys, KEY_PAD)


@triton.jit
def key_score(keys):
    """The fp32 score stored in the high word of int64 keys."""
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & SIGN_FLIP)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def key_index(keys):
    """The code index stored in the low word of int64 keys (indices are < 2^31)."""
    return keys.to(tl.int32)


@triton.jit
def running_minimum(lane_score, lane_code, scores, cols):
    """Fold one score tile into the running (score, code) minimum of every (row, column lane).

    A lane starts at (NaN, its first code). Codes reach a lane in increasing order, so a strict fp32
    ``<`` keeps the smaller code on equal scores (-0.0 equals +0.0); a NaN best is replaced by the
    first number that comes, a NaN score never replaces anything. Masked columns carry NaN scores
    (their term is NaN), so they need no test of their own. Per score: one add (the caller's), the
    compares, two selects; no index arithmetic.
    """
    take = (scores < lane_score) | ((lane_score != lane_score) & (scores == scores))
    lane_score = tl.where(take, scores, lane_score)
    lane_code = tl.where(take, cols[None, :], lane_code)
    return lane_score, lane_code


@triton.jit
def lane_keys(lane_score, lane_code, n_codes):
    """int64 keys of the lanes' running minima, as :func:`score_keys` builds them; a lane whose first code
    is past ``n_codes`` saw no code (``KEY_PAD``)."""
    keys = (ordered_score_bits(lane_score).to(tl.int64) << 32) | lane_code.to(tl.int64)
    return tl.where(lane_code < n_codes, keys, KEY_PAD)


@triton.jit
def merge_tile(best, keys, KP: tl.constexpr):
    """Insert the ``KP`` smallest keys of each row of ``keys`` into the running sets ``best``.

    ``best`` ``(BLOCK_N, KP)`` holds distinct keys (unordered). Each step moves the tile's smallest
    remaining key into the set if it beats the set's largest; keys are unique per row (they carry
    the index), so exactly one slot changes and one tile entry is consumed per step. Every key is
    first compared with its row's current worst (the m-th best so far, as FAISS's WarpSelect
    filters against its queue's largest), and a tile costs merge steps only when some row of it
    has a key below that worst. (k = 1 takes :func:`running_minimum` instead.)
    """
    worst = tl.max(best, axis=1)
    # counted in fp32: LLVM turns an integer sum of compares into a popcount of a bit vector it
    # packs through the stack (local memory) on NVPTX
    candidates = tl.sum(tl.where(keys < worst[:, None], 1.0, 0.0), axis=1)
    steps = tl.minimum(tl.max(candidates, axis=0), KP).to(tl.int32)
    for _ in range(steps):
        smallest = tl.min(keys, axis=1)
        take = smallest < worst
        best = tl.where((best == worst[:, None]) & take[:, None], smallest[:, None], best)
        keys = tl.where(keys == smallest[:, None], KEY_PAD, keys)
        worst = tl.max(best, axis=1)
    return best


@triton.jit
def round_to_bf16(x):
    """fp32 ``x`` rounded to bfloat16 (nearest, ties to even, as ``cvt.rn.bf16.f32``), kept in fp32; NaN unchanged."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & BF16_KEEP).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def dot_operand(tile, CAST_BF16: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded tile as ``tl.dot`` takes it: rounded to bf16 (``CAST_BF16``), upcast to fp32 (``UPCAST``)."""
    if CAST_BF16 and UPCAST:
        tile = round_to_bf16(tile)
    elif CAST_BF16:
        tile = tile.to(tl.bfloat16)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def best_codes(
    x_ptr, codebook_ptr, code_term_ptr, rows, row_mask, n_codes, dim,
    stride_xn, stride_xd, stride_en, stride_ed,
    KP: tl.constexpr, COSINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, CAST_BF16: tl.constexpr, UPCAST: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    """Keys ``(BLOCK_N, KP)`` (unordered) of the ``KP`` lowest-scoring codes of query ``rows``.

    ``RESIDENT`` (the launcher sets it when ``BLOCK_D >= dim``): the query tile is loaded once and
    stays on chip across all code tiles, and the loop over code tiles is the only loop (Triton
    pipelines it over ``num_stages`` code tiles); otherwise each code tile loops over D chunks.
    Slots that no code filled (``n_codes < KP``) hold distinct keys above every real key.
    """
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    slots = tl.arange(0, KP)
    best = tl.full((BLOCK_N, KP), KEY_PAD, tl.int64) - slots.to(tl.int64)[None, :]
    # k = 1: a running fp32 minimum and its code per (row, column lane), updated elementwise in
    # registers (no reduction across threads per tile) and merged into a key once at the end
    lane_score = tl.full((BLOCK_N, BLOCK_K), float("nan"), tl.float32)
    lane_code = tl.zeros((BLOCK_N, BLOCK_K), tl.int32) + tl.arange(0, BLOCK_K)[None, :]
    if RESIDENT:
        all_ds = tl.arange(0, BLOCK_D)
        x_resident = dot_operand(tl.load(x_rows + all_ds.to(tl.int64)[None, :] * stride_xd,
                                         mask=row_mask[:, None] & (all_ds < dim)[None, :], other=0.0),
                                 CAST_BF16, UPCAST)
    for code_start in range(0, n_codes, BLOCK_K):
        cols = code_start + tl.arange(0, BLOCK_K)
        col_mask = cols < n_codes
        e_cols = codebook_ptr + cols.to(tl.int64)[None, :] * stride_en
        if RESIDENT:
            e_tile = tl.load(e_cols + all_ds.to(tl.int64)[:, None] * stride_ed,
                             mask=(all_ds < dim)[:, None] & col_mask[None, :], other=0.0)
            dots = tl.dot(x_resident, dot_operand(e_tile, CAST_BF16, UPCAST), input_precision=INPUT_PRECISION)
        else:
            dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d_start in range(0, dim, BLOCK_D):
                ds = d_start + tl.arange(0, BLOCK_D)
                d_mask = ds < dim
                x_tile = tl.load(x_rows + ds.to(tl.int64)[None, :] * stride_xd,
                                 mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                e_tile = tl.load(e_cols + ds.to(tl.int64)[:, None] * stride_ed,
                                 mask=d_mask[:, None] & col_mask[None, :], other=0.0)
                dots = tl.dot(dot_operand(x_tile, CAST_BF16, UPCAST), dot_operand(e_tile, CAST_BF16, UPCAST), dots,
                              input_precision=INPUT_PRECISION)
        term = tl.load(code_term_ptr + cols, mask=col_mask, other=float("nan"))  # NaN scores past the codebook
        if COSINE:
            scores = -dots * term[None, :]
        else:
            scores = term[None, :] - dots
        if KP == 1:
            lane_score, lane_code = running_minimum(lane_score, lane_code, scores, cols)
        else:
            best = merge_tile(best, score_keys(scores, cols, col_mask), KP)
    if KP == 1:
        best = tl.min(lane_keys(lane_score, lane_code, n_codes), axis=1)[:, None]
    return best


@triton.jit
def pop_smallest(best):
    """(smallest key per row, ``best`` with it removed): take the candidates in increasing order."""
    smallest = tl.min(best, axis=1)
    return smallest, tl.where(best == smallest[:, None], KEY_PAD, best)
