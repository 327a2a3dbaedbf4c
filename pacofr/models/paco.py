"""`PaCoFR`: PaCo-FR pre-training model (and the MAE-face control), method.md "Design".

One training forward:

1. sample the masked / replaced / visible sets (:func:`pacofr.masking.sample_masks`);
2. PaCo-FR with the codebook: Belief Predictor on the replaced patches' normalised pixels -> q ->
   top-M soft token e_soft (+ a straight-through path to q) -> ``code2tok(e_soft)``; the
   nearest-prototype labels k* (every patch in incubation, the replaced ones afterwards);
3. encoder (timm ViT) on visible pixel patches (gathered, embedded by the conv weights as a linear
   map) and replaced code tokens, each + its position; masked patches dropped (or a mask token);
4. MAE decoder (mask tokens by ``scatter_tokens``), prediction head on the scored patches only,
   ``masked_patch_loss`` (norm-pix target by default), weighted per patch (a replaced patch weighs
   ``alpha_rep`` times a masked one);
5. PaCo-FR only: incubation losses (L_bp, and L_code for linear prototypes) or end-to-end ones
   (L_align, optional decayed L_bp, context beliefs), usage-entropy bonus, and spatial
   consistency (region layout from the encoder, or relation / equivariance against the EMA teacher).

Codebook maintenance that modifies parameters and buffers in place (usage and prototype EMAs, EMA
codes, data initialisation, distinct dead-code restarts) and the teacher update happen after the
optimiser step, in the :class:`~pacofr.models.maintenance.CodebookMaintenance` that
:meth:`PaCoFR.step_maintenance` makes for the trainer, from the ``step_work`` of each forward.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.masking import MaskSets, sample_masks
from pacofr.models.belief import PatchCodebook
from pacofr.models.codebook import Codebook
from pacofr.models.config import ModelConfig
from pacofr.models.consistency import (
    LayoutHead,
    ema_update,
    equivariance_loss,
    layout_loss,
    make_teacher,
    random_similarity,
    relation_loss,
    warp,
)
from pacofr.models.decoder import MAEDecoder
from pacofr.models.maintenance import CodebookMaintenance, CodebookWork, TeacherUpdate
from pacofr.ops.precision import full_precision
from pacofr.models.vit import (
    add_positions,
    build_encoder,
    embed_patches,
    normalised_images,
    patch_positions,
    run_encoder,
)
from pacofr.ops import gather_patches, masked_patch_loss, patch_targets, scatter_tokens
from pacofr.ops._checks import check_tensor
from pacofr.ops.soft_assign import SoftAssignment

logger = logging.getLogger(__name__)

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")
# patches a forward keeps as seeds for new codes: at most max(4 K, 16384), a random subset
_SEED_CANDIDATES_PER_CODE, _SEED_CANDIDATES_MIN = 4, 16384


@dataclass
class ModelOutput:
    """Result of :meth:`PaCoFR.forward`.

    Attributes:
        loss: 0-d fp32 tensor with grad, the weighted sum of the active losses.
        losses: detached 0-d tensors of the active losses, unweighted (``rec``, ``rec_masked``,
            ``rec_replaced``, ``bp``, ``code``, ``align``, ``ent``, ``ctx``, ``sc``; which are present
            depends on the method and phase, see :meth:`PaCoFR.loss_names`).
        stats: detached 0-d tensors (:meth:`PaCoFR.stat_names`): codebook ``perplexity`` and
            ``usage_entropy_norm`` of this batch, ``bp_accuracy`` (with L_bp), ``bp_weight``,
            ``proto_mse`` (patches against their nearest prototype), the soft tokens'
            ``cand_entropy`` / ``cand_top1_weight`` / ``cand_dup_fraction`` and
            ``bp_top1_agreement`` (BP's top-1 code is the nearest prototype's), SC parts.

        step_work: the detached codebook statistics a training forward (``training`` and grad
            enabled) leaves for the maintenance after the optimiser step; None otherwise.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    step_work: CodebookWork | None = None


@dataclass
class _CodeBranch:
    """Codebook-side tensors of one forward (PaCo-FR only)."""

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


class PaCoFR(nn.Module):
    """PaCo-FR (``cfg.method="paco"``) or the MAE-face control (``"mae"``).

    Submodules: ``encoder`` (timm VisionTransformer, exportable as is), ``decoder``
    (:class:`MAEDecoder`); PaCo-FR adds ``patch_codebook`` (:class:`PatchCodebook`, unless
    ``codebook=False``), with ``sc="layout"`` ``layout_head`` (:class:`LayoutHead`), with
    ``sc="relation"`` or ``"equivariance"`` ``teacher`` (EMA copy of the encoder) and ``sc_proj``
    (Dd -> D); with ``bp_input="context"`` ``context_head`` (Dd -> dc); with
    ``encoder_mask="mask_token"`` ``encoder_mask_token`` (D,). Buffer ``post_incubation_steps``
    counts optimiser steps after incubation (for ``bp_after="decay"``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.decoder = MAEDecoder(cfg)
        self.encoder_mask_token = (nn.Parameter(torch.zeros(cfg.embed_dim))
                                   if cfg.encoder_mask == "mask_token" else None)
        if self.encoder_mask_token is not None:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.patch_codebook = PatchCodebook(cfg) if cfg.uses_codebook else None
        self.context_head = (nn.Linear(cfg.decoder_dim, cfg.code_dim)
                             if cfg.uses_codebook and cfg.bp_input == "context" else None)
        self.layout_head = (LayoutHead(cfg.embed_dim, cfg.num_regions, cfg.embed_dim)
                            if cfg.uses_layout else None)
        self.teacher = make_teacher(self.encoder) if cfg.uses_teacher else None
        self.sc_proj = nn.Linear(cfg.decoder_dim, cfg.embed_dim) if cfg.uses_teacher else None
        self.register_buffer("post_incubation_steps", torch.zeros((), dtype=torch.long))
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("PaCoFR(method=%s): %.2fM trainable parameters, %d patches of %d px",
                    cfg.method, trainable / 1e6, cfg.num_patches, cfg.patch_size)

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, region_ids: torch.Tensor, *, incubation: bool,
                generator: torch.Generator | None = None) -> ModelOutput:
        """Losses of one batch.

        Args:
            images: (B, 3, S, S) float in [0, 1], S = cfg.img_size.
            region_ids: (B, L) int64 region of every patch (row-major grid), L = (S / p)^2.
            incubation: True in the incubation phase (epoch 0): L_bp and L_code on, L_align off.
                Ignored by the MAE-face control.
            generator: torch.Generator for the masks and the equivariance transforms.
        """
        self._check_inputs(images, region_ids)
        cfg = self.cfg
        masks = sample_masks(region_ids, cfg, generator, validate=False)
        branch = self._code_branch(images, masks, incubation) if self.patch_codebook is not None else None
        latent = self._encode(images, masks, branch.tokens if branch is not None else None)
        hidden = self.decoder(latent, masks.ids_restore if cfg.encoder_mask == "drop" else None)

        terms: dict[str, tuple[torch.Tensor, float | torch.Tensor]] = {}
        losses: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        step_work = None
        terms["rec"] = (self._reconstruction_loss(images, masks, hidden, losses), 1.0)
        if branch is not None:
            self._codebook_losses(branch, incubation, terms, stats)
            if self.context_head is not None and not incubation:
                terms["ctx"] = (self._context_loss(images, masks, hidden), cfg.w_ctx)
            step_work = self._codebook_work(branch, incubation)
        if cfg.is_paco and cfg.sc != "off" and (cfg.regularise_in_incubation or not incubation):
            terms["sc"] = (self._consistency_loss(images, region_ids, masks, latent, hidden, generator, stats),
                           cfg.w_sc)

        loss = sum(weight * value for value, weight in terms.values())
        losses.update({name: value.detach() for name, (value, _) in terms.items()})
        return ModelOutput(loss=loss, losses=losses, stats=stats, step_work=step_work)

    def loss_names(self) -> tuple[str, ...]:
        """Every loss name :meth:`forward` may report for this config (for fixed CSV columns)."""
        names = ["rec", "rec_masked"]
        if self.patch_codebook is not None:
            names += ["rec_replaced", "bp", "align", "ent"]
            if not self.patch_codebook.has_table:
                names.append("code")
            if self.context_head is not None:
                names.append("ctx")
        if self.cfg.is_paco and self.cfg.sc != "off":
            names.append("sc")
        return tuple(names)

    def stat_names(self) -> tuple[str, ...]:
        """Every stat name :meth:`forward` may report for this config (the maintenance adds its own)."""
        names: list[str] = []
        if self.patch_codebook is not None:
            names += ["perplexity", "usage_entropy_norm", "bp_accuracy", "bp_weight", "proto_mse", "cand_entropy",
                      "cand_top1_weight", "cand_dup_fraction", "bp_top1_agreement"]
        if self.cfg.is_paco:
            names += {"layout": ["sc_layout"], "relation": ["sc_relation", "sc_cos"],
                      "equivariance": ["sc_overlap"], "off": []}[self.cfg.sc]
        return tuple(names)

    def step_maintenance(self) -> TeacherUpdate:
        """The between-steps work the trainer runs after every optimiser step: with the codebook a
        :class:`CodebookMaintenance` fed by each forward's ``step_work``, else the teacher's EMA step."""
        if self.patch_codebook is None:
            return TeacherUpdate(self.update_teacher)
        return CodebookMaintenance(self.patch_codebook, self.post_incubation_steps, self.update_teacher)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step of the teacher towards the encoder (no-op without a teacher)."""
        if self.teacher is not None:
            ema_update(self.teacher, self.encoder, momentum)

    def train(self, mode: bool = True) -> "PaCoFR":
        """As nn.Module.train, but the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the encoder blocks (timm's)."""
        self.encoder.set_grad_checkpointing(enable)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: ``weight_decay`` on weight matrices, none on norms, biases, positions,
        class / mask tokens and the codebook. Frozen parameters (teacher, fixed positions) are left out."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            skip = (param.ndim <= 1 or leaf in _NO_DECAY_NAMES
                    or name.startswith("patch_codebook.codebook."))
            (no_decay if skip else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, region_ids: torch.Tensor,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images for a reconstruction grid, all (B, 3, S, S) float32 in [0, 1].

        "input"; "corrupted": masked patches grey, replaced patches showing the pixel prototype
        of their soft token (de-normalised with the patch's own mean and std when prototypes are
        norm-pix), visible patches as they are; "reconstruction": predictions (de-normalised
        with each patch's own mean and std for the norm-pix target) with the visible patches pasted.
        Runs in eval mode (restored afterwards); no losses, no codebook bookkeeping.
        """
        self._check_inputs(images, region_ids)
        was_training = self.training
        self.eval()
        try:
            cfg = self.cfg
            masks = sample_masks(region_ids, cfg, generator, validate=False)
            branch = (self._code_branch(images, masks, incubation=False)
                      if self.patch_codebook is not None else None)
            latent = self._encode(images, masks, branch.tokens if branch is not None else None)
            hidden = self.decoder(latent, masks.ids_restore if cfg.encoder_mask == "drop" else None)
            batch, length = region_ids.shape
            all_ids = torch.arange(length, device=images.device).expand(batch, length)
            raw = gather_patches(images.float(), all_ids, cfg.patch_size, backend=cfg.backend, validate=False)
            mean = raw.mean(dim=-1, keepdim=True)
            scale = (raw.var(dim=-1, keepdim=True, correction=1) + cfg.norm_pix_eps).sqrt()
            pred = self.decoder.predict(hidden, all_ids).float()
            if cfg.target == "norm_pix":
                pred = pred * scale + mean
            membership = masks.membership().unsqueeze(-1)
            recon = torch.where(membership == 0, raw, pred)
            corrupted = torch.where(membership == 2, torch.full_like(raw, 0.5), raw)
            if branch is not None and branch.assignment is not None:
                protos = self.patch_codebook.token_prototype(branch.assignment).view(batch, -1, cfg.patch_dim)
                index = masks.ids_replaced.unsqueeze(-1).expand(-1, -1, cfg.patch_dim)
                shown = protos * torch.gather(scale, 1, index[..., :1]) + torch.gather(mean, 1, index[..., :1])
                corrupted = corrupted.scatter(1, index, shown)
            return {"input": images.float().clamp(0, 1),
                    "corrupted": self._unpatchify(corrupted).clamp(0, 1),
                    "reconstruction": self._unpatchify(recon).clamp(0, 1)}
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------
    # forward pieces
    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, images: torch.Tensor, region_ids: torch.Tensor) -> None:
        cfg = self.cfg
        check_tensor("images", images, ndim=4, dtypes=(torch.float32, torch.float16, torch.bfloat16))
        check_tensor("region_ids", region_ids, ndim=2, dtypes=(torch.int64,))
        want = (3, cfg.img_size, cfg.img_size)
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"images must have shape (B, {want[0]}, {want[1]}, {want[2]}) for img_size={cfg.img_size}, "
                             f"got {tuple(images.shape)}")
        if tuple(region_ids.shape) != (images.shape[0], cfg.num_patches):
            raise ValueError(f"region_ids must have shape (B, L) = ({images.shape[0]}, {cfg.num_patches}), "
                             f"got {tuple(region_ids.shape)}")
        if region_ids.device != images.device:
            raise ValueError(f"region_ids are on {region_ids.device} but images on {images.device}")

    def _norm_pix(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, n, P) fp32 per-patch normalised pixels (the Belief Predictor's input and prototype space)."""
        return patch_targets(images, ids, self.cfg.patch_size, norm_pix=True, eps=self.cfg.norm_pix_eps,
                             backend=self.cfg.backend, validate=False)

    def _bp_weight(self, incubation: bool) -> float | torch.Tensor:
        """Weight of L_bp: w_bp in incubation; afterwards 0 / decayed / small per ``bp_after``."""
        cfg = self.cfg
        if incubation:
            return cfg.w_bp
        if cfg.bp_after == "decay":
            return cfg.w_bp * torch.pow(0.5, self.post_incubation_steps.float() / cfg.bp_decay_half_life)
        if cfg.bp_after == "keep_small":
            return cfg.bp_small_weight
        return 0.0

    def _code_branch(self, images: torch.Tensor, masks: MaskSets, incubation: bool) -> _CodeBranch:
        """Beliefs, soft tokens and nearest-prototype labels: of the L_bp patches, and in training of
        the replaced patches (which score the Belief Predictor) and of the patches that update the
        prototype table (``proto_patches``)."""
        cfg, book = self.cfg, self.patch_codebook
        batch = images.shape[0]
        n_rep = masks.ids_replaced.shape[1]
        needs_labels = incubation or (self.training and cfg.bp_after != "off")
        x_rep = self._norm_pix(images, masks.ids_replaced)
        labelled_all = needs_labels and cfg.incubation_patches == "all"
        table_all = self.training and book.has_table and cfg.proto_patches == "all"
        x_all = labels_all = None
        if labelled_all or table_all:
            all_ids = torch.arange(cfg.num_patches, device=images.device).expand(batch, -1)
            x_all = self._norm_pix(images, all_ids).reshape(-1, cfg.patch_dim)
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
        branch = _CodeBranch(tokens=tokens, x_rep=x_rep, q_rep=q_rep, assignment=assignment)
        if needs_labels:
            branch.q_labelled = q_all if labelled_all else q_rep
            branch.x_labelled = x_all if labelled_all else x_rep.reshape(-1, cfg.patch_dim)
            branch.labels = labels_all if labelled_all else book.nearest_prototype(branch.x_labelled)
        if self.training:
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

    def _encode(self, images: torch.Tensor, masks: MaskSets, code_tokens: torch.Tensor | None) -> torch.Tensor:
        """Encoder output (B, 1 + n_keep, D) ("drop") or (B, 1 + L, D) ("mask_token")."""
        cfg = self.cfg
        pixels = gather_patches(images, masks.ids_visible, cfg.patch_size, mean=cfg.pixel_mean, std=cfg.pixel_std,
                                backend=cfg.backend, validate=False)
        tokens = embed_patches(self.encoder, pixels)
        if code_tokens is not None:
            tokens = torch.cat([tokens, code_tokens.to(tokens.dtype)], dim=1)
        if cfg.encoder_mask == "drop":
            return run_encoder(self.encoder, add_positions(self.encoder, tokens, masks.ids_keep))
        full = scatter_tokens(tokens, masks.ids_restore, self.encoder_mask_token,
                              pos_embed=patch_positions(self.encoder), backend=cfg.backend, validate=False)
        return run_encoder(self.encoder, full)

    def _reconstruction_loss(self, images: torch.Tensor, masks: MaskSets, hidden: torch.Tensor,
                             losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_rec: the weighted mean over the scored patches, weight 1 per masked patch and ``alpha_rep``
        per replaced one (whose own pixels built its input token); or the mean over all patches."""
        cfg = self.cfg
        norm_pix = cfg.target == "norm_pix"

        def mse(ids: torch.Tensor) -> torch.Tensor:
            return masked_patch_loss(self.decoder.predict(hidden, ids), images, ids, cfg.patch_size,
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

    def _codebook_losses(self, branch: _CodeBranch, incubation: bool,
                         terms: dict[str, tuple[torch.Tensor, float | torch.Tensor]],
                         stats: dict[str, torch.Tensor]) -> None:
        """L_bp, L_code (incubation, linear prototypes), L_align (after), L_ent, and the codebook statistics."""
        cfg, book = self.cfg, self.patch_codebook
        codes = book.codes(detach=incubation and cfg.code_update == "ema")
        bp_weight = self._bp_weight(incubation)
        if branch.labels is not None:
            bp_loss, stats["bp_accuracy"] = book.cross_entropy(branch.q_labelled, codes, branch.labels)
            terms["bp"] = (bp_loss, bp_weight)
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
        stats["bp_weight"] = torch.as_tensor(bp_weight, dtype=torch.float32, device=branch.q_rep.device).detach()
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

    def _context_loss(self, images: torch.Tensor, masks: MaskSets, hidden: torch.Tensor) -> torch.Tensor:
        """bp_input="context": KL(pixel-BP beliefs || context-head beliefs) at the masked patches."""
        book = self.patch_codebook
        if masks.ids_masked.shape[1] == 0:
            return hidden.float().sum() * 0.0
        codes = book.codes(detach=True)
        with torch.no_grad():
            q_target = book.belief(self._norm_pix(images, masks.ids_masked))
        index = masks.ids_masked.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        picked = torch.gather(hidden[:, 1:], 1, index)
        context = self.context_head(picked)
        with full_precision(context.device):
            q_ctx = F.normalize(context.float(), dim=-1)
        return book.belief_kl(q_ctx.flatten(0, 1), q_target.flatten(0, 1), codes)

    def _teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L, D) teacher patch features of full images (no gradient)."""
        with torch.no_grad():
            return self.teacher.forward_features(normalised_images(images, self.cfg))[:, 1:]

    def _consistency_loss(self, images: torch.Tensor, region_ids: torch.Tensor, masks: MaskSets,
                          latent: torch.Tensor, hidden: torch.Tensor, generator: torch.Generator | None,
                          stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_sc: region layout from the encoder's kept tokens, relation or equivariance (``cfg.sc``)."""
        cfg = self.cfg
        if cfg.sc == "layout":
            kept = latent[:, 1:]
            if cfg.encoder_mask == "mask_token":
                kept = torch.gather(kept, 1, masks.ids_keep.unsqueeze(-1).expand(-1, -1, kept.shape[-1]))
            predicted = self.layout_head(kept.mean(dim=1))
            loss, parts = layout_loss(predicted, region_ids, self.layout_head.pairs, cfg.grid_size, cfg.num_regions)
            stats.update(parts)
            return loss
        student = self.sc_proj(hidden[:, 1:])  # (B, L, D)
        if cfg.sc == "relation":
            loss, parts = relation_loss(student, self._teacher_features(images), region_ids, cfg.num_regions,
                                        masks.ids_masked, cfg.sc_beta)
        else:
            batch, grid = images.shape[0], cfg.grid_size
            theta = random_similarity(batch, cfg.eq_max_rotation, cfg.eq_max_scale, cfg.eq_max_shift,
                                      generator, images.device)
            with torch.no_grad(), full_precision(images.device):
                view = warp(images.float(), theta)
            teacher = self._teacher_features(view)

            def as_map(x: torch.Tensor) -> torch.Tensor:
                return x.transpose(1, 2).reshape(batch, -1, grid, grid)

            loss, parts = equivariance_loss(as_map(student), as_map(teacher), theta, cfg.eq_min_overlap)
        stats.update(parts)
        return loss

    def _codebook_work(self, branch: _CodeBranch, incubation: bool) -> CodebookWork | None:
        """The detached codebook statistics of a training forward for the maintenance after the
        optimiser step (None outside training or without grad)."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        book = self.patch_codebook
        if branch.labels is not None:
            x, q, labels = branch.x_labelled, branch.q_labelled, branch.labels
        elif branch.rep_labels is not None:
            x, q, labels = branch.x_rep.reshape(-1, self.cfg.patch_dim), branch.q_rep, branch.rep_labels
        else:
            return None
        x, q = x.detach().float(), q.detach()
        proto = None
        if book.has_table and branch.proto_x is not None:  # non-finite rows count 0 and add 0 (0 * nan is nan)
            finite = torch.isfinite(branch.proto_x).all(dim=1)
            proto = book.prototype_stats(torch.where(finite[:, None], branch.proto_x, torch.zeros_like(branch.proto_x)),
                                         branch.proto_labels, finite.float())
        cap = max(_SEED_CANDIDATES_PER_CODE * self.cfg.codebook_size, _SEED_CANDIDATES_MIN)
        keep = torch.randperm(x.shape[0], device=x.device)[:cap]
        seeds = (q[keep], x[keep])
        if incubation or branch.assignment is None:
            return CodebookWork(labelled=True, q=q, indices=labels.unsqueeze(1), weights=None,
                                ema_codes=incubation and self.cfg.code_update == "ema", proto=proto, seeds=seeds,
                                incubation=incubation)
        return CodebookWork(labelled=False, q=branch.q_rep.detach(), indices=branch.assignment.indices,
                            weights=branch.assignment.weights.detach(), ema_codes=False, proto=proto, seeds=seeds,
                            incubation=incubation)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, P) patches in (p, q, c) order -> (B, 3, S, S)."""
        cfg = self.cfg
        batch, g, p = patches.shape[0], cfg.grid_size, cfg.patch_size
        return patches.reshape(batch, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(batch, 3, g * p, g * p)
