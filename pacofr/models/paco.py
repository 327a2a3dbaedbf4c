"""`PaCoFR`: PaCo-FR pre-training, MAE-face (:class:`~pacofr.models.mae.MAEFace`) plus a patch codebook and
spatial consistency (method.md "Design").

One training forward:

1. masks: the masked / replaced / visible sets (:func:`pacofr.models.masking.sample_masks`);
2. replace: with the codebook, the Belief Predictor's beliefs q of the replaced patches' normalised
   pixels -> top-M soft token -> ``code2tok`` (:func:`pacofr.models.code_branch.code_branch`);
3. encode the visible pixel patches and the replaced patches' code tokens, decode with mask tokens;
4. loss: L_rec (:mod:`pacofr.models.reconstruction_loss`, a replaced patch weighing ``alpha_rep``
   times a masked one), the codebook losses (:mod:`pacofr.models.codebook_losses`: incubation's L_bp
   and L_code, then L_align, optional decayed L_bp, context beliefs, usage-entropy bonus) and spatial
   consistency (:func:`pacofr.models.consistency.spatial_consistency_loss`).

The codebook maintenance that modifies parameters and buffers in place (usage and prototype EMAs,
EMA codes, data initialisation, distinct dead-code restarts) and the teacher update happen after
the optimiser step, in the :class:`~pacofr.models.maintenance.CodebookMaintenance` that
:meth:`PaCoFR.step_maintenance` makes for the trainer, from the ``step_work`` of each forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pacofr.models.code_branch import code_branch, codebook_work
from pacofr.models.codebook_losses import codebook_losses, context_loss
from pacofr.models.config import ModelConfig
from pacofr.models.consistency import LayoutHead, ema_update, make_teacher, spatial_consistency_loss
from pacofr.models.mae import MAEFace
from pacofr.models.maintenance import CodebookMaintenance, TeacherUpdate
from pacofr.models.masking import MaskSets, sample_masks
from pacofr.models.output import ModelOutput
from pacofr.models.patch_codebook import PatchCodebook
from pacofr.models.reconstruction_loss import reconstruction_loss

logger = logging.getLogger(__name__)


class PaCoFR(MAEFace):
    """PaCo-FR (``cfg.method="paco"``).

    Submodules: those of :class:`MAEFace` (``encoder``, ``decoder``, ``encoder_mask_token``), plus
    ``patch_codebook`` (:class:`PatchCodebook`, unless ``codebook=False``), with ``sc="layout"``
    ``layout_head`` (:class:`LayoutHead`), with ``sc="relation"`` or ``"equivariance"`` ``teacher``
    (EMA copy of the encoder) and ``sc_proj`` (Dd -> D); with ``bp_input="context"``
    ``context_head`` (Dd -> dc). Buffer ``post_incubation_steps`` counts optimiser steps after
    incubation (for ``bp_after="decay"``).
    """

    table_prefixes = ("patch_codebook.codebook.",)

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.method != "paco":
            raise ValueError(f"PaCoFR needs cfg.method='paco', got {cfg.method!r} (build_model builds the model "
                             "of any method)")
        super().__init__(cfg)
        self.patch_codebook = PatchCodebook(cfg) if cfg.uses_codebook else None
        self.context_head = (nn.Linear(cfg.decoder_dim, cfg.code_dim)
                             if cfg.uses_codebook and cfg.bp_input == "context" else None)
        self.layout_head = (LayoutHead(cfg.embed_dim, cfg.num_regions, cfg.embed_dim)
                            if cfg.uses_layout else None)
        self.teacher = make_teacher(self.encoder) if cfg.uses_teacher else None
        self.sc_proj = nn.Linear(cfg.decoder_dim, cfg.embed_dim) if cfg.uses_teacher else None
        self.register_buffer("post_incubation_steps", torch.zeros((), dtype=torch.long))

    def forward(self, images: torch.Tensor, region_ids: torch.Tensor, *, incubation: bool,
                generator: torch.Generator | None = None) -> ModelOutput:
        """Losses of one batch.

        Args:
            images: (B, 3, S, S) float in [0, 1], S = cfg.img_size.
            region_ids: (B, L) int64 region of every patch (row-major grid), L = (S / p)^2.
            incubation: True in the incubation phase (epoch 0): L_bp and L_code on, L_align off.
            generator: torch.Generator for the masks and the equivariance transforms.
        """
        self._check_inputs(images, region_ids)
        cfg, book = self.cfg, self.patch_codebook
        masks = sample_masks(region_ids, cfg, generator, validate=False)
        branch = (code_branch(book, cfg, images, masks, incubation=incubation, training=self.training)
                  if book is not None else None)
        latent = self.encode(images, masks, branch.tokens if branch is not None else None)
        hidden = self.decode(latent, masks)

        terms: dict[str, tuple[torch.Tensor, float | torch.Tensor]] = {}
        losses: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        step_work = None
        terms["rec"] = (reconstruction_loss(self.decoder, hidden, images, masks, cfg, losses), 1.0)
        if branch is not None:
            codebook_losses(book, cfg, branch, incubation, self.post_incubation_steps, terms, stats)
            if self.context_head is not None and not incubation:
                terms["ctx"] = (context_loss(book, self.context_head, cfg, images, masks, hidden), cfg.w_ctx)
            if self.training and torch.is_grad_enabled():
                step_work = codebook_work(book, cfg, branch, incubation)
        if cfg.sc != "off" and (cfg.regularise_in_incubation or not incubation):
            terms["sc"] = (spatial_consistency_loss(cfg, images, region_ids, masks, latent, hidden, generator, stats,
                                                    layout_head=self.layout_head, sc_proj=self.sc_proj,
                                                    teacher=self.teacher), cfg.w_sc)

        loss = sum(weight * value for value, weight in terms.values())
        losses.update({name: value.detach() for name, (value, _) in terms.items()})
        return ModelOutput(loss=loss, losses=losses, stats=stats, step_work=step_work)

    def loss_names(self) -> tuple[str, ...]:
        """Every loss name :meth:`forward` may report for this config (for fixed CSV columns)."""
        names = list(super().loss_names())
        if self.patch_codebook is not None:
            names += ["rec_replaced", "bp", "align", "ent"]
            if not self.patch_codebook.has_table:
                names.append("code")
            if self.context_head is not None:
                names.append("ctx")
        if self.cfg.sc != "off":
            names.append("sc")
        return tuple(names)

    def stat_names(self) -> tuple[str, ...]:
        """Every stat name :meth:`forward` may report for this config (the maintenance adds its own)."""
        names: list[str] = []
        if self.patch_codebook is not None:
            names += ["perplexity", "usage_entropy_norm", "bp_accuracy", "bp_weight", "proto_mse", "cand_entropy",
                      "cand_top1_weight", "cand_dup_fraction", "bp_top1_agreement"]
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

    def _replacement(self, images: torch.Tensor, masks: MaskSets) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The replaced patches' code tokens (B, n_rep, D) and the norm-pix pixel prototypes of their
        soft tokens (B, n_rep, P), for :meth:`reconstruct`."""
        if self.patch_codebook is None:
            return None, None
        branch = code_branch(self.patch_codebook, self.cfg, images, masks, incubation=False, training=self.training)
        if branch.assignment is None:
            return branch.tokens, None
        prototypes = self.patch_codebook.token_prototype(branch.assignment)
        return branch.tokens, prototypes.view(images.shape[0], -1, self.cfg.patch_dim)
