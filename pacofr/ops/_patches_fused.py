"""Fused backends ("triton", "cuda") of the masked patch ops in :mod:`pacofr.ops.patches`.

Each backend is a :class:`PatchKernels` bundle of launchers (forward and backward of every op),
the launcher pattern of every op (:mod:`pacofr.ops._launch`); the ``torch.autograd.Function``
classes below are shared by both backends and call the bundle they are given;
:func:`register_backend` registers a bundle's four ops (``patches.py`` calls it for both). Arguments arrive validated by the public functions (see ``patches.py``): float
images/tokens are float16/bfloat16/float32 (float64 never reaches this module), index tensors
int32/int64, per-channel ``mean``/``std`` contiguous fp32 (C,) tensors or both None, and the
``mask_token`` / ``pos_embed`` already reshaped to (D,) / (L, D).

No index tensor is ever expanded to the feature size; fused kernels take the image strides, so
non-contiguous images are read in place. Empty problems launch nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pacofr.ops._dispatch import register
from pacofr.ops._launch import cdiv, new_output, next_power_of_two


@dataclass(frozen=True)
class PatchTile:
    """Tile of the patch kernels: BLOCK_N patch rows x BLOCK_P (>= P) values, and warps."""

    block_n: int
    block_p: int
    num_warps: int

    @staticmethod
    def for_patch_dim(patch_dim: int, target_elements: int = 2048) -> "PatchTile":
        block_p = next_power_of_two(patch_dim)
        block_n = max(1, min(64, target_elements // block_p))
        elements = block_n * block_p
        return PatchTile(block_n, block_p, 8 if elements >= 4096 else 4)


@dataclass(frozen=True)
class PatchKernels:
    """Launchers of one fused backend. Shapes: images (B, C, H, W), ids (B, n), P = p*p*C."""

    name: str
    # (images, ids, p, mean, std, out_dtype) -> (B, n, P) out_dtype
    gather: Callable[..., torch.Tensor]
    # (grad_out (B, n, P), ids, p, std, images) -> fp32 gradient shaped like images
    gather_backward: Callable[..., torch.Tensor]
    # (images, ids, p, norm_pix, eps, mean, std) -> (B, n, P) fp32
    targets: Callable[..., torch.Tensor]
    # (pred, images, ids, p, norm_pix, eps, mean, std) -> (loss fp32 scalar, patch_mean, patch_rstd)
    loss_forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # (grad_loss, pred, images, ids, p, norm_pix, mean, std, patch_mean, patch_rstd) -> grad_pred
    loss_backward: Callable[..., torch.Tensor]
    # (visible (B, n_vis, D), ids_restore (B, L), mask_token (D,), pos (L, D) | None) -> (B, L, D)
    scatter: Callable[..., torch.Tensor]
    # (grad_out (B, L, D), ids_restore, n_visible, has_pos) -> fp32 (grad_vis, grad_mask (D,), grad_pos | None)
    scatter_backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


# ----------------------------------------------------------------------------------------------
# autograd Functions (shared by the fused backends)
# ----------------------------------------------------------------------------------------------

class _GatherPatchesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, ids, patch_size, mean, std, out_dtype, kernels):  # noqa: D102
        ctx.save_for_backward(ids, std)
        ctx.patch_size, ctx.kernels = patch_size, kernels
        ctx.image_meta = images.detach()  # the gradient takes its shape, dtype and layout
        return kernels.gather(images, ids, patch_size, mean, std, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        ids, std = ctx.saved_tensors
        grad_images = None
        if ctx.needs_input_grad[0]:
            images = ctx.image_meta
            grad = ctx.kernels.gather_backward(grad_out, ids, ctx.patch_size, std, images)
            grad_images = grad.to(images.dtype)
        return grad_images, None, None, None, None, None, None


class _MaskedPatchLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, images, ids, patch_size, norm_pix, eps, mean, std, kernels):  # noqa: D102
        loss, patch_mean, patch_rstd = kernels.loss_forward(pred, images, ids, patch_size, norm_pix, eps, mean, std)
        ctx.save_for_backward(pred, images, ids, mean, std, patch_mean, patch_rstd)
        ctx.patch_size, ctx.norm_pix, ctx.kernels = patch_size, norm_pix, kernels
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        pred, images, ids, mean, std, patch_mean, patch_rstd = ctx.saved_tensors
        grad_pred = None
        if ctx.needs_input_grad[0]:
            grad_pred = ctx.kernels.loss_backward(grad_loss, pred, images, ids, ctx.patch_size, ctx.norm_pix,
                                                  mean, std, patch_mean, patch_rstd)
        return grad_pred, None, None, None, None, None, None, None, None


class _ScatterTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, visible, ids_restore, mask_token, pos_embed, kernels):  # noqa: D102
        ctx.save_for_backward(ids_restore)
        ctx.kernels = kernels
        ctx.n_visible = visible.shape[1]
        ctx.dtypes = (visible.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)
        return kernels.scatter(visible, ids_restore, mask_token, pos_embed)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (ids_restore,) = ctx.saved_tensors
        vis_dtype, mask_dtype, pos_dtype = ctx.dtypes
        grad_vis, grad_mask, grad_pos = ctx.kernels.scatter_backward(
            grad_out, ids_restore, ctx.n_visible, pos_dtype is not None)
        return (grad_vis.to(vis_dtype), None, grad_mask.to(mask_dtype),
                None if grad_pos is None else grad_pos.to(pos_dtype), None)


def register_backend(kernels: PatchKernels) -> None:
    """Register the four public ops of one fused backend."""

    @register("gather_patches", kernels.name)
    def gather_patches(images, ids, patch_size, mean, std, out_dtype):
        return _GatherPatchesFunction.apply(images, ids, patch_size, mean, std, out_dtype, kernels)

    @register("patch_targets", kernels.name)
    def patch_targets(images, ids, patch_size, norm_pix, eps, mean, std):
        return kernels.targets(images, ids, patch_size, norm_pix, eps, mean, std)

    @register("masked_patch_loss", kernels.name)
    def masked_patch_loss(pred, images, ids, patch_size, norm_pix, eps, mean, std):
        return _MaskedPatchLossFunction.apply(pred, images, ids, patch_size, norm_pix, eps, mean, std, kernels)

    @register("scatter_tokens", kernels.name)
    def scatter_tokens(visible, ids_restore, mask_token, pos_embed):
        # the kernels read float16/bfloat16/float32 parameters: a float64 one is cast (differentiably)
        mask_token = mask_token.float() if mask_token.dtype == torch.float64 else mask_token
        if pos_embed is not None and pos_embed.dtype == torch.float64:
            pos_embed = pos_embed.float()
        return _ScatterTokensFunction.apply(visible, ids_restore, mask_token, pos_embed, kernels)


# ----------------------------------------------------------------------------------------------
# triton launchers
# ----------------------------------------------------------------------------------------------

def _triton_patch_args(images: torch.Tensor, ids: torch.Tensor, patch_size: int) -> tuple:
    """Runtime geometry arguments shared by the patch kernels (after the pointers)."""
    grid_cols = images.shape[3] // patch_size
    num_patches = (images.shape[2] // patch_size) * grid_cols
    return (ids.numel(), ids.shape[1], num_patches, grid_cols, *images.stride())


def _stats_pointers(mean: torch.Tensor | None, std: torch.Tensor | None, device: torch.device) -> tuple:
    if mean is None:
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return dummy, dummy
    return mean, std


def _triton_gather(images, ids, patch_size, mean, std, out_dtype):
    from pacofr.kernels import patches as kernels

    batch, channels = images.shape[:2]
    patch_dim = patch_size * patch_size * channels
    out = new_output((batch, ids.shape[1], patch_dim), out_dtype, images.device)
    if out.numel() == 0:
        return out
    ids = ids.contiguous()
    tile = PatchTile.for_patch_dim(patch_dim)
    mean_ptr, std_ptr = _stats_pointers(mean, std, images.device)
    grid = (cdiv(ids.numel(), tile.block_n),)
    kernels.gather_patches_kernel[grid](
        images, ids, mean_ptr, std_ptr, out, *_triton_patch_args(images, ids, patch_size),
        PATCH=patch_size, CHANNELS=channels, IS_UINT8=images.dtype == torch.uint8, HAS_STATS=mean is not None,
        BLOCK_N=tile.block_n, BLOCK_P=tile.block_p, num_warps=tile.num_warps)
    return out


def _triton_gather_backward(grad_out, ids, patch_size, std, images):
    from pacofr.kernels import patches as kernels

    grad_images = torch.zeros_like(images, dtype=torch.float32)
    if grad_out.numel() == 0:
        return grad_images
    grad_out = grad_out.contiguous()
    ids = ids.contiguous()
    channels = images.shape[1]
    tile = PatchTile.for_patch_dim(patch_size * patch_size * channels)
    std_ptr = std if std is not None else _stats_pointers(None, None, images.device)[1]
    grid = (cdiv(ids.numel(), tile.block_n),)
    kernels.gather_patches_backward_kernel[grid](
        grad_out, ids, std_ptr, grad_images, *_triton_patch_args(grad_images, ids, patch_size),
        PATCH=patch_size, CHANNELS=channels, HAS_STATS=std is not None,
        BLOCK_N=tile.block_n, BLOCK_P=tile.block_p, num_warps=tile.num_warps)
    return grad_images


def _triton_targets(images, ids, patch_size, norm_pix, eps, mean, std):
    from pacofr.kernels import patches as kernels

    batch, channels = images.shape[:2]
    patch_dim = patch_size * patch_size * channels
    out = new_output((batch, ids.shape[1], patch_dim), torch.float32, images.device)
    if out.numel() == 0:
        return out
    ids = ids.contiguous()
    tile = PatchTile.for_patch_dim(patch_dim)
    mean_ptr, std_ptr = _stats_pointers(mean, std, images.device)
    grid = (cdiv(ids.numel(), tile.block_n),)
    kernels.patch_targets_kernel[grid](
        images, ids, mean_ptr, std_ptr, out, eps, *_triton_patch_args(images, ids, patch_size),
        PATCH=patch_size, CHANNELS=channels, IS_UINT8=images.dtype == torch.uint8, HAS_STATS=mean is not None,
        NORM_PIX=norm_pix, BLOCK_N=tile.block_n, BLOCK_P=tile.block_p, num_warps=tile.num_warps)
    return out


def _triton_loss_forward(pred, images, ids, patch_size, norm_pix, eps, mean, std):
    from pacofr.kernels import patches as kernels

    channels = images.shape[1]
    patch_dim = patch_size * patch_size * channels
    rows = ids.numel()
    ids = ids.contiguous()
    pred = pred.contiguous()
    tile = PatchTile.for_patch_dim(patch_dim)
    num_programs = cdiv(rows, tile.block_n)
    partial = new_output((num_programs,), torch.float32, images.device)
    stats_shape = (rows,) if norm_pix else (1,)
    patch_mean = new_output(stats_shape, torch.float32, images.device)
    patch_rstd = new_output(stats_shape, torch.float32, images.device)
    mean_ptr, std_ptr = _stats_pointers(mean, std, images.device)
    kernels.masked_patch_loss_kernel[(num_programs,)](
        pred, images, ids, mean_ptr, std_ptr, partial, patch_mean, patch_rstd, eps,
        *_triton_patch_args(images, ids, patch_size),
        PATCH=patch_size, CHANNELS=channels, IS_UINT8=images.dtype == torch.uint8, HAS_STATS=mean is not None,
        NORM_PIX=norm_pix, BLOCK_N=tile.block_n, BLOCK_P=tile.block_p, num_warps=tile.num_warps)
    loss = partial.sum() / (rows * patch_dim)
    return loss, patch_mean, patch_rstd


def _triton_loss_backward(grad_loss, pred, images, ids, patch_size, norm_pix, mean, std, patch_mean, patch_rstd):
    from pacofr.kernels import patches as kernels

    channels = images.shape[1]
    patch_dim = patch_size * patch_size * channels
    rows = ids.numel()
    ids = ids.contiguous()
    pred = pred.contiguous()
    grad_pred = new_output(tuple(pred.shape), pred.dtype, pred.device)
    tile = PatchTile.for_patch_dim(patch_dim)
    mean_ptr, std_ptr = _stats_pointers(mean, std, images.device)
    grid = (cdiv(rows, tile.block_n),)
    kernels.masked_patch_loss_backward_kernel[grid](
        grad_loss.contiguous(), pred, images, ids, mean_ptr, std_ptr, patch_mean, patch_rstd, grad_pred,
        1.0 / (rows * patch_dim), *_triton_patch_args(images, ids, patch_size),
        PATCH=patch_size, CHANNELS=channels, IS_UINT8=images.dtype == torch.uint8, HAS_STATS=mean is not None,
        NORM_PIX=norm_pix, BLOCK_N=tile.block_n, BLOCK_P=tile.block_p, num_warps=tile.num_warps)
    return grad_pred


@dataclass(frozen=True)
class TokenTile:
    """Tile of the token kernels: BLOCK_R rows (or positions) x BLOCK_D features, and warps."""

    block_rows: int
    block_d: int
    num_warps: int

    @staticmethod
    def for_dim(dim: int, target_elements: int = 4096, max_rows: int = 64) -> "TokenTile":
        block_d = min(256, next_power_of_two(dim))
        block_rows = max(1, min(max_rows, target_elements // block_d))
        return TokenTile(block_rows, block_d, 4)


def _triton_scatter(visible, ids_restore, mask_token, pos_embed):
    from pacofr.kernels import patches as kernels

    batch, n_visible, dim = visible.shape
    length = ids_restore.shape[1]
    out = new_output((batch, length, dim), visible.dtype, visible.device)
    if out.numel() == 0:
        return out
    ids_restore = ids_restore.contiguous()
    mask_token = mask_token.contiguous()
    pos = pos_embed.contiguous() if pos_embed is not None else mask_token
    tile = TokenTile.for_dim(dim)
    grid = (cdiv(batch * length, tile.block_rows), cdiv(dim, tile.block_d))
    kernels.scatter_tokens_kernel[grid](
        visible, ids_restore, mask_token, pos, out, batch * length, length, n_visible, dim, *visible.stride(),
        HAS_POS=pos_embed is not None, BLOCK_R=tile.block_rows, BLOCK_D=tile.block_d, num_warps=tile.num_warps)
    return out


SCATTER_BATCH_CHUNK = 8  # images per program in the scatter backward (bounds the partial sums)


def _triton_scatter_backward(grad_out, ids_restore, n_visible, has_pos):
    from pacofr.kernels import patches as kernels

    batch, length, dim = grad_out.shape
    device = grad_out.device
    grad_vis = torch.zeros((batch, n_visible, dim), dtype=torch.float32, device=device)
    if batch * length == 0 or dim == 0:
        grad_pos = torch.zeros((length, dim), dtype=torch.float32, device=device) if has_pos else None
        return grad_vis, torch.zeros(dim, dtype=torch.float32, device=device), grad_pos
    grad_out = grad_out.contiguous()
    ids_restore = ids_restore.contiguous()
    tile = TokenTile.for_dim(dim, target_elements=2048, max_rows=16)
    num_l_blocks = cdiv(length, tile.block_rows)
    num_chunks = cdiv(batch, SCATTER_BATCH_CHUNK)
    mask_partial = new_output((num_chunks * num_l_blocks, dim), torch.float32, device)
    pos_partial = new_output((num_chunks, length, dim), torch.float32, device) if has_pos else mask_partial
    grid = (num_l_blocks, cdiv(dim, tile.block_d), num_chunks)
    kernels.scatter_tokens_backward_kernel[grid](
        grad_out, ids_restore, grad_vis, mask_partial, pos_partial, batch, length, n_visible, dim,
        HAS_POS=has_pos, BATCH_CHUNK=SCATTER_BATCH_CHUNK, BLOCK_L=tile.block_rows, BLOCK_D=tile.block_d,
        num_warps=tile.num_warps)
    grad_pos = pos_partial.sum(dim=0) if has_pos else None
    return grad_vis, mask_partial.sum(dim=0), grad_pos


TRITON_KERNELS = PatchKernels(
    name="triton",
    gather=_triton_gather,
    gather_backward=_triton_gather_backward,
    targets=_triton_targets,
    loss_forward=_triton_loss_forward,
    loss_backward=_triton_loss_backward,
    scatter=_triton_scatter,
    scatter_backward=_triton_scatter_backward,
)


# ----------------------------------------------------------------------------------------------
# cuda launchers (csrc/patches.cu, torch.ops.pacofr_cuda.*)
# ----------------------------------------------------------------------------------------------

def _cuda_ops():
    return torch.ops.pacofr_cuda


def _cuda_gather(images, ids, patch_size, mean, std, out_dtype):
    return _cuda_ops().gather_patches(images, ids, patch_size, mean, std, out_dtype)


def _cuda_gather_backward(grad_out, ids, patch_size, std, images):
    return _cuda_ops().gather_patches_backward(grad_out, ids, patch_size, std, images)


def _cuda_targets(images, ids, patch_size, norm_pix, eps, mean, std):
    return _cuda_ops().patch_targets(images, ids, patch_size, norm_pix, eps, mean, std)


def _cuda_loss_forward(pred, images, ids, patch_size, norm_pix, eps, mean, std):
    return _cuda_ops().masked_patch_loss(pred, images, ids, patch_size, norm_pix, eps, mean, std)


def _cuda_loss_backward(grad_loss, pred, images, ids, patch_size, norm_pix, mean, std, patch_mean, patch_rstd):
    return _cuda_ops().masked_patch_loss_backward(grad_loss, pred, images, ids, patch_size, norm_pix, mean, std,
                                                  patch_mean, patch_rstd)


def _cuda_scatter(visible, ids_restore, mask_token, pos_embed):
    return _cuda_ops().scatter_tokens(visible, ids_restore, mask_token, pos_embed)


def _cuda_scatter_backward(grad_out, ids_restore, n_visible, has_pos):
    grad_vis, grad_mask, grad_pos = _cuda_ops().scatter_tokens_backward(grad_out, ids_restore, n_visible, has_pos)
    return grad_vis, grad_mask, grad_pos if has_pos else None


CUDA_KERNELS = PatchKernels(
    name="cuda",
    gather=_cuda_gather,
    gather_backward=_cuda_gather_backward,
    targets=_cuda_targets,
    loss_forward=_cuda_loss_forward,
    loss_backward=_cuda_loss_backward,
    scatter=_cuda_scatter,
    scatter_backward=_cuda_scatter_backward,
)
