"""The one evaluation code path: a row (encoder or baseline) on labelled sets, every protocol.

:func:`evaluate_sets` extracts each image set's features once per row (streamed, see
:func:`pacofr.eval.extractors.extract_features`; sets sharing their images share them), then
for every set and feature pool runs the frozen protocols (:mod:`pacofr.eval.probe_protocols`) and, for
encoders, the fine-tune (:mod:`pacofr.eval.finetune`). Global targets (classes, attributes,
numbers) use the row's global pools (an encoder's ``cls`` and ``mean``), landmarks its spatial
pool (``tokens``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pacofr.eval.extractors import Extractor, extract_features
from pacofr.eval.finetune import FinetuneConfig, run_finetune
from pacofr.eval.labelled import LabelledSet, check_labelled, describe_data
from pacofr.eval.probe_protocols import FROZEN_PROTOCOLS, ProbeConfig, applies, run_frozen
from pacofr.eval.splits import SPLITS
from pacofr.eval.choices import PROTOCOLS

logger = logging.getLogger(__name__)


@dataclass
class EvalPlan:
    """Which protocols run, with which settings.

    ``pools``: the feature pools of encoder rows (None: ``cls`` and ``mean`` for global targets,
    ``tokens`` for landmarks); ``finetune_pool``: the pooled features the fine-tune head reads
    on global targets (landmarks: ``tokens``); ``finetune`` None skips fine-tuning.
    """

    protocols: tuple[str, ...] = PROTOCOLS
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    pools: tuple[str, ...] | None = None
    finetune_pool: str = "mean"
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols}")


def pools_for(extractor: Extractor, data: LabelledSet, plan: EvalPlan) -> tuple[str, ...]:
    """The feature pools a row is evaluated with on ``data``."""
    if extractor.encoder is not None and plan.pools is not None:
        return plan.pools
    return (extractor.spatial_pool,) if data.targets.kind == "landmarks" else extractor.global_pools


def _frozen_results(extractor: Extractor, data: LabelledSet, features: dict[str, torch.Tensor],
                    plan: EvalPlan) -> list[dict[str, Any]]:
    rows = {s: torch.as_tensor(data.indices(s), dtype=torch.long) for s in SPLITS}
    targets = {s: data.targets.select(rows[s].tolist()) for s in SPLITS}
    results = []
    for pool in pools_for(extractor, data, plan):
        transformed = extractor.fit_transform(pool, features[pool], rows["train"])
        split_features = {s: transformed[rows[s]] for s in SPLITS}
        for protocol in plan.protocols:
            if protocol == "finetune" or not applies(protocol, data.targets.kind):
                continue
            start = time.perf_counter()
            result = run_frozen(protocol, split_features, targets, plan.probe)
            results.append({"protocol": protocol, "pool": pool, "feature_dim": int(transformed.shape[1]),
                            "seconds": round(time.perf_counter() - start, 2), **result})
            logger.info("%s / %s / %s (%s): %.4g +- %.4g %s", extractor.name, data.source, protocol, pool,
                        result["mean"], result["std"], result["unit"])
    return results


def _finetune_result(extractor: Extractor, data: LabelledSet, plan: EvalPlan) -> dict[str, Any] | None:
    if "finetune" not in plan.protocols or plan.finetune is None or extractor.encoder is None:
        return None
    pool = "tokens" if data.targets.kind == "landmarks" else plan.finetune_pool
    start = time.perf_counter()
    result = run_finetune(extractor.encoder, data, pool=pool, cfg=plan.finetune, device=plan.device)
    logger.info("%s / %s / finetune (%s): %.4g +- %.4g %s", extractor.name, data.source, pool, result["mean"],
                result["std"], result["unit"])
    return {"protocol": "finetune", "pool": pool, "seconds": round(time.perf_counter() - start, 2), **result}


def evaluate_sets(extractor: Extractor, sets: Sequence[tuple[str, LabelledSet]], plan: EvalPlan) -> dict[str, Any]:
    """Every protocol of ``plan`` for one row on every ``(task name, labelled set)``.

    Returns ``{task name: {"data": ..., "warnings": [...], "results": [...]}}``; every result holds
    the protocol, the pool and the summary of :func:`pacofr.eval.metrics.summarise`.
    """
    warnings = {name: check_labelled(data) for name, data in sets}
    by_images: dict[int, list[tuple[str, LabelledSet]]] = {}
    for name, data in sets:
        by_images.setdefault(id(data.images), []).append((name, data))
    out: dict[str, Any] = {}
    for group in by_images.values():
        images = group[0][1].images
        frozen = any(p in plan.protocols for p in FROZEN_PROTOCOLS)
        pools = sorted({p for _, data in group for p in pools_for(extractor, data, plan)}) if frozen else []
        start = time.perf_counter()
        features = extract_features(extractor, images, pools, batch_size=plan.batch_size,
                                    device=plan.device) if pools else {}
        seconds = round(time.perf_counter() - start, 1)
        logger.info("%s: %s features of %d images in %.0f s", extractor.name, pools, len(images), seconds)
        for name, data in group:
            results = _frozen_results(extractor, data, features, plan) if pools else []
            tuned = _finetune_result(extractor, data, plan)
            out[name] = {"data": describe_data(data), "warnings": warnings[name], "feature_seconds": seconds,
                         "results": results + ([tuned] if tuned else [])}
    return {name: out[name] for name, _ in sets}
