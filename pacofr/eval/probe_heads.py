"""Heads fitted on frozen features: a linear classifier, ridge regression, a small MLP, and k-NN.

All take features float32 (N, F) already standardised (:class:`Standardiser`, fitted on the rows
the head learns from) and return head outputs as :func:`pacofr.eval.metrics.score` reads them:
class / attribute logits, or values in the targets' units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pacofr.eval.labelled import Targets
from pacofr.eval.metrics import classification_loss

KNN_TEMPERATURE = 0.07  # similarity weighting of the neighbours' votes (as DINO's k-NN)
_TIE_SCALE = 2.0 ** 40  # similarities are compared on this grid (about 1e-12)
_INDEX_BITS = 22  # bank rows < 2**22 (4 M): sort keys round(sim * scale) * 2**22 - index fit in int64
BATCHES_PER_EPOCH = 20  # heads on large sets take larger batches: at most this many per epoch


def batch_size_for(rows: int, batch_size: int) -> int:
    """The mini-batch of a head on ``rows`` training rows: ``batch_size``, or larger so that an epoch
    has at most :data:`BATCHES_PER_EPOCH` batches."""
    return max(batch_size, -(-rows // BATCHES_PER_EPOCH))


@dataclass
class Standardiser:
    """Per-dimension shift and scale fitted on some rows (std floored at ``eps``)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 1e-6) -> Standardiser:
        x = x.double()
        return cls(x.mean(0, keepdim=True).float(), x.std(0, keepdim=True, unbiased=False).clamp_min(eps).float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def regression_matrix(targets: Targets) -> torch.Tensor:
    """Regression / landmark targets as float32 (N, width)."""
    return targets.values.reshape(len(targets), -1).float()


def train_linear_classifier(x: torch.Tensor, targets: Targets, *, epochs: int, lr: float, l2: float,
                            batch_size: int, seed: int) -> tuple[nn.Linear, list[float]]:
    """A linear layer trained with Adam (mini-batches of :func:`batch_size_for`, seeded init and
    order) on class or attribute targets, minimising the mean (binary) cross-entropy plus
    ``l2 / 2 * ||W||^2`` (the bias is not penalised); returns the head after the final epoch and
    the per-epoch training loss (without the penalty)."""
    if x.shape[0] == 0:
        raise ValueError("the head needs training images; the train split is empty")
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], targets.width)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    y = targets.values

    def losses(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = classification_loss(head(x[idx]), y[idx], targets.kind)
        return loss + 0.5 * l2 * head.weight.square().sum(), loss

    curve = _train_epochs(torch.optim.Adam(head.parameters(), lr=lr), x.shape[0], epochs=epochs,
                          batch=batch_size_for(x.shape[0], batch_size), gen=gen, losses=losses)
    return head.eval(), curve


def _train_epochs(opt: torch.optim.Optimizer, rows: int, *, epochs: int, batch: int, gen: torch.Generator,
                  losses: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Mini-batch epochs over ``rows`` rows in a seeded order; ``losses(indices)`` gives the objective
    to minimise and the loss to record. Returns the recorded loss per epoch (mean over rows)."""
    curve: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(rows, generator=gen)
        total = 0.0
        for start in range(0, rows, batch):
            idx = order[start:start + batch]
            opt.zero_grad(set_to_none=True)
            objective, recorded = losses(idx)
            objective.backward()
            opt.step()
            total += recorded.item() * idx.numel()
        curve.append(total / rows)
    return curve


class Ridge:
    """Closed-form ridge regressions of targets (N, T) on features (N, F) for many penalties at once,
    with an unpenalised intercept (features and targets are centred on the training rows).

    Penalties are given relative to the number of rows (``alpha * N``), so one grid suits sets of
    any size. Solved in float64 from one eigendecomposition of the smaller of X^T X and X X^T.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] < 2:
            raise ValueError(f"ridge regression needs at least 2 training images, got {x.shape[0]}")
        self.x_mean = x.double().mean(0, keepdim=True)
        self.x = x.double() - self.x_mean
        self.y_mean = y.double().mean(0, keepdim=True)
        self.y = y.double() - self.y_mean
        self.primal = x.shape[1] <= x.shape[0]
        gram = self.x.T @ self.x if self.primal else self.x @ self.x.T
        self.values, self.vectors = torch.linalg.eigh(gram)
        self.values = self.values.clamp_min(0.0)
        self.projected = self.vectors.T @ (self.x.T @ self.y if self.primal else self.y)

    def weights(self, alpha: float) -> torch.Tensor:
        """float64 (F, T) weights for penalty ``alpha * N``."""
        penalty = float(alpha) * self.x.shape[0]
        solved = self.vectors @ (self.projected / (self.values + penalty)[:, None])
        return solved if self.primal else self.x.T @ solved

    def predict(self, alpha: float, x: torch.Tensor) -> torch.Tensor:
        """float32 predictions (N, T) for features ``x`` with penalty ``alpha``."""
        return ((x.double() - self.x_mean) @ self.weights(alpha) + self.y_mean).float()


def train_mlp(x: torch.Tensor, y: torch.Tensor, *, hidden: int, epochs: int, lr: float, weight_decay: float,
              batch_size: int, seed: int) -> tuple[nn.Module, list[float]]:
    """A one-hidden-layer MLP (Linear, GELU, Linear) trained with AdamW (mini-batches of
    :func:`batch_size_for`) on MSE to targets ``y`` (N, T), which it standardises itself; the
    returned module predicts in ``y``'s units."""
    if x.shape[0] < 2:
        raise ValueError(f"the MLP head needs at least 2 training images, got {x.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    y_scale = Standardiser.fit(y)
    target = y_scale(y)
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, y.shape[1]))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            bound = layer.in_features ** -0.5
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.zero_()
    def losses(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = torch.nn.functional.mse_loss(net(x[idx]), target[idx])
        return loss, loss

    curve = _train_epochs(torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay), x.shape[0],
                          epochs=epochs, batch=batch_size_for(x.shape[0], batch_size), gen=gen, losses=losses)
    return _Unscaled(net.eval(), y_scale), curve


class _Unscaled(nn.Module):
    """Outputs of a net trained on standardised targets, in the targets' units."""

    def __init__(self, net: nn.Module, scale: Standardiser) -> None:
        super().__init__()
        self.net = net
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale.std + self.scale.mean


def knn_predict(bank: torch.Tensor, bank_targets: Targets, queries: torch.Tensor, k: int,
                chunk: int = 1024) -> torch.Tensor:
    """Cosine k-NN outputs for ``queries`` from the memory ``bank`` (rows l2-normalised here).

    The k most similar bank rows vote with weights exp(similarity / :data:`KNN_TEMPERATURE`);
    equal similarities (to about 1e-12) go to the smaller bank index. Class targets give per-class vote sums
    (the larger wins, ties to the smaller class), attributes the weighted attribute frequency
    shifted to logits, regression and landmarks the weighted mean of the neighbours' values.
    """
    if bank.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty memory bank (train split)")
    if bank.shape[0] >= 2 ** _INDEX_BITS:
        raise ValueError(f"k-NN supports memory banks of fewer than {2 ** _INDEX_BITS} rows, got {bank.shape[0]}")
    k = min(k, bank.shape[0])
    bank_n = torch.nn.functional.normalize(bank.double(), dim=1)
    index = torch.arange(bank.shape[0], dtype=torch.int64)
    outputs = []
    for start in range(0, queries.shape[0], chunk):
        q = torch.nn.functional.normalize(queries[start:start + chunk].double(), dim=1)
        # similarities equal to about 1e-12 are ties (a matmul may differ in the last bits between
        # equal rows); exact integer keys rank them by similarity, then by the smaller bank index
        grid = torch.round((q @ bank_n.T) * _TIE_SCALE)
        keys = grid.to(torch.int64) * 2 ** _INDEX_BITS - index
        order = torch.topk(keys, k, dim=1).indices
        top = grid.gather(1, order) / _TIE_SCALE
        weights = torch.exp((top - top[:, :1]) / KNN_TEMPERATURE)
        outputs.append(_vote(bank_targets, order, weights))
    if not outputs:
        return torch.empty(0, bank_targets.width)
    return torch.cat(outputs)


def _vote(bank_targets: Targets, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    values = bank_targets.values
    if bank_targets.kind == "class":
        votes = torch.zeros(order.shape[0], bank_targets.width, dtype=torch.float64)
        votes.scatter_add_(1, values[order], weights)
        return votes.float()
    if bank_targets.kind == "multi":
        freq = (values[order].double() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
        return (freq - 0.5).float()  # > 0 where the weighted majority has the attribute
    flat = regression_matrix(bank_targets).double()
    return ((flat[order] * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)).float()


def predict_in_chunks(head: nn.Module, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``head(x)`` without gradients, ``chunk`` rows at a time."""
    with torch.no_grad():
        parts = [head(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.empty(0)


def select_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """Rows ``rows`` of ``x``."""
    return x[torch.as_tensor(list(rows), dtype=torch.long)]
