"""Triton kernels for masked patch gathering (MAE semantics); launched by pacofr.ops._patches_fused.

Layout conventions shared by every kernel:

- a "patch row" is one (b, i) pair of the (B, n) index tensor ``ids`` (contiguous, flat row
  ``r = b * n + i``); its values are the P = p * p * C pixels of patch ``ids[b, i]`` in MAE
  (p, q, c) order, value ``k = (py * p + px) * C + c``;
- images are read through their four strides (any layout, no copy); per-channel ``mean``/``std``
  are contiguous fp32 (C,) vectors;
- all math is fp32; pointer offsets are int64;
- an index outside [0, L) yields a NaN row (and no gradient) instead of a wild memory access.

Every kernel processes a [BLOCK_N, BLOCK_P] tile: BLOCK_N patch rows, BLOCK_P >= P values.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _patch_pixel_offsets(ids_ptr, row_start, total_rows, rows_per_image, num_patches, grid_cols,
                         stride_b, stride_c, stride_h, stride_w,
                         PATCH: tl.constexpr, CHANNELS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """Offsets of the pixels of a tile of patch rows, and the masks that go with them.

    Returns (rows, row_ok, id_ok, k, k_ok, channel, pixel_offsets): rows (BLOCK_N,) int64 flat
    patch rows, row_ok rows < total_rows, id_ok row_ok and the patch index in range, k (BLOCK_P,)
    value index inside the patch, k_ok k < P, channel (BLOCK_P,) channel of value k,
    pixel_offsets (BLOCK_N, BLOCK_P) int64 element offsets into the image tensor.
    """
    rows = row_start + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < total_rows
    patch = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    id_ok = row_ok & (patch >= 0) & (patch < num_patches)
    patch = tl.where(id_ok, patch, 0)
    image = rows // rows_per_image
    patch_row = patch // grid_cols
    patch_col = patch - patch_row * grid_cols
    k = tl.arange(0, BLOCK_P)
    k_ok = k < PATCH * PATCH * CHANNELS
    channel = k % CHANNELS
    pixel = k // CHANNELS
    py = pixel // PATCH
    px = pixel - py * PATCH
    row_base = image * stride_b + patch_row * (PATCH * stride_h) + patch_col * (PATCH * stride_w)
    col_offset = channel.to(tl.int64) * stride_c + py.to(tl.int64) * stride_h + px.to(tl.int64) * stride_w
    offsets = row_base[:, None] + col_offset[None, :]
    return rows, row_ok, id_ok, k, k_ok, channel, offsets


@triton.jit
def _load_normalised(img_ptr, offsets, mask, channel, k_ok, mean_ptr, std_ptr,
                     IS_UINT8: tl.constexpr, HAS_STATS: tl.constexpr):
    """fp32 pixels of a tile: x (/255 for uint8), then (x - mean[c]) / std[c]; 0 where masked."""
    x = tl.load(img_ptr + offsets, mask=mask, other=0).to(tl.float32)
    if IS_UINT8:
        x = x / 255.0
    if HAS_STATS:
        mean = tl.load(mean_ptr + channel, mask=k_ok, other=0.0)
        std = tl.load(std_ptr + channel, mask=k_ok, other=1.0)
        x = (x - mean[None, :]) / std[None, :]
    return tl.where(mask, x, 0.0)


@triton.jit
def _patch_stats(x, k_ok, PATCH_DIM: tl.constexpr, eps):
    """Per-row mean and 1/sqrt(unbiased var + eps) of a tile whose masked values are 0.

    The variance is summed over the centred values divided by their largest magnitude ``s``
    (``rstd = 1 / (s sqrt(sum (c / s)^2 / (P - 1) + eps / s / s))``), so squares of huge values
    (pixels normalised by a tiny std) neither overflow nor tiny ones underflow; ``s = 1`` for a
    constant patch."""
    mean = tl.sum(x, axis=1) / PATCH_DIM
    centred = tl.where(k_ok[None, :], x - mean[:, None], 0.0)
    scale = tl.max(tl.abs(centred), axis=1)
    scale = tl.where(scale > 0.0, scale, 1.0)
    scaled = centred / scale[:, None]
    var_scaled = tl.sum(scaled * scaled, axis=1) / (PATCH_DIM - 1)
    rstd = (1.0 / tl.sqrt_rn(var_scaled + eps / scale / scale)) / scale
    return mean, rstd


@triton.jit
def gather_patches_kernel(img_ptr, ids_ptr, mean_ptr, std_ptr, out_ptr,
                          total_rows, rows_per_image, num_patches, grid_cols,
                          stride_b, stride_c, stride_h, stride_w,
                          PATCH: tl.constexpr, CHANNELS: tl.constexpr, IS_UINT8: tl.constexpr,
                          HAS_STATS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[r, k] = normalised pixel k of patch ids[r]: (B * n, P) contiguous, out's dtype."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows, row_ok, id_ok, k, k_ok, channel, offsets = _patch_pixel_offsets(
        ids_ptr, row_start, total_rows, rows_per_image, num_patches, grid_cols,
        stride_b, stride_c, stride_h, stride_w, PATCH, CHANNELS, BLOCK_N, BLOCK_P)
    load_mask = id_ok[:, None] & k_ok[None, :]
    x = _load_normalised(img_ptr, offsets, load_mask, channel, k_ok, mean_ptr, std_ptr, IS_UINT8, HAS_STATS)
    x = tl.where(id_ok[:, None], x, float("nan"))
    patch_dim: tl.constexpr = PATCH * PATCH * CHANNELS
    store_mask = row_ok[:, None] & k_ok[None, :]
    tl.store(out_ptr + rows[:, None] * patch_dim + k[None, :], x.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def gather_patches_backward_kernel(grad_out_ptr, ids_ptr, std_ptr, grad_img_ptr,
                                   total_rows, rows_per_image, num_patches, grid_cols,
                                   stride_b, stride_c, stride_h, stride_w,
                                   PATCH: tl.constexpr, CHANNELS: tl.constexpr, HAS_STATS: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """grad_img[pixel of patch ids[r], value k] += grad_out[r, k] / std[c] (fp32 atomics)."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows, row_ok, id_ok, k, k_ok, channel, offsets = _patch_pixel_offsets(
        ids_ptr, row_start, total_rows, rows_per_image, num_patches, grid_cols,
        stride_b, stride_c, stride_h, stride_w, PATCH, CHANNELS, BLOCK_N, BLOCK_P)
    patch_dim: tl.constexpr = PATCH * PATCH * CHANNELS
    mask = id_ok[:, None] & k_ok[None, :]
    g = tl.load(grad_out_ptr + rows[:, None] * patch_dim + k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_STATS:
        std = tl.load(std_ptr + channel, mask=k_ok, other=1.0)
        g = g / std[None, :]
    tl.atomic_add(grad_img_ptr + offsets, g, mask=mask, sem="relaxed")  # no ordering needed: no fences


@triton.jit
def patch_targets_kernel(img_ptr, ids_ptr, mean_ptr, std_ptr, out_ptr, eps,
                         total_rows, rows_per_image, num_patches, grid_cols,
                         stride_b, stride_c, stride_h, stride_w,
                         PATCH: tl.constexpr, CHANNELS: tl.constexpr, IS_UINT8: tl.constexpr,
                         HAS_STATS: tl.constexpr, NORM_PIX: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[r] = MAE target of patch ids[r] (norm_pix: (x - mean) / sqrt(unbiased var + eps)), fp32."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows, row_ok, id_ok, k, k_ok, channel, offsets = _patch_pixel_offsets(
        ids_ptr, row_start, total_rows, rows_per_image, num_patches, grid_cols,
        stride_b, stride_c, stride_h, stride_w, PATCH, CHANNELS, BLOCK_N, BLOCK_P)
    patch_dim: tl.constexpr = PATCH * PATCH * CHANNELS
    load_mask = id_ok[:, None] & k_ok[None, :]
    x = _load_normalised(img_ptr, offsets, load_mask, channel, k_ok, mean_ptr, std_ptr, IS_UINT8, HAS_STATS)
    if NORM_PIX:
        mean, rstd = _patch_stats(x, k_ok, patch_dim, eps)
        x = (x - mean[:, None]) * rstd[:, None]
    x = tl.where(id_ok[:, None], x, float("nan"))
    store_mask = row_ok[:, None] & k_ok[None, :]
    tl.store(out_ptr + rows[:, None] * patch_dim + k[None, :], x, mask=store_mask)


@triton.jit
def masked_patch_loss_kernel(pred_ptr, img_ptr, ids_ptr, mean_ptr, std_ptr, partial_ptr, patch_mean_ptr,
                             patch_rstd_ptr, eps,
                             total_rows, rows_per_image, num_patches, grid_cols,
                             stride_b, stride_c, stride_h, stride_w,
                             PATCH: tl.constexpr, CHANNELS: tl.constexpr, IS_UINT8: tl.constexpr,
                             HAS_STATS: tl.constexpr, NORM_PIX: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """partial[program] = sum over its rows of sum_k (pred - target)**2 (fp32); with NORM_PIX the
    per-row mean and rstd are saved for the backward. pred is (B * n, P) contiguous."""
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * BLOCK_N
    rows, row_ok, id_ok, k, k_ok, channel, offsets = _patch_pixel_offsets(
        ids_ptr, row_start, total_rows, rows_per_image, num_patches, grid_cols,
        stride_b, stride_c, stride_h, stride_w, PATCH, CHANNELS, BLOCK_N, BLOCK_P)
    patch_dim: tl.constexpr = PATCH * PATCH * CHANNELS
    load_mask = id_ok[:, None] & k_ok[None, :]
    x = _load_normalised(img_ptr, offsets, load_mask, channel, k_ok, mean_ptr, std_ptr, IS_UINT8, HAS_STATS)
    if NORM_PIX:
        mean, rstd = _patch_stats(x, k_ok, patch_dim, eps)
        x = (x - mean[:, None]) * rstd[:, None]
        tl.store(patch_mean_ptr + rows, mean, mask=row_ok)
        tl.store(patch_rstd_ptr + rows, rstd, mask=row_ok)
    value_mask = row_ok[:, None] & k_ok[None, :]
    pred = tl.load(pred_ptr + rows[:, None] * patch_dim + k[None, :], mask=value_mask, other=0.0).to(tl.float32)
    diff = tl.where(value_mask, pred - x, 0.0)
    row_sq = tl.sum(diff * diff, axis=1)
    row_sq = tl.where(row_ok & ~id_ok, float("nan"), row_sq)
    tl.store(partial_ptr + pid, tl.sum(row_sq, axis=0))


@triton.jit
def masked_patch_loss_backward_kernel(grad_loss_ptr, pred_ptr, img_ptr, ids_ptr, mean_ptr, std_ptr,
                                      patch_mean_ptr, patch_rstd_ptr, grad_pred_ptr, inv_count,
                                      total_rows, rows_per_image, num_patches, grid_cols,
                                      stride_b, stride_c, stride_h, stride_w,
                                      PATCH: tl.constexpr, CHANNELS: tl.constexpr, IS_UINT8: tl.constexpr,
                                      HAS_STATS: tl.constexpr, NORM_PIX: tl.constexpr,
                                      BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """grad_pred = grad_loss * 2 * (pred - target) * inv_count, target rebuilt from the pixels and
    the saved per-row mean/rstd; written in pred's dtype for exactly the scored rows."""
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows, row_ok, id_ok, k, k_ok, channel, offsets = _patch_pixel_offsets(
        ids_ptr, row_start, total_rows, rows_per_image, num_patches, grid_cols,
        stride_b, stride_c, stride_h, stride_w, PATCH, CHANNELS, BLOCK_N, BLOCK_P)
    patch_dim: tl.constexpr = PATCH * PATCH * CHANNELS
    load_mask = id_ok[:, None] & k_ok[None, :]
    x = _load_normalised(img_ptr, offsets, load_mask, channel, k_ok, mean_ptr, std_ptr, IS_UINT8, HAS_STATS)
    if NORM_PIX:
        mean = tl.load(patch_mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(patch_rstd_ptr + rows, mask=row_ok, other=0.0)
        x = (x - mean[:, None]) * rstd[:, None]
    value_mask = row_ok[:, None] & k_ok[None, :]
    value_offsets = rows[:, None] * patch_dim + k[None, :]
    pred = tl.load(pred_ptr + value_offsets, mask=value_mask, other=0.0).to(tl.float32)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * 2.0 * inv_count
    grad = (pred - x) * scale
    grad = tl.where(id_ok[:, None], grad, 0.0)
    tl.store(grad_pred_ptr + value_offsets, grad.to(grad_pred_ptr.dtype.element_ty), mask=value_mask)


@triton.jit
def scatter_tokens_kernel(vis_ptr, ids_ptr, mask_token_ptr, pos_ptr, out_ptr,
                          total_rows, length, n_visible, dim,
                          stride_vb, stride_vn, stride_vd,
                          HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, l] = (vis[b, ids[b, l]] if ids[b, l] < n_visible else mask_token) (+ pos[l]).

    ids is (B, L) contiguous, flat row r = b * L + l; out (B, L, D) contiguous; mask_token (D,)
    and pos (L, D) contiguous; the pos addition is in fp32, rounded once to out's dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < total_rows
    d_ok = d < dim
    source = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    id_ok = (source >= 0) & (source < length)
    from_visible = id_ok & (source < n_visible)
    image = rows // length
    position = rows - image * length
    vis_offsets = image[:, None] * stride_vb + source[:, None] * stride_vn + d[None, :].to(tl.int64) * stride_vd
    vis_mask = (row_ok & from_visible)[:, None] & d_ok[None, :]
    token = tl.load(vis_ptr + vis_offsets, mask=vis_mask, other=0.0).to(tl.float32)
    mask_token = tl.load(mask_token_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    # the mask token is first rounded to the tokens' dtype, as the reference's cat does
    mask_token = mask_token.to(out_ptr.dtype.element_ty).to(tl.float32)
    value = tl.where(from_visible[:, None], token, mask_token[None, :])
    if HAS_POS:
        pos = tl.load(pos_ptr + position[:, None] * dim + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                      other=0.0).to(tl.float32)
        value = value + pos
    value = tl.where(id_ok[:, None], value, float("nan"))
    tl.store(out_ptr + rows[:, None] * dim + d[None, :], value.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def scatter_tokens_backward_kernel(grad_out_ptr, ids_ptr, grad_vis_ptr, mask_partial_ptr, pos_partial_ptr,
                                   batch, length, n_visible, dim,
                                   HAS_POS: tl.constexpr, BATCH_CHUNK: tl.constexpr,
                                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward of scatter_tokens for one (position block, D block, batch chunk):

    - grad_vis[b, ids[b, l]] += grad_out[b, l] for visible sources (fp32 atomics: duplicates add);
    - mask_partial[chunk * num_l_blocks + l_block] = sum over its masked (b, l) of grad_out (fp32);
    - pos_partial[chunk, l] = sum over its b of grad_out[b, l] (fp32), when HAS_POS.
    The host sums the partials over their first dimension (deterministic order)."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    positions = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok = positions < length
    d_ok = d < dim
    tile_ok = l_ok[:, None] & d_ok[None, :]
    mask_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    pos_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for step in range(BATCH_CHUNK):
        image = pid_b.to(tl.int64) * BATCH_CHUNK + step
        ok = l_ok & (image < batch)
        rows = image * length + positions
        source = tl.load(ids_ptr + rows, mask=ok, other=-1).to(tl.int64)
        id_ok = ok & (source >= 0) & (source < length)
        g = tl.load(grad_out_ptr + rows[:, None] * dim + d[None, :], mask=ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        from_visible = id_ok & (source < n_visible)
        vis_offsets = (image * n_visible + source)[:, None] * dim + d[None, :]
        tl.atomic_add(grad_vis_ptr + vis_offsets, g, mask=from_visible[:, None] & d_ok[None, :], sem="relaxed")
        mask_acc += tl.where((id_ok & (source >= n_visible))[:, None], g, 0.0)
        if HAS_POS:
            pos_acc += g
    num_l_blocks = tl.num_programs(0)
    mask_row = pid_b.to(tl.int64) * num_l_blocks + pid_l
    tl.store(mask_partial_ptr + mask_row * dim + d, tl.sum(mask_acc, axis=0), mask=d_ok)
    if HAS_POS:
        pos_rows = pid_b.to(tl.int64) * length + positions
        tl.store(pos_partial_ptr + pos_rows[:, None] * dim + d[None, :], pos_acc, mask=tile_ok)
