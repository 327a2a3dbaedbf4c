"""Peer libraries timed beside pacofr in the benchmark families, each optional.

A user choosing a codebook lookup could take instead: flash-kmeans' Triton assignment kernel
(``euclid_assign_triton``, k = 1, squared L2), KeOps' symbolic reductions (``LazyTensor`` +
``argKmin``, any k, l2 or cosine; fp32/fp16, so bf16 inputs are upcast inside the timed call),
or vector-quantize-pytorch's codebook lookup (its ``VectorQuantize`` module in eval mode, k = 1).
Each adapter returns the peer's neighbour indices ``(N, k)`` for the family's correctness check,
or says why it cannot run (not installed, no GPU, unsupported k / metric / dtype); a family
records the reason as a skipped row, so a missing peer never fails a run.

None of them is installed by default; ``pip install flash-kmeans pykeops vector-quantize-pytorch``
brings them (README, "Benchmarks", for a GPU machine without a package index).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

Lookup = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Peer:
    """One peer: its row name, the module it needs and the adapter that builds its timed call."""

    name: str
    module: str
    build: Callable[[torch.Tensor, torch.Tensor, int, str], Lookup | str]

    def prepare(self, x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str) -> Lookup | str:
        """The timed call (returning indices (N, k)), or the reason it cannot run on these inputs."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed (pip install {self.name.replace('_', '-')})"
        return self.build(x, codebook, k, metric)


def _flash_kmeans(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str) -> Lookup | str:
    if x.device.type != "cuda":
        return "flash-kmeans' Triton kernel needs CUDA tensors"
    if k != 1 or metric != "l2":
        return "flash-kmeans assigns the single nearest centroid by squared L2 only (k=1, l2)"
    from flash_kmeans.assign_euclid_triton import euclid_assign_triton

    points, centroids = x[None].contiguous(), codebook[None].contiguous()

    def lookup() -> torch.Tensor:
        x_sq = points.float().square().sum(-1)
        return euclid_assign_triton(points, centroids, x_sq)[0].long().unsqueeze(1)

    return lookup


def _keops(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str) -> Lookup | str:
    from pykeops.torch import LazyTensor

    def lookup() -> torch.Tensor:
        queries, codes = x, codebook
        if queries.dtype == torch.bfloat16:  # KeOps computes in fp32 or fp16
            queries, codes = queries.float(), codes.float()
        if metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
            codes = torch.nn.functional.normalize(codes, dim=1)
            scores = -(LazyTensor(queries[:, None, :].contiguous()) * LazyTensor(codes[None, :, :].contiguous())).sum(-1)
        else:
            scores = ((LazyTensor(queries[:, None, :].contiguous()) - LazyTensor(codes[None, :, :].contiguous())) ** 2
                      ).sum(-1)
        return scores.argKmin(k, dim=1).long().reshape(-1, k)

    return lookup


def _vector_quantize(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str) -> Lookup | str:
    if k != 1:
        return "vector-quantize-pytorch returns the single nearest code (k=1)"
    from vector_quantize_pytorch import VectorQuantize

    quantizer = VectorQuantize(dim=codebook.shape[1], codebook_size=codebook.shape[0],
                               use_cosine_sim=metric == "cosine").to(x.device).eval()
    quantizer._codebook.embed.data.copy_(codebook.float()[None])
    queries = x[None]

    def lookup() -> torch.Tensor:
        with torch.no_grad():
            _, indices, _ = quantizer(queries)
        return indices.reshape(-1, 1).long()

    return lookup


NEAREST_TOKEN_PEERS: tuple[Peer, ...] = (
    Peer("flash_kmeans", "flash_kmeans", _flash_kmeans),
    Peer("pykeops", "pykeops", _keops),
    Peer("vector_quantize", "vector_quantize_pytorch", _vector_quantize),
)
