"""Masked patch gathering for masked image modelling (MAE semantics), forward and backward.

Four public ops, each with ``backend="auto"|"torch"|"triton"|"cuda"``:

- :func:`gather_patches`: patchify + gather the patches listed in ``ids`` (+ uint8 scaling and
  per-channel mean/std normalisation), differentiable w.r.t. float images;
- :func:`patch_targets`: the MAE reconstruction targets of those patches (``norm_pix_loss``);
- :func:`masked_patch_loss`: the MAE loss on those patches, differentiable w.r.t. ``pred``;
- :func:`scatter_tokens`: the MAE decoder "unshuffle" (visible tokens + mask tokens, reordered
  by ``ids_restore``, + positional embedding), differentiable w.r.t. all three float inputs.

Conventions (those of facebookresearch/mae ``models_mae.py``):

- Patches of a (B, C, H, W) image are numbered row-major on the (H/p, W/p) grid:
  ``l = row * (W // p) + col``. H and W must be multiples of ``patch_size``: other sizes are
  rejected with a ValueError (no cropping, no padding).
- A patch vector has ``P = p * p * C`` values in (p, q, c) order, channel last, exactly as MAE's
  ``patchify``: value ``(py * p + px) * C + c`` is pixel ``(row * p + py, col * p + px)`` of
  channel ``c``.
- uint8 pixels are scaled by 1/255 first; ``mean``/``std`` (length C) then give
  ``(x - mean[c]) / std[c]``. Either may be given alone (the other defaults to 0 / 1). They are
  constants: no gradient flows to them.
- ``norm_pix``: per-patch mean and *unbiased* variance (divide by P - 1), target
  ``(x - mean) / sqrt(var + eps)``, all in fp32 whatever the pixel dtype. The variance is summed
  over the centred values scaled by their largest magnitude, so a tiny ``std`` (pixels of 1e20)
  neither overflows nor zeroes the targets; the normalised pixels themselves must be finite
  in fp32 (``|x - mean| / |std|`` below about 1e36).

Contract shared by the four ops (every backend): NaN or inf pixels propagate to the values
computed from them (their patch's targets and loss); an index out of range raises with
``validate`` (see below); duplicated indices are allowed (their gradients add up, in an
order-dependent rounding on the fused backends, which scatter by relaxed fp32 atomics); memory is
the outputs and, for the loss, O(B * n) per-patch statistics: never a full-image patchify nor an
index tensor expanded to the feature size; any image strides are read in place (cuda: contiguous
copies of the index tensors). Empty inputs (n = 0 or B = 0) give empty outputs (the loss: 0)
without running a kernel.

Index tensors may be int32 or int64. With ``validate=True`` (the default) every op checks that
the indices are in range, which costs one device->host synchronisation per call (a min/max
reduction over the index tensor; ``mean`` / ``std`` given as tensors are checked too (finite, std
non-zero), one more sync each; sequences are always checked, on the host);
pass ``validate=False`` in a hot loop whose indices are known to be good. With
``validate=False``, out-of-range indices give undefined results: the fused backends write NaN
rows (and drop their gradient), the torch backend may raise an indexing error or wrap negative
indices.

float64 inputs are accepted for checking (gradcheck, fp64 comparisons) and always run on the
torch backend; ``backend="auto"`` picks it for them, an explicit fused backend raises
:class:`~pacofr.ops.BackendUnavailableError`.

This module holds the public functions, their validation and the torch reference (backend
"torch", plain differentiable torch ops); the fused backends ("triton": ``pacofr.kernels.patches``,
"cuda": ``csrc/patches.cu``) and their autograd Functions live in :mod:`pacofr.ops._patches_fused`.
On CUDA tensors ``auto`` tries triton, then cuda, then torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from pacofr.ops.checks import check_int, check_same_device, check_tensor
from pacofr.ops._dispatch import get_op, register
from pacofr.ops._patches_fused import CUDA_KERNELS, TRITON_KERNELS, register_backend

IMAGE_DTYPES: tuple[torch.dtype, ...] = (torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)

ChannelStats = Union[Sequence[float], torch.Tensor, None]

__all__ = ["gather_patches", "patch_targets", "masked_patch_loss", "scatter_tokens"]


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchGrid:
    """Geometry of the patch grid of a (B, C, H, W) image batch."""

    batch: int
    channels: int
    patch_size: int
    rows: int
    cols: int

    @property
    def num_patches(self) -> int:
        """L, patches per image."""
        return self.rows * self.cols

    @property
    def patch_dim(self) -> int:
        """P = p * p * C, values per patch."""
        return self.patch_size * self.patch_size * self.channels


def _check_images(images: object, patch_size: object) -> PatchGrid:
    images = check_tensor("images", images, ndim=4, dtypes=IMAGE_DTYPES)
    p = check_int("patch_size", patch_size, low=1)
    batch, channels, height, width = images.shape
    if channels < 1:
        raise ValueError(f"images must have at least one channel, got shape {tuple(images.shape)}")
    if height % p or width % p:
        raise ValueError(
            f"images height and width must be multiples of patch_size={p}, got H={height}, W={width}; "
            "pacofr rejects other sizes (it does not crop or pad): resize or crop the images first")
    return PatchGrid(batch, channels, p, height // p, width // p)


def _check_index_range(name: str, ids: torch.Tensor, high: int, what: str) -> None:
    """Check 0 <= ids < high (one device->host sync)."""
    if ids.numel() == 0:
        return
    low_value, high_value = torch.stack([ids.min(), ids.max()]).tolist()
    if low_value < 0 or high_value >= high:
        raise IndexError(f"{name} must hold {what} in [0, {high}), got values in [{low_value}, {high_value}]")


def _check_ids(ids: object, grid: PatchGrid, images: torch.Tensor, validate: bool) -> torch.Tensor:
    ids = check_tensor("ids", ids, ndim=2, dtypes=INDEX_DTYPES)
    if ids.shape[0] != grid.batch:
        raise ValueError(f"ids must have shape (B, n) with B={grid.batch} (images' batch), got {tuple(ids.shape)}")
    check_same_device(images=images, ids=ids)
    if validate:
        _check_index_range("ids", ids, grid.num_patches,
                           f"patch indices of the {grid.rows}x{grid.cols} grid")
    return ids


def _channel_vector(name: str, value: ChannelStats, channels: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor | None:
    """A length-C sequence or tensor as a contiguous (C,) ``dtype`` tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float tensor, got dtype {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but images are on {device}; move them to the same device")
        vector = value.detach()
    else:
        try:
            vector = torch.tensor([float(v) for v in value], dtype=dtype, device=device)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of {channels} numbers or a tensor, got {value!r}") from None
    if vector.numel() != channels:
        raise ValueError(f"{name} must have one value per channel (C={channels}), got {vector.numel()} values")
    return vector.reshape(channels).to(dtype).contiguous()


def _check_stats(mean: ChannelStats, std: ChannelStats, grid: PatchGrid, images: torch.Tensor,
                 validate: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both channel vectors (defaults 0 and 1 when only one is given) or (None, None).

    They are fp32 (the precision of every fused kernel), float64 for float64 images."""
    if mean is None and std is None:
        return None, None
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    mean_vec = _channel_vector("mean", mean, grid.channels, images.device, dtype)
    std_vec = _channel_vector("std", std, grid.channels, images.device, dtype)
    if mean_vec is None:
        mean_vec = torch.zeros_like(std_vec)
    if std_vec is None:
        std_vec = torch.ones_like(mean_vec)
    # a sequence is checked on the host; a tensor costs one device->host sync (skipped without validate)
    if std is not None and (validate or not isinstance(std, torch.Tensor)):
        values = std_vec.tolist() if isinstance(std, torch.Tensor) else [float(v) for v in std]
        if any(v == 0 or not math.isfinite(v) for v in values):
            raise ValueError(f"std must be finite and non-zero, got {values}")
    if mean is not None and (validate or not isinstance(mean, torch.Tensor)):
        values = mean_vec.tolist() if isinstance(mean, torch.Tensor) else [float(v) for v in mean]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"mean must be finite, got {values}")
    return mean_vec, std_vec


def _check_eps(eps: object, norm_pix: bool) -> float:
    """With norm_pix, eps > 0: a constant patch has variance 0, and 0 / sqrt(0) has no value the
    backends could agree on (unused, and then any finite number, without norm_pix)."""
    number = not isinstance(eps, bool) and isinstance(eps, (int, float))
    if not (number and math.isfinite(eps) and (eps > 0 or not norm_pix)):
        raise ValueError(f"eps must be a finite number > 0 with norm_pix (the variance of a constant patch "
                         f"is 0), got {eps!r}")
    return float(eps)


def _check_norm_pix(norm_pix: object, grid: PatchGrid) -> bool:
    if not isinstance(norm_pix, bool):
        raise TypeError(f"norm_pix must be a bool, got {type(norm_pix).__name__}")
    if norm_pix and grid.patch_dim < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch for the unbiased variance, "
                         f"got P = patch_size**2 * C = {grid.patch_dim}")
    return norm_pix


def _resolve(op_name: str, backend: str, tensors: Sequence[torch.Tensor]) -> Callable:
    """The implementation to run; float64 data (``tensors``) go to the torch reference (module doc)."""
    float64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return get_op(op_name).implementation(
        backend, tensors, fused_refusal="does not take float64 inputs" if float64 else None)[1]


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def gather_patches(images: torch.Tensor, ids: torch.Tensor, patch_size: int, *, mean: ChannelStats = None,
                   std: ChannelStats = None, out_dtype: torch.dtype | None = None, backend: str = "auto",
                   validate: bool = True) -> torch.Tensor:
    """Patchify ``images`` and gather the patches ``ids``, normalised on the fly.

    Args:
        images: (B, C, H, W) uint8, float32, bfloat16 or float16 (float64 for checks); any strides.
            H and W must be multiples of ``patch_size`` (ValueError otherwise).
        ids: (B, n) int32 or int64 row-major patch indices in [0, (H/p) * (W/p)); duplicates allowed.
        patch_size: p.
        mean, std: optional length-C per-channel statistics (sequences or tensors);
            output ``(x - mean) / std`` with ``x`` the pixel (divided by 255 for uint8).
        out_dtype: a float dtype; default the images' dtype for float images, float32 for uint8.
        backend: "auto", "torch", "triton" or "cuda".
        validate: check the range of ``ids`` and that ``mean`` / ``std`` tensors are finite (std
            non-zero) (a device->host sync each); see the module doc. Sequences are always checked:
            a NaN or infinite mean, or a zero or non-finite std, raises a ValueError naming it.

    Returns:
        (B, n, p * p * C) patches in MAE ``patchify`` (p, q, c) order, dtype ``out_dtype``.
        Differentiable w.r.t. float ``images``: the gradient is scattered back to the pixels
        (duplicates in ``ids`` accumulate; unselected pixels get zero).
    """
    grid = _check_images(images, patch_size)
    ids = _check_ids(ids, grid, images, validate)
    mean_vec, std_vec = _check_stats(mean, std, grid, images, validate)
    if out_dtype is None:
        out_dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    fn = _resolve("gather_patches", backend, [images])
    return fn(images, ids, grid.patch_size, mean_vec, std_vec, out_dtype)


def patch_targets(images: torch.Tensor, ids: torch.Tensor, patch_size: int, *, norm_pix: bool = True,
                  eps: float = 1e-6, mean: ChannelStats = None, std: ChannelStats = None,
                  backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """MAE reconstruction targets of the patches ``ids`` (``norm_pix_loss`` when ``norm_pix``).

    Args:
        images, ids, patch_size, mean, std, backend, validate: as in :func:`gather_patches`.
        norm_pix: normalise each patch by its mean and unbiased variance (needs P >= 2).
        eps: added to the variance inside the square root (MAE: 1e-6); must be > 0 with
            ``norm_pix`` (a constant patch has variance 0), any finite number without it.

    Returns:
        (B, n, P) float32 (float64 for float64 images); a constant: no gradient flows to images.
    """
    grid = _check_images(images, patch_size)
    ids = _check_ids(ids, grid, images, validate)
    mean_vec, std_vec = _check_stats(mean, std, grid, images, validate)
    norm_pix = _check_norm_pix(norm_pix, grid)
    eps = _check_eps(eps, norm_pix)
    fn = _resolve("patch_targets", backend, [images])
    return fn(images.detach(), ids, grid.patch_size, norm_pix, eps, mean_vec, std_vec)


def masked_patch_loss(pred: torch.Tensor, images: torch.Tensor, ids: torch.Tensor, patch_size: int, *,
                      norm_pix: bool = True, eps: float = 1e-6, mean: ChannelStats = None,
                      std: ChannelStats = None, backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """MAE loss of predictions for the patches ``ids``: mean over patches of the per-patch MSE.

    ``loss = mean_{b, i} mean_k (pred[b, i, k] - target[b, i, k])**2`` with ``target`` from
    :func:`patch_targets`; math in fp32 for every input dtype. Equal to MAE's
    ``forward_loss`` when ``ids`` lists exactly the masked patches and ``pred`` holds the
    decoder predictions gathered at them.

    Args:
        pred: (B, n, P) float16, bfloat16 or float32 (float64 for checks) predictions.
        images, ids, patch_size, norm_pix, eps, mean, std, backend, validate: as in
            :func:`patch_targets`.

    Returns:
        A float32 scalar (float64 when ``pred`` is float64), differentiable w.r.t. ``pred`` only
        (the targets are constants). With no patch to score (B * n == 0) the loss is 0 and the
        gradient is empty (zero), rather than MAE's 0/0 = NaN.
    """
    grid = _check_images(images, patch_size)
    ids = _check_ids(ids, grid, images, validate)
    pred = check_tensor("pred", pred, ndim=3, dtypes=FLOAT_DTYPES)
    want = (grid.batch, ids.shape[1], grid.patch_dim)
    if tuple(pred.shape) != want:
        raise ValueError(f"pred must have shape (B, n, p*p*C) = {want} to match images and ids, "
                         f"got {tuple(pred.shape)}")
    check_same_device(images=images, pred=pred)
    mean_vec, std_vec = _check_stats(mean, std, grid, images, validate)
    norm_pix = _check_norm_pix(norm_pix, grid)
    eps = _check_eps(eps, norm_pix)
    out_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    if pred.numel() == 0:
        return pred.to(out_dtype).sum()
    fn = _resolve("masked_patch_loss", backend, [pred, images])
    return fn(pred, images.detach(), ids, grid.patch_size, norm_pix, eps, mean_vec, std_vec)


def scatter_tokens(visible_tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, *,
                   pos_embed: torch.Tensor | None = None, backend: str = "auto",
                   validate: bool = True) -> torch.Tensor:
    """MAE decoder unshuffle: visible tokens and mask tokens back in patch order, + pos_embed.

    ``x = cat([visible_tokens, mask_token expanded to (B, L - n_vis, D)], dim=1)``, then
    ``out[b, l] = x[b, ids_restore[b, l]] (+ pos_embed[l])``: position l receives visible token
    ``ids_restore[b, l]`` when that is < n_vis, the mask token otherwise. No cls token: slice it
    off before and concatenate it after (MAE does ``x[:, 1:]`` / ``cat([x[:, :1], out])``).

    Args:
        visible_tokens: (B, n_vis, D) float16, bfloat16 or float32 (float64 for checks).
        ids_restore: (B, L) int32 or int64 with values in [0, L), L >= n_vis; the inverse of the
            shuffle permutation in MAE (duplicates are allowed and accumulate in backward).
        mask_token: D values, shape (D,), (1, D) or (1, 1, D), any float dtype.
        pos_embed: optional (L, D) or (1, L, D), any float dtype.
        backend, validate: as in :func:`gather_patches` (validate checks ids_restore's range).

    Returns:
        (B, L, D) in ``visible_tokens``' dtype (the mask token and pos_embed are cast to it; the
        pos_embed addition runs in fp32 and is rounded once). Differentiable w.r.t.
        visible_tokens, mask_token (sum over all masked positions) and pos_embed (sum over B).
    """
    visible_tokens = check_tensor("visible_tokens", visible_tokens, ndim=3, dtypes=FLOAT_DTYPES)
    ids_restore = check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES)
    mask_token = check_tensor("mask_token", mask_token, ndim=(1, 2, 3), dtypes=FLOAT_DTYPES)
    batch, n_visible, dim = visible_tokens.shape
    if ids_restore.shape[0] != batch:
        raise ValueError(f"ids_restore must have shape (B, L) with B={batch} (visible_tokens' batch), "
                         f"got {tuple(ids_restore.shape)}")
    length = ids_restore.shape[1]
    if n_visible > length:
        raise ValueError(f"visible_tokens has n_vis={n_visible} tokens but ids_restore only L={length} "
                         "positions; need n_vis <= L")
    if mask_token.shape[-1] != dim or mask_token.numel() != dim:
        raise ValueError(f"mask_token must have shape (D,), (1, D) or (1, 1, D) with D={dim}, "
                         f"got {tuple(mask_token.shape)}")
    if pos_embed is not None:
        pos_embed = check_tensor("pos_embed", pos_embed, ndim=(2, 3), dtypes=FLOAT_DTYPES)
        if pos_embed.shape[-2:] != (length, dim) or pos_embed.numel() != length * dim:
            raise ValueError(f"pos_embed must have shape (L, D) or (1, L, D) = ({length}, {dim}), "
                             f"got {tuple(pos_embed.shape)}")
        pos_embed = pos_embed.reshape(length, dim)
    check_same_device(visible_tokens=visible_tokens, ids_restore=ids_restore, mask_token=mask_token,
                      pos_embed=pos_embed)
    if validate:
        _check_index_range("ids_restore", ids_restore, length, "token positions")
    fn = _resolve("scatter_tokens", backend, [visible_tokens])
    return fn(visible_tokens, ids_restore, mask_token.reshape(dim), pos_embed)


# ----------------------------------------------------------------------------------------------
# torch reference (backend "torch"): MAE semantics in plain differentiable torch ops
# ----------------------------------------------------------------------------------------------

def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _select_patches(images: torch.Tensor, ids: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, n, p, p, C) raw pixels of the patches ``ids``; copies only the selected patches."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    grid = images.reshape(batch, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    ids = ids.long()
    patch_row = torch.div(ids, cols, rounding_mode="floor")
    patch_col = ids - patch_row * cols
    batch_index = torch.arange(batch, device=images.device).unsqueeze(1)
    return grid[batch_index, patch_row, patch_col]


def _normalised_patches(images: torch.Tensor, ids: torch.Tensor, patch_size: int, mean: torch.Tensor | None,
                        std: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """(B, n, P) patches in ``compute_dtype``: x (/255 for uint8), then (x - mean) / std."""
    patches = _select_patches(images, ids, patch_size).to(compute_dtype)
    if images.dtype == torch.uint8:
        patches = patches / 255
    if mean is not None:
        patches = (patches - mean.to(compute_dtype)) / std.to(compute_dtype)
    return patches.flatten(2)


def _norm_pix(patches: torch.Tensor, eps: float) -> torch.Tensor:
    """MAE norm_pix_loss target: per-patch mean and unbiased variance, eps inside the sqrt.

    Computed on the centred values divided by their largest magnitude ``s`` per patch
    (``(c / s) / sqrt(sum (c / s)^2 / (P - 1) + eps / s / s)``, equal to ``c / sqrt(var + eps)``),
    so the squares neither overflow (pixels normalised by a tiny std) nor underflow, as the fused
    kernels do; ``s = 1`` for a constant patch."""
    if patches.numel() == 0:
        return patches
    centred = patches - patches.mean(dim=-1, keepdim=True)
    scale = centred.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = centred / scale
    var_scaled = scaled.square().sum(dim=-1, keepdim=True) / (patches.shape[-1] - 1)
    return scaled / (var_scaled + eps / scale / scale).sqrt()


@register("gather_patches", "torch")
def _gather_patches_torch(images: torch.Tensor, ids: torch.Tensor, patch_size: int, mean: torch.Tensor | None,
                          std: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    compute = _compute_dtype(images, mean)
    return _normalised_patches(images, ids, patch_size, mean, std, compute).to(out_dtype)


@register("patch_targets", "torch")
def _patch_targets_torch(images: torch.Tensor, ids: torch.Tensor, patch_size: int, norm_pix: bool, eps: float,
                         mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    patches = _normalised_patches(images, ids, patch_size, mean, std, _compute_dtype(images, mean))
    return _norm_pix(patches, eps) if norm_pix else patches


@register("masked_patch_loss", "torch")
def _masked_patch_loss_torch(pred: torch.Tensor, images: torch.Tensor, ids: torch.Tensor, patch_size: int,
                             norm_pix: bool, eps: float, mean: torch.Tensor | None,
                             std: torch.Tensor | None) -> torch.Tensor:
    compute = _compute_dtype(pred, images, mean)
    patches = _normalised_patches(images, ids, patch_size, mean, std, compute)
    target = _norm_pix(patches, eps) if norm_pix else patches
    per_patch = (pred.to(compute) - target).square().mean(dim=-1)
    out_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return per_patch.mean().to(out_dtype)


@register("scatter_tokens", "torch")
def _scatter_tokens_torch(visible_tokens: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                          pos_embed: torch.Tensor | None) -> torch.Tensor:
    batch, n_visible, dim = visible_tokens.shape
    length = ids_restore.shape[1]
    mask_tokens = mask_token.to(visible_tokens.dtype).reshape(1, 1, dim).expand(batch, length - n_visible, dim)
    tokens = torch.cat([visible_tokens, mask_tokens], dim=1)
    index = ids_restore.long().unsqueeze(-1).expand(batch, length, dim)
    out = torch.gather(tokens, 1, index)
    if pos_embed is None:
        return out
    compute = _compute_dtype(visible_tokens, pos_embed)
    return (out.to(compute) + pos_embed.to(compute)).to(visible_tokens.dtype)


register_backend(TRITON_KERNELS)
register_backend(CUDA_KERNELS)
