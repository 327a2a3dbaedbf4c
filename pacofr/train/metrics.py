"""Scalar logging: a CSV file (always), TensorBoard (when installed and asked for), peak memory."""

from __future__ import annotations

import csv
import logging
import math
import resource
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far in MiB: CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class ScalarCSV:
    """Rows of scalars keyed by ``step`` in a CSV file; new columns extend the header.

    ``truncate_after(step)`` drops rows past ``step`` (on resume, so the file continues the
    interrupted run without duplicates). Floats are written with ``repr`` (exact round trip).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        if self.path.exists():
            with open(self.path, newline="") as fh:
                self.columns = list(csv.DictReader(fh).fieldnames or [])

    def read(self) -> list[dict[str, str]]:
        """All rows as dicts of strings ({} when the file does not exist)."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def _rewrite(self, rows: list[Mapping[str, object]]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop the rows whose ``step`` is greater than ``step``."""
        rows = self.read()
        kept = [row for row in rows if int(row["step"]) <= step]
        if len(kept) != len(rows):
            self._rewrite(kept)

    def append(self, row: Mapping[str, float | int | str]) -> None:
        """Add one row (must contain ``step``)."""
        formatted = {k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()}
        new_columns = [k for k in formatted if k not in self.columns]
        if new_columns:
            old_rows = self.read()
            self.columns = self.columns + new_columns if self.columns else ["step", *[k for k in formatted if k != "step"]]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rewrite(old_rows)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, restval="").writerow(formatted)


class TensorBoardLog:
    """TensorBoard scalars if ``torch.utils.tensorboard`` can be imported, else a no-op."""

    def __init__(self, log_dir: str | Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("train.tensorboard is on but tensorboard is not installed; logging to CSV only")
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: Mapping[str, float | int | str], step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TensorMeans:
    """Means of named scalar tensors since the last :meth:`pop`, kept on the device.

    Adding does not synchronise with the GPU; :meth:`pop` averages over ranks too (every rank
    must have added the same names) and returns python floats.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float().reshape(())
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1

    def _means(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, float]:
        keys = sorted(self._sums)
        if not keys:
            return {}
        means = torch.stack([self._sums[k] / self._counts[k] for k in keys])
        if reduce is not None:
            means = reduce(means)
        return dict(zip(keys, means.tolist()))

    def peek(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Means since the last pop, which go on accumulating (see :meth:`pop` for ``reduce``)."""
        return self._means(reduce)

    def pop(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Means since the last pop; ``reduce`` (e.g. a mean over ranks) is applied to the stacked means."""
        means = self._means(reduce)
        self._sums.clear()
        self._counts.clear()
        return means

    def state_dict(self) -> dict[str, dict]:
        """The running sums (CPU tensors) and counts, for a checkpoint."""
        return {"sums": {k: v.detach().cpu() for k, v in self._sums.items()}, "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, dict], device: torch.device | str = "cpu") -> None:
        """Continue from :meth:`state_dict` (sums moved to ``device``)."""
        self._sums = {k: v.to(device) for k, v in state["sums"].items()}
        self._counts = {k: int(v) for k, v in state["counts"].items()}
