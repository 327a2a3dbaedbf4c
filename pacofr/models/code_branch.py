"""The codebook side of a PaCo-FR forward: beliefs, soft tokens, nearest-prototype labels (:class:`CodeBranch`),
and the detached statistics it leaves for the codebook maintenance (:func:`codebook_work`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pacofr.models.config import ModelConfig
from pacofr.models.maintenance import CodebookWork
from pacofr.models.masking import MaskSets
from pacofr.models.patch_codebook import PatchCodebook
from pacofr.ops import patch_targets
from pacofr.ops.soft_assign import SoftAssignment

# patches a forward keeps as seeds for new codes: at most max(4 K, 16384), a random subset
_SEED_CANDIDATES_PER_CODE, _SEED_CANDIDATES_MIN = 4, 16384


@dataclass
class CodeBranch:
    """Codebook-side tensors of one PaCo-FR forward."""

    tokens: torch.Tensor | None  # (B, n_rep, D) code2tok(e_soft)
    x_rep: torch.Tensor  # (B, n_rep, P) norm-pix targets of the replaced patches
    q_rep: torch.Tensor  # (B * n_rep, dc)
    assignment: SoftAssignment | None
    q_labelled: torch.Tensor | None = None  # (N, dc) beliefs with L_bp labels
    x_labelled: torch.Tensor | None = None  # (N, P)
    labels: torch.Tensor | None = None  # (N,) k* of the labelled patches (L_bp on)
    rep_labels: torch.Tensor | None = None  # (B * n_rep,) k* of the replaced patches (training)
    proto_x: torch.Tensor | None = None  # (N_p, P) patches whose k* update the prototype table (training)
    proto_labels: torch.Tensor | None = None  # (N_p,) their k*


def norm_pix(cfg: ModelConfig, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, n, P) fp32 per-patch normalised pixels of patches ``ids`` (B, n) of ``images`` (the Belief
    Predictor's input and prototype space)."""
    return patch_targets(images, ids, cfg.patch_size, norm_pix=True, eps=cfg.norm_pix_eps,
                         backend=cfg.backend, validate=False)


def code_branch(book: PatchCodebook, cfg: ModelConfig, images: torch.Tensor, masks: MaskSets, *, incubation: bool,
                training: bool) -> CodeBranch:
    """Beliefs, soft tokens and nearest-prototype labels: of the L_bp patches, and in training of
    the replaced patches (which score the Belief Predictor) and of the patches that update the
    prototype table (``proto_patches``). ``training``: the model's training flag."""
    batch = images.shape[0]
    n_rep = masks.ids_replaced.shape[1]
    needs_labels = incubation or (training and cfg.bp_after != "off")
    x_rep = norm_pix(cfg, images, masks.ids_replaced)
    labelled_all = needs_labels and cfg.incubation_patches == "all"
    table_all = training and book.has_table and cfg.proto_patches == "all"
    x_all = labels_all = None
    if labelled_all or table_all:
        all_ids = torch.arange(cfg.num_patches, device=images.device).expand(batch, -1)
        x_all = norm_pix(cfg, images, all_ids).reshape(-1, cfg.patch_dim)
        labels_all = book.nearest_prototype(x_all)
    if labelled_all:
        q_all = book.belief(x_all)  # (B * L, dc)
        index = (masks.ids_replaced + cfg.num_patches * torch.arange(batch, device=images.device)[:, None]).flatten()
        q_rep = q_all[index]
    else:
        q_rep = book.belief(x_rep).reshape(batch * n_rep, cfg.code_dim)
    ema_incubation = incubation and cfg.code_update == "ema"
    codes = book.codes(detach=ema_incubation)
    assignment, tokens = None, None
    if n_rep:
        assignment = book.soft_token(q_rep, codes)
        tokens = book.code2tok(assignment.token).view(batch, n_rep, -1)
    branch = CodeBranch(tokens=tokens, x_rep=x_rep, q_rep=q_rep, assignment=assignment)
    if needs_labels:
        branch.q_labelled = q_all if labelled_all else q_rep
        branch.x_labelled = x_all if labelled_all else x_rep.reshape(-1, cfg.patch_dim)
        branch.labels = labels_all if labelled_all else book.nearest_prototype(branch.x_labelled)
    if training:
        if labels_all is not None:
            branch.rep_labels = torch.gather(labels_all.view(batch, -1), 1, masks.ids_replaced).reshape(-1)
        elif branch.labels is not None:
            branch.rep_labels = branch.labels
        elif n_rep:
            branch.rep_labels = book.nearest_prototype(x_rep.reshape(-1, cfg.patch_dim))
        if labels_all is not None:
            branch.proto_x, branch.proto_labels = x_all, labels_all
        elif branch.labels is not None:
            branch.proto_x, branch.proto_labels = branch.x_labelled, branch.labels
        elif n_rep:
            branch.proto_x, branch.proto_labels = x_rep.reshape(-1, cfg.patch_dim), branch.rep_labels
    return branch


def codebook_work(book: PatchCodebook, cfg: ModelConfig, branch: CodeBranch, incubation: bool) -> CodebookWork | None:
    """The detached codebook statistics of a training forward for the maintenance after the
    optimiser step (None when the branch has no labelled patches). Draws the seed candidates'
    random subset from the global torch generator."""
    if branch.labels is not None:
        x, q, labels = branch.x_labelled, branch.q_labelled, branch.labels
    elif branch.rep_labels is not None:
        x, q, labels = branch.x_rep.reshape(-1, cfg.patch_dim), branch.q_rep, branch.rep_labels
    else:
        return None
    x, q = x.detach().float(), q.detach()
    proto = None
    if book.has_table and branch.proto_x is not None:  # non-finite rows count 0 and add 0 (0 * nan is nan)
        finite = torch.isfinite(branch.proto_x).all(dim=1)
        proto = book.prototype_stats(torch.where(finite[:, None], branch.proto_x, torch.zeros_like(branch.proto_x)),
                                     branch.proto_labels, finite.float())
    cap = max(_SEED_CANDIDATES_PER_CODE * cfg.codebook_size, _SEED_CANDIDATES_MIN)
    keep = torch.randperm(x.shape[0], device=x.device)[:cap]
    seeds = (q[keep], x[keep])
    if incubation or branch.assignment is None:
        return CodebookWork(labelled=True, q=q, indices=labels.unsqueeze(1), weights=None,
                            ema_codes=incubation and cfg.code_update == "ema", proto=proto, seeds=seeds,
                            incubation=incubation)
    return CodebookWork(labelled=False, q=branch.q_rep.detach(), indices=branch.assignment.indices,
                        weights=branch.assignment.weights.detach(), ema_codes=False, proto=proto, seeds=seeds,
                        incubation=incubation)
