"""`MAEFace`: the MAE-face control, MAE on aligned faces; the encoder and decoder every method shares.

One training forward, as in MAE:

1. sample the masked / visible sets (:func:`pacofr.models.masking.sample_masks`: facial regions or
   random patches, per the config);
2. encode: the encoder (timm ViT) on the visible patches (gathered, embedded by the conv weights as
   a linear map), each + its position; masked patches dropped (or a mask token);
3. decode: the MAE decoder with mask tokens (``scatter_tokens``), prediction head on the scored
   patches only;
4. loss: :func:`pacofr.models.reconstruction_loss.reconstruction_loss` (norm-pix target by default).

:class:`pacofr.models.paco.PaCoFR` builds on it (replaced patches, the codebook, consistency), and
the MCF-style model reuses its encoder, decoder and reconstruction loss.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pacofr.ops.checks import check_tensor
from pacofr.models.config import ModelConfig
from pacofr.models.decoder import MAEDecoder
from pacofr.models.maintenance import TeacherUpdate
from pacofr.models.masking import MaskSets, sample_masks
from pacofr.models.output import ModelOutput
from pacofr.models.reconstruction_loss import reconstruction_loss
from pacofr.models.vit import add_positions, build_encoder, embed_patches, patch_positions, run_encoder
from pacofr.ops import gather_patches, scatter_tokens

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")
#: state-dict keys that checkpoints of earlier versions hold and this model no longer has (the
#: MAE-face control was a PaCoFR with PaCo-FR's post-incubation step counter)
_RETIRED_KEYS = ("post_incubation_steps",)


class MAEFace(nn.Module):
    """The MAE-face control (``cfg.method="mae"``), and the shared core of the other methods.

    Submodules: ``encoder`` (timm VisionTransformer, exportable as is), ``decoder``
    (:class:`MAEDecoder`), with ``encoder_mask="mask_token"`` ``encoder_mask_token`` (D,).
    """

    #: parameter-name prefixes kept out of weight decay besides the norms, biases and positions
    table_prefixes: tuple[str, ...] = ()

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
        self.register_load_state_dict_pre_hook(_drop_retired_keys)

    def forward(self, images: torch.Tensor, region_ids: torch.Tensor, *, incubation: bool,
                generator: torch.Generator | None = None) -> ModelOutput:
        """Losses of one batch.

        Args:
            images: (B, 3, S, S) float in [0, 1], S = cfg.img_size.
            region_ids: (B, L) int64 region of every patch (row-major grid), L = (S / p)^2.
            incubation: ignored (MAE-face has no incubation stage).
            generator: torch.Generator for the masks.
        """
        del incubation
        self._check_inputs(images, region_ids)
        masks = sample_masks(region_ids, self.cfg, generator, validate=False)
        hidden = self.decode(self.encode(images, masks), masks)
        losses: dict[str, torch.Tensor] = {}
        rec = reconstruction_loss(self.decoder, hidden, images, masks, self.cfg, losses)
        losses["rec"] = rec.detach()
        return ModelOutput(loss=rec, losses=losses, stats={})

    def loss_names(self) -> tuple[str, ...]:
        """Every loss name :meth:`forward` may report (for fixed CSV columns)."""
        return ("rec", "rec_masked")

    def stat_names(self) -> tuple[str, ...]:
        """MAE-face reports no stats."""
        return ()

    def encode(self, images: torch.Tensor, masks: MaskSets, code_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, 1 + n_keep, D) (``encoder_mask="drop"``) or (B, 1 + L, D) ("mask_token")
        of the visible patches and, when given, the replaced patches' tokens ``code_tokens``
        (B, n_rep, D) (PaCo-FR)."""
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

    def decode(self, latent: torch.Tensor, masks: MaskSets) -> torch.Tensor:
        """Decoder hidden states (B, 1 + L, Dd) of the encoder output ``latent``."""
        return self.decoder(latent, masks.ids_restore if self.cfg.encoder_mask == "drop" else None)

    def step_maintenance(self) -> TeacherUpdate:
        """The between-steps work: MAE-face has no teacher, so nothing changes."""
        return TeacherUpdate(self.update_teacher)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """No teacher: nothing to update."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of the encoder blocks (timm's)."""
        self.encoder.set_grad_checkpointing(enable)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: ``weight_decay`` on weight matrices, none on norms, biases, positions,
        class / mask tokens and the parameters under :attr:`table_prefixes`. Frozen parameters
        (teachers, fixed positions) are left out."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            skip = param.ndim <= 1 or leaf in _NO_DECAY_NAMES or name.startswith(self.table_prefixes)
            (no_decay if skip else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, region_ids: torch.Tensor,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Images for a reconstruction grid, all (B, 3, S, S) float32 in [0, 1].

        "input"; "corrupted": masked patches grey, replaced patches (PaCo-FR) showing the pixel
        prototype of their soft token (de-normalised with the patch's own mean and std when
        prototypes are norm-pix), visible patches as they are; "reconstruction": predictions
        (de-normalised with each patch's own mean and std for the norm-pix target) with the visible
        patches pasted. Runs in eval mode (restored afterwards); no losses, no codebook bookkeeping.
        """
        self._check_inputs(images, region_ids)
        was_training = self.training
        self.eval()
        try:
            cfg = self.cfg
            masks = sample_masks(region_ids, cfg, generator, validate=False)
            code_tokens, shown_prototypes = self._replacement(images, masks)
            hidden = self.decode(self.encode(images, masks, code_tokens), masks)
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
            if shown_prototypes is not None:
                index = masks.ids_replaced.unsqueeze(-1).expand(-1, -1, cfg.patch_dim)
                shown = (shown_prototypes * torch.gather(scale, 1, index[..., :1])
                         + torch.gather(mean, 1, index[..., :1]))
                corrupted = corrupted.scatter(1, index, shown)
            return {"input": images.float().clamp(0, 1),
                    "corrupted": self._unpatchify(corrupted).clamp(0, 1),
                    "reconstruction": self._unpatchify(recon).clamp(0, 1)}
        finally:
            self.train(was_training)

    def _replacement(self, images: torch.Tensor, masks: MaskSets) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For a reconstruction grid: the replaced patches' input tokens (B, n_rep, D) and their
        norm-pix prototypes to show (B, n_rep, P); (None, None) for a model that replaces nothing."""
        return None, None

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

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, P) patches in (p, q, c) order -> (B, 3, S, S)."""
        cfg = self.cfg
        batch, g, p = patches.shape[0], cfg.grid_size, cfg.patch_size
        return patches.reshape(batch, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(batch, 3, g * p, g * p)


def _drop_retired_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str, *args: object) -> None:
    """Load hook: drop the keys of :data:`_RETIRED_KEYS` that ``module`` has no buffer for (a
    checkpoint written before MAE-face and MCF-style stopped carrying PaCo-FR's step counter)."""
    own = dict(module.named_buffers(recurse=False))
    for key in _RETIRED_KEYS:
        if prefix + key in state_dict and key not in own:
            del state_dict[prefix + key]  # type: ignore[attr-defined]
