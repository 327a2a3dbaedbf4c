"""PaCo-FR's codebook losses: L_bp (Belief Predictor against nearest-prototype labels), L_code (linear
prototypes), L_align (soft token's prototype against the patch), L_ent (usage entropy) and L_ctx
(context beliefs), method.md "Design"."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.models.code_branch import CodeBranch, norm_pix
from pacofr.models.codebook import Codebook
from pacofr.models.config import ModelConfig
from pacofr.models.masking import MaskSets
from pacofr.models.patch_codebook import PatchCodebook
from pacofr.ops.precision import full_precision


def bp_weight(cfg: ModelConfig, incubation: bool, post_incubation_steps: torch.Tensor) -> float | torch.Tensor:
    """Weight of L_bp: w_bp in incubation; afterwards 0 / decayed (by ``post_incubation_steps``, a 0-d
    int64 tensor) / small per ``bp_after``."""
    if incubation:
        return cfg.w_bp
    if cfg.bp_after == "decay":
        return cfg.w_bp * torch.pow(0.5, post_incubation_steps.float() / cfg.bp_decay_half_life)
    if cfg.bp_after == "keep_small":
        return cfg.bp_small_weight
    return 0.0


def codebook_losses(book: PatchCodebook, cfg: ModelConfig, branch: CodeBranch, incubation: bool,
                    post_incubation_steps: torch.Tensor, terms: dict[str, tuple[torch.Tensor, float | torch.Tensor]],
                    stats: dict[str, torch.Tensor]) -> None:
    """Add L_bp, L_code (incubation, linear prototypes), L_align (after), L_ent to ``terms`` as
    (value, weight) and the codebook statistics to ``stats``."""
    codes = book.codes(detach=incubation and cfg.code_update == "ema")
    weight = bp_weight(cfg, incubation, post_incubation_steps)
    if branch.labels is not None:
        bp_loss, stats["bp_accuracy"] = book.cross_entropy(branch.q_labelled, codes, branch.labels)
        terms["bp"] = (bp_loss, weight)
        protos = book.labelled_prototypes(branch.labels)
        with full_precision(protos.device):
            code_mse = F.mse_loss(protos, branch.x_labelled.float())
        stats["proto_mse"] = code_mse.detach()
        if incubation and not book.has_table:
            terms["code"] = (code_mse, cfg.w_code)
    elif branch.rep_labels is not None:
        with torch.no_grad(), full_precision(branch.x_rep.device):
            stats["proto_mse"] = F.mse_loss(book.labelled_prototypes(branch.rep_labels),
                                            branch.x_rep.reshape(-1, cfg.patch_dim).float())
    stats["bp_weight"] = torch.as_tensor(weight, dtype=torch.float32, device=branch.q_rep.device).detach()
    if branch.assignment is None:
        return
    x_rep = branch.x_rep.reshape(-1, cfg.patch_dim)
    if not incubation:
        protos = book.token_prototype(branch.assignment)
        with full_precision(protos.device):
            terms["align"] = (F.mse_loss(protos, x_rep.float()), cfg.w_align)
    if cfg.regularise_in_incubation or not incubation:
        mean_belief = book.mean_belief(branch.q_rep, codes)
        terms["ent"] = (math.log(cfg.codebook_size) - Codebook.usage_entropy(mean_belief), cfg.w_ent)
    with torch.no_grad():
        if branch.labels is not None:
            counts = torch.bincount(branch.labels, minlength=cfg.codebook_size).float()
        else:
            counts = torch.zeros(cfg.codebook_size, device=x_rep.device).index_add_(
                0, branch.assignment.indices.reshape(-1), branch.assignment.weights.reshape(-1))
        stats.update(book.usage_stats(counts))
        stats.update(book.assignment_stats(branch.assignment, branch.rep_labels, codes))


def context_loss(book: PatchCodebook, context_head: nn.Module, cfg: ModelConfig, images: torch.Tensor,
                 masks: MaskSets, hidden: torch.Tensor) -> torch.Tensor:
    """L_ctx (``bp_input="context"``): KL(pixel-BP beliefs || ``context_head`` beliefs of the decoder's
    ``hidden`` states (B, 1 + L, Dd)) at the masked patches. 0-d fp32."""
    if masks.ids_masked.shape[1] == 0:
        return hidden.float().sum() * 0.0
    codes = book.codes(detach=True)
    with torch.no_grad():
        q_target = book.belief(norm_pix(cfg, images, masks.ids_masked))
    index = masks.ids_masked.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    picked = torch.gather(hidden[:, 1:], 1, index)
    context = context_head(picked)
    with full_precision(context.device):
        q_ctx = F.normalize(context.float(), dim=-1)
    return book.belief_kl(q_ctx.flatten(0, 1), q_target.flatten(0, 1), codes)
