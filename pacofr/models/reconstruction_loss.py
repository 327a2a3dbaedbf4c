"""L_rec, the masked-patch reconstruction loss every method shares (MAE's, with PaCo-FR's replaced patches)."""

from __future__ import annotations

import torch

from pacofr.models.config import ModelConfig
from pacofr.models.decoder import MAEDecoder
from pacofr.models.masking import MaskSets
from pacofr.ops import masked_patch_loss


def reconstruction_loss(decoder: MAEDecoder, hidden: torch.Tensor, images: torch.Tensor, masks: MaskSets,
                        cfg: ModelConfig, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """L_rec (0-d fp32 with grad) of the decoder's ``hidden`` states (B, 1 + L, Dd) for ``images``
    (B, 3, S, S) in [0, 1].

    With ``cfg.rec_on="all"`` the mean over all patches; otherwise the weighted mean over the scored
    patches, weight 1 per masked patch and ``alpha_rep`` per replaced one (whose own pixels built its
    input token). The parts go into ``losses`` (detached): ``rec_masked``, and ``rec_replaced`` when
    patches were replaced. Targets are norm-pix with ``cfg.target="norm_pix"``.
    """
    norm_pix = cfg.target == "norm_pix"

    def mse(ids: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(decoder.predict(hidden, ids), images, ids, cfg.patch_size,
                                 norm_pix=norm_pix, eps=cfg.norm_pix_eps, backend=cfg.backend, validate=False)

    if cfg.rec_on == "all":
        batch, length = masks.ids_restore.shape
        return mse(torch.arange(length, device=images.device).expand(batch, length))
    rec_masked = mse(masks.ids_masked)
    losses["rec_masked"] = rec_masked.detach()
    n_masked, n_replaced = masks.ids_masked.shape[1], masks.ids_replaced.shape[1]
    if n_replaced == 0:
        return rec_masked
    rec_replaced = mse(masks.ids_replaced)
    losses["rec_replaced"] = rec_replaced.detach()
    share = cfg.alpha_rep * n_replaced / max(n_masked + cfg.alpha_rep * n_replaced, 1e-12)
    return (1.0 - share) * rec_masked + share * rec_replaced
