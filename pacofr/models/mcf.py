"""`MCF`: MCF-style pre-training (Mask Contrastive Face; docs/method.md "Peer methods", ``method="mcf"``).

The MAE-face control (same encoder, decoder, random ``mae_mask_ratio`` mask, norm-pix
reconstruction) extended with MCF's two other objectives. One training forward:

1. two views of every face, each with its own random mask (:func:`pacofr.models.masking.sample_masks`);
2. per view: the encoder on its visible patches, the MAE decoder, ``L_rec`` at its masked patches,
   and ``L_feat``: a linear head on the decoder's hidden states predicts the target features
   at the masked patches (``1 - cos``); the target is the EMA teacher's patch features of the full
   face (``mcf_target="ema"``) or a frozen network's (:mod:`pacofr.models.target_network`);
3. ``L_con``: MoCo v3's InfoNCE between the projected + predicted class token of one view and the
   momentum key (EMA encoder on the *other* masked view, EMA projector), both directions,
   temperature ``mcf_temperature``, keys of every data-parallel rank as negatives.

``L = w_mcf_rec L_rec + w_mcf_feat L_feat + w_mcf_con L_con``; every term is the mean of its two views /
directions. The EMA teacher (the momentum encoder) and the EMA projector move after every optimiser step
(:meth:`MomentumModel.step_maintenance`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.models.masking import MaskSets, sample_masks
from pacofr.models.config import ModelConfig
from pacofr.models.consistency import make_teacher, teacher_features
from pacofr.models.momentum import MLPHead, MomentumModel, encode_kept
from pacofr.models.mae import MAEFace
from pacofr.models.output import ModelOutput
from pacofr.models.reconstruction_loss import reconstruction_loss
from pacofr.models.peer_losses import info_nce
from pacofr.ops.precision import full_precision
from pacofr.models.target_network import FrozenTargetNetwork, load_target_network

logger = logging.getLogger(__name__)

EMA_TARGET = "ema"


class MCF(MomentumModel, MAEFace):
    """MCF-style model (``cfg.method="mcf"``).

    Submodules: those of the MAE-face control (``encoder``, ``decoder``), ``teacher`` (EMA of the
    encoder: the momentum key encoder and, with ``mcf_target="ema"``, the feature target),
    ``projector`` (D -> peer_hidden_dim -> peer_proj_dim), ``predictor`` (peer_proj_dim ->
    peer_hidden_dim -> peer_proj_dim), ``feature_head`` (Dd -> C, the target's width; None with
    ``mcf_target=""``) and ``momentum`` (the EMA projector). A frozen target network, when
    configured, is held outside the module tree (not in checkpoints).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.method != "mcf":
            raise ValueError(f"MCF needs cfg.method='mcf', got {cfg.method!r}")
        super().__init__(cfg)  # the MAE-face control's encoder and decoder
        self.teacher = make_teacher(self.encoder)
        self.projector = MLPHead(cfg.embed_dim, cfg.peer_hidden_dim, cfg.peer_proj_dim)
        self.predictor = MLPHead(cfg.peer_proj_dim, cfg.peer_hidden_dim, cfg.peer_proj_dim)
        self.target_network: FrozenTargetNetwork | None = (
            load_target_network(cfg.mcf_target) if cfg.mcf_target not in (EMA_TARGET, "") else None)
        width = self.target_network.num_features if self.target_network is not None else cfg.embed_dim
        self.feature_head = nn.Linear(cfg.decoder_dim, width) if cfg.mcf_target else None
        self._init_momentum()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("MCF: %.2fM trainable parameters, feature target %r", trainable / 1e6, cfg.mcf_target or "none")

    def online_heads(self) -> dict[str, nn.Module]:
        """The projector (its EMA copy projects the momentum keys)."""
        return {"projector": self.projector}

    def forward(self, images: torch.Tensor, region_ids: torch.Tensor, *, incubation: bool = False,
                generator: torch.Generator | None = None) -> ModelOutput:
        """Losses of one batch.

        Args:
            images: (B, 3, S, S) float in [0, 1], S = cfg.img_size.
            region_ids: (B, L) int64 (checked; the random masks do not read them).
            incubation: ignored (MCF has no incubation stage).
            generator: torch.Generator for the two views' masks.

        Returns:
            :class:`ModelOutput` with ``losses`` ``rec`` (MAE-face's reconstruction loss, ``rec_on``),
            ``feat`` (not with ``mcf_target=""``) and ``con``, each unweighted; no stats.
        """
        del incubation
        self._check_inputs(images, region_ids)
        cfg = self.cfg
        views = [sample_masks(region_ids, cfg, generator, validate=False) for _ in range(2)]
        target = self._feature_target(images) if self.feature_head is not None else None
        rec, feat, queries, keys = [], [], [], []
        for masks in views:
            latent = encode_kept(self.encoder, images, masks.ids_keep, cfg)
            hidden = self.decoder(latent, masks.ids_restore)
            rec.append(reconstruction_loss(self.decoder, hidden, images, masks, cfg, {}))
            if target is not None:
                feat.append(self._feature_loss(hidden, target, masks))
            queries.append(self.predictor(self.projector(latent[:, 0])))
            with torch.no_grad():
                keys.append(self.momentum["projector"](encode_kept(self.teacher, images, masks.ids_keep, cfg)[:, 0]))
        terms: dict[str, tuple[torch.Tensor, float]] = {"rec": ((rec[0] + rec[1]) / 2, cfg.w_mcf_rec)}
        if feat:
            terms["feat"] = ((feat[0] + feat[1]) / 2, cfg.w_mcf_feat)
        contrast = (info_nce(queries[0], keys[1], cfg.mcf_temperature)
                    + info_nce(queries[1], keys[0], cfg.mcf_temperature)) / 2
        terms["con"] = (contrast, cfg.w_mcf_con)
        loss = sum(weight * value for value, weight in terms.values())
        return ModelOutput(loss=loss, losses={name: value.detach() for name, (value, _) in terms.items()}, stats={})

    def loss_names(self) -> tuple[str, ...]:
        """Every loss name :meth:`forward` may report for this config."""
        return ("rec", "con") if self.feature_head is None else ("rec", "feat", "con")

    def stat_names(self) -> tuple[str, ...]:
        """MCF reports no stats."""
        return ()

    # ------------------------------------------------------------------------------------------
    def _feature_target(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L, C) target features of the full faces (no gradient): the EMA teacher's or the frozen network's."""
        if self.target_network is None:
            return teacher_features(self.teacher, images, self.cfg)
        return self.target_network.patch_features(images, self.cfg.grid_size)

    def _feature_loss(self, hidden: torch.Tensor, target: torch.Tensor, masks: MaskSets) -> torch.Tensor:
        """Mean ``1 - cos`` between ``feature_head`` of the decoder's hidden states (B, 1 + L, Dd) and
        the target (B, L, C) at the masked patches. 0-d fp32."""
        ids = masks.ids_masked
        picked = torch.gather(hidden[:, 1:], 1, ids.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        wanted = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        prediction = self.feature_head(picked)
        with full_precision(prediction.device):
            return (1.0 - F.cosine_similarity(prediction.float(), wanted.float(), dim=-1)).mean()
