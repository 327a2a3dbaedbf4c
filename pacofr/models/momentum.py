"""The momentum (EMA) side shared by the MCF-style and FRA-style models (docs/method.md "Peer methods").

- :class:`MLPHead`: the projector / predictor MLP of MoCo v3 and BYOL, with LayerNorm in place of
  their BatchNorm (batch statistics would differ between data-parallel ranks and are poor at the
  small batches this project trains on);
- :class:`MomentumBranch`: frozen EMA copies of online heads (the key / target network), updated
  with :func:`pacofr.models.consistency.ema_update` like PaCo-FR's teacher;
- :class:`MomentumModel`: the training interface both peers share on top of an encoder, its EMA
  ``teacher`` (the name export and evaluation look for) and a :class:`MomentumBranch`;
- :func:`encode_kept`: the encoder (online or momentum) on a subset of patches, MAE-style.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pacofr.models.config import ModelConfig
from pacofr.models.consistency import ema_update, make_teacher
from pacofr.models.maintenance import TeacherUpdate
from pacofr.models.mae import MAEFace
from pacofr.models.vit import add_positions, embed_patches, run_encoder
from pacofr.ops import gather_patches


class MLPHead(nn.Module):
    """``Linear(in, hidden) -> LayerNorm -> GELU -> Linear(hidden, out)`` on the last dimension.

    (..., in_dim) -> (..., out_dim) in the input's dtype (autocast applies).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.fc2(self.act(self.norm(self.fc1(x))))


class MomentumBranch(nn.Module):
    """Frozen EMA copies of named online modules (no gradients, always in eval mode).

    ``branch[name]`` is the copy of ``online[name]``; :meth:`update` moves every copy towards its
    online module: copy = momentum * copy + (1 - momentum) * online.
    """

    def __init__(self, online: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.copies = nn.ModuleDict({name: make_teacher(module) for name, module in online.items()})

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    @torch.no_grad()
    def update(self, online: Mapping[str, nn.Module], momentum: float) -> None:
        """EMA step of every copy towards ``online`` (the same names as at construction)."""
        if set(online) != set(self.copies):
            raise ValueError(f"online modules {sorted(online)} do not match the momentum copies {sorted(self.copies)}")
        for name, module in online.items():
            ema_update(self.copies[name], module, momentum)

    def train(self, mode: bool = True) -> "MomentumBranch":
        """The copies stay in eval mode whatever ``mode`` is."""
        return super().train(False)


class MomentumModel(nn.Module):
    """Shared trainer interface of the peers: an ``encoder``, its EMA ``teacher`` and EMA copies of
    the heads named by :meth:`online_heads` (``momentum``), kept in step by the
    :class:`~pacofr.models.maintenance.TeacherUpdate` of :meth:`step_maintenance`.

    Subclasses build ``encoder``, ``teacher`` and their heads, then call :meth:`_init_momentum`.
    """

    cfg: ModelConfig
    encoder: VisionTransformer
    teacher: nn.Module
    momentum: MomentumBranch
    #: parameter-name prefixes kept out of weight decay besides MAEFace's rules (cosine-scored tables)
    no_decay_prefixes: tuple[str, ...] = ()

    table_prefixes: tuple[str, ...] = ()  # MAEFace's own rule: none here
    _check_inputs = MAEFace._check_inputs  # images (B, 3, S, S) and region ids (B, L), as MAEFace checks them

    def param_groups(self, weight_decay: float) -> list[dict]:
        """:meth:`MAEFace.param_groups` (decay on weight matrices only; frozen parameters left out),
        with the parameters under :attr:`no_decay_prefixes` moved to the group without decay."""
        decay, no_decay = MAEFace.param_groups(self, weight_decay)
        skip = {id(p) for name, p in self.named_parameters() if name.startswith(self.no_decay_prefixes)}
        return [{"params": [p for p in decay["params"] if id(p) not in skip], "weight_decay": weight_decay},
                {"params": no_decay["params"] + [p for p in decay["params"] if id(p) in skip], "weight_decay": 0.0}]

    def online_heads(self) -> dict[str, nn.Module]:
        """The online heads that have a momentum copy, by name."""
        raise NotImplementedError

    def _init_momentum(self) -> None:
        self.momentum = MomentumBranch(self.online_heads())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step of the teacher encoder and of every momentum head."""
        ema_update(self.teacher, self.encoder, momentum)
        self.momentum.update(self.online_heads(), momentum)

    def step_maintenance(self) -> TeacherUpdate:
        """The between-steps work: the EMA step of the teacher and the momentum heads (no codebook)."""
        return TeacherUpdate(self.update_teacher)

    def train(self, mode: bool = True) -> "MomentumModel":
        """As nn.Module.train, but the teacher and the momentum heads always stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        self.momentum.eval()
        return self


def encode_kept(encoder: VisionTransformer, images: torch.Tensor, ids_keep: torch.Tensor,
                cfg: ModelConfig) -> torch.Tensor:
    """The encoder on the patches ``ids_keep`` (B, n) of ``images`` (B, 3, S, S) in [0, 1].

    Patches are gathered and normalised with ``cfg.pixel_mean`` / ``pixel_std``, embedded by the
    encoder's patch projection, given their positions and run with the class token. Returns
    (B, 1 + n, D) in the encoder's (autocast) dtype, class token first.
    """
    pixels = gather_patches(images, ids_keep, cfg.patch_size, mean=cfg.pixel_mean, std=cfg.pixel_std,
                            backend=cfg.backend, validate=False)
    tokens = add_positions(encoder, embed_patches(encoder, pixels), ids_keep)
    return run_encoder(encoder, tokens)
