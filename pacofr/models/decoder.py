"""The MAE decoder: Linear D -> Dd, mask tokens, fixed 2-D sin-cos positions, blocks, norm, Linear Dd -> P."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pacofr.models.config import ModelConfig
from pacofr.models.vit import sincos_pos_embed_2d
from pacofr.ops import scatter_tokens


class MAEDecoder(nn.Module):
    """Decoder of masked patches from the encoder's tokens.

    Parameters: ``embed`` (D -> Dd), ``mask_token`` (Dd,; None with encoder_mask="mask_token"),
    ``blocks`` (timm ViT blocks, Dd wide), ``norm``, ``pred`` (Dd -> P). Buffer ``pos_embed`` (1 + L, Dd): zero for the class token,
    fixed sin-cos for the patches (not trained, not saved: it is rebuilt from the config).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backend = cfg.backend
        self.embed = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        # with encoder_mask="mask_token" the encoder already fills the masked positions
        self.mask_token = nn.Parameter(torch.zeros(cfg.decoder_dim)) if cfg.encoder_mask == "drop" else None
        pos = torch.cat([torch.zeros(1, cfg.decoder_dim), sincos_pos_embed_2d(cfg.decoder_dim, cfg.grid_size)])
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.Sequential(*[
            Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.pred = nn.Linear(cfg.decoder_dim, cfg.patch_dim)
        self.apply(_init_linear_and_norm)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor | None) -> torch.Tensor:
        """Hidden states of every patch position.

        Args:
            latent: (B, 1 + n_keep, D) encoder output (class token first).
            ids_restore: (B, L) MAE unshuffle of the kept tokens and the mask tokens (see
                :func:`pacofr.ops.scatter_tokens`); None when ``latent`` already holds all L
                patches in image order (encoder_mask="mask_token").

        Returns:
            (B, 1 + L, Dd) normalised hidden states, class token first.
        """
        x = self.embed(latent)
        cls = x[:, :1] + self.pos_embed[:1].to(x.dtype)
        if ids_restore is None:
            patches = x[:, 1:] + self.pos_embed[1:].to(x.dtype)
        elif self.mask_token is None:
            raise ValueError("this decoder was built for encoder_mask='mask_token': pass ids_restore=None")
        else:
            patches = scatter_tokens(x[:, 1:], ids_restore, self.mask_token, pos_embed=self.pos_embed[1:],
                                     backend=self.backend, validate=False)
        x = self.blocks(torch.cat([cls, patches], dim=1))
        return self.norm(x)

    def predict(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Pixel predictions (B, n, P) for the patches ``ids`` (B, n) from hidden (B, 1 + L, Dd)."""
        patches = hidden[:, 1:]
        picked = torch.gather(patches, 1, ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return self.pred(picked)


def _init_linear_and_norm(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
