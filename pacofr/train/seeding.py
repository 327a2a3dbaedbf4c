"""Deterministic seeding and capture/restore of every random number generator the trainer uses.

States are stored as tensors, ints and tuples only, so a checkpoint holding them loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

_SEED_MOD = 2**31 - 1
# independent random streams of a run, derived from train.seed: derive_seed(seed, stream, ...); stream 0
# is the global generators (seed_everything)
MASK_STREAM, AUGMENT_STREAM, ORDER_STREAM, LOADER_STREAM, VIZ_STREAM = 1, 2, 3, 4, 5


def derive_seed(*parts: int) -> int:
    """A deterministic 31-bit seed mixed from integers (run seed, rank, epoch, index...)."""
    seq = np.random.SeedSequence([int(p) % (2**63) for p in parts])
    return int(seq.generate_state(1, dtype=np.uint32)[0]) % _SEED_MOD


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and every CUDA device) for this rank; return the seed used."""
    rank_seed = derive_seed(seed, 0, rank)
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    return rank_seed


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device`` (used for mask sampling)."""
    return torch.Generator(device=device).manual_seed(seed)


def dataloader_worker_init(worker_id: int) -> None:
    """``worker_init_fn``: seed python and numpy in a DataLoader worker from torch's worker seed.

    torch already seeds each worker as ``base_seed + worker_id`` (base_seed drawn from the
    loader's generator); python's and numpy's generators are not, and would otherwise repeat.
    """
    worker_seed = torch.initial_seed() % _SEED_MOD
    random.seed(worker_seed)
    np.random.seed(worker_seed)


@contextlib.contextmanager
def isolated_rng(seed: int | None = None, include_cuda: bool = True) -> Iterator[None]:
    """Run a block without disturbing the global python/numpy/torch generators.

    With ``seed`` the block starts from that seed (same numbers however often it runs).
    ``include_cuda=False`` leaves the CUDA generators alone (cheaper; for CPU-only blocks).
    """
    state = capture_global_rng(include_cuda=include_cuda)
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            if include_cuda:
                torch.manual_seed(seed)
            else:
                torch.random.default_generator.manual_seed(seed)
        yield
    finally:
        restore_global_rng(state)


def capture_global_rng(include_cuda: bool = True) -> dict[str, Any]:
    """The states of python's, numpy's and torch's global generators (CUDA ones if initialised)."""
    np_state = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if include_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_global_rng`."""
    random.setstate(_as_python_state(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` needs tuples; a round trip through a checkpoint may give lists."""
    version, internal, gauss = state
    return int(version), tuple(int(v) for v in internal), gauss
