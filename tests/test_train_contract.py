"""Every method's model satisfies the trainer's contract (pacofr.train.contract), checked on a real forward."""

from __future__ import annotations

import inspect

import pytest
import torch

from _peer_helpers import demo_batch, tiny_peer
from pacofr.models import MODEL_CLASSES, build_model
from pacofr.train.contract import PretrainingModel, StepMaintenance, TrainingOutput


def _parameters(function: object) -> list[tuple[str, object]]:
    """(name, kind) of a callable's parameters after ``self``."""
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("method", sorted(MODEL_CLASSES))
def test_every_methods_model_satisfies_the_training_contract(method: str) -> None:
    model = build_model(tiny_peer(method)).train()
    assert isinstance(model, PretrainingModel)
    # runtime_checkable only sees that the methods exist: their parameters must match the contract's too
    assert _parameters(type(model).forward) == _parameters(PretrainingModel.__call__)
    for name in ("param_groups", "reconstruct", "step_maintenance"):
        assert _parameters(getattr(type(model), name)) == _parameters(getattr(PretrainingModel, name)), name

    images, region_ids = demo_batch(model.cfg, batch=2)
    maintenance = model.step_maintenance()
    assert isinstance(maintenance, StepMaintenance)
    for incubation in (True, False):
        out = model(images, region_ids, incubation=incubation, generator=torch.Generator().manual_seed(0))
        assert isinstance(out, TrainingOutput)
        assert out.loss.dim() == 0 and out.loss.requires_grad
        assert all(not v.requires_grad for v in (*out.losses.values(), *out.stats.values()))
        out.loss.backward()
        maintenance.record(out)
        report = maintenance.apply(teacher_momentum=0.99)
        assert all(isinstance(v, float) for v in report.values())
    maintenance.discard()
    groups = model.param_groups(0.05)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    panels = model.reconstruct(images, region_ids, generator=torch.Generator().manual_seed(0))
    assert all(v.shape == images.shape for v in panels.values())
