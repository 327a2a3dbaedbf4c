"""A tiny stand-in with PaCoFR's training interface, and a tiny face-like dataset (trainer tests only).

The stand-in draws from the mask generator AND the global torch RNG, updates a buffer and keeps
an EMA teacher, so a resume that forgets any of these diverges from the uninterrupted run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from pacofr.train.config import PretrainConfig, TrainConfig

IMG = 8


@dataclass
class StandInOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class StandInModel(nn.Module):
    """Linear auto-encoder on (3, 8, 8) images with random input masking.

    ``random=False`` makes the forward deterministic (for the DDP equivalence test);
    ``nan_on_calls``: training forward calls (0-based) whose loss is NaN.
    """

    def __init__(self, dim: int = 16, random: bool = True, nan_on_calls: tuple[int, ...] = ()) -> None:
        super().__init__()
        pixels = 3 * IMG * IMG
        self.enc = nn.Linear(pixels, dim)
        self.norm = nn.LayerNorm(dim)
        self.dec = nn.Linear(dim, pixels)
        self.teacher = copy.deepcopy(self.enc).requires_grad_(False)
        self.register_buffer("seen", torch.zeros(()))
        self.random = random
        self.nan_on_calls = set(nan_on_calls)
        self.calls = 0
        self.discarded = 0  # maintenance.discard() calls (skipped steps)
        self.recorded = 0  # forwards handed to maintenance.record()

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.flatten(1)
        if self.random:
            keep = torch.rand(x.shape, generator=generator, device=x.device) > 0.3
            x_in = x * keep + 0.01 * torch.randn(x.shape[0], 1, device=x.device)
        else:
            x_in = x
        return x, self.norm(self.enc(x_in))

    def forward(self, images: torch.Tensor, region_ids: torch.Tensor, *, incubation: bool,
                generator: torch.Generator | None = None) -> StandInOutput:
        assert region_ids.dtype == torch.int64 and region_ids.shape[0] == images.shape[0]
        x, h = self._encode(images, generator)
        rec = ((self.dec(h) - x) ** 2).mean()
        align = ((self.teacher(x) - self.enc(x)) ** 2).mean()
        loss = rec + (0.1 * h.pow(2).mean() if incubation else 0.01 * align)
        if self.training:
            if self.calls in self.nan_on_calls:
                loss = loss * float("nan")
            self.calls += 1
            self.seen += images.shape[0]
        return StandInOutput(loss, {"rec": rec.detach(), "align": align.detach()},
                             {"seen": self.seen.clone(), "incubation": torch.tensor(float(incubation))})

    def param_groups(self, weight_decay: float) -> list[dict]:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]

    def step_maintenance(self) -> StandInMaintenance:
        return StandInMaintenance(self)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, region_ids: torch.Tensor,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x, h = self._encode(images, generator)
        rec = self.dec(h).view_as(images).clamp(0, 1)
        return {"input": images, "corrupted": images * 0.5, "reconstruction": rec}


class StandInMaintenance:
    """The stand-in's between-steps work: the teacher's EMA step; counts recorded forwards and
    discarded steps (on the model, which the tests read)."""

    def __init__(self, model: StandInModel) -> None:
        self.model = model

    def record(self, output: StandInOutput) -> None:
        self.model.recorded += 1

    def discard(self) -> None:
        self.model.discarded += 1

    @torch.no_grad()
    def apply(self, teacher_momentum: float | None = None) -> dict[str, float]:
        model = self.model
        if teacher_momentum is not None:
            for t, s in zip(model.teacher.parameters(), model.enc.parameters()):
                t.lerp_(s, 1.0 - teacher_momentum)
        return {"teacher_gap": float((model.teacher.weight - model.enc.weight).abs().max())}


class TinyFaces(Dataset):
    """``n`` deterministic (3, 8, 8) images; a random flip drawn from the global torch RNG."""

    def __init__(self, n: int = 40) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.images = torch.rand(n, 3, IMG, IMG, generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"image": image, "landmarks": torch.zeros(5, 2), "index": index}


def region_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """All patches in region 0 (the stand-in ignores regions)."""
    return torch.zeros(batch["image"].shape[0], 4, dtype=torch.int64)


def tiny_config(out_dir: str, **train: object) -> PretrainConfig:
    """A PretrainConfig for the stand-in: CPU, no progress bar, every step logged."""
    defaults: dict[str, object] = dict(out_dir=out_dir, epochs=3, batch_size=4, accum_steps=1, base_lr=0.05,
                                       warmup_epochs=1.0, clip_grad=1.0, device="cpu", seed=7, log_every=1,
                                       viz_every=0, num_viz=4, ckpt_every=0, keep_last=2, progress=False)
    defaults.update(train)
    return PretrainConfig(train=TrainConfig(**defaults))  # type: ignore[arg-type]
