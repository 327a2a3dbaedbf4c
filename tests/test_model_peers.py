"""What the MCF-style and FRA-style models share: training on a fixed batch lowers every loss, the
momentum copies follow their online modules, bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from _peer_helpers import demo_batch, params_without_gradient, tiny_peer
from pacofr.models import build_model
from test_model_paco import learned_beyond_control

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["mcf", "fra"]


@pytest.mark.parametrize("method", METHODS)
def test_training_reduces_every_loss(method: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_peer(method))
    images, region_ids = demo_batch(model.cfg, batch=8)
    # the loss must end below 40 steps without learning by more than 3 of their step-to-step spreads
    before, after, verdict = learned_beyond_control(model, images, region_ids, incubation=False, steps=40)
    assert not verdict, verdict
    for name in model.loss_names():
        assert after[name] < before[name], (name, before, after)


@pytest.mark.parametrize("method", METHODS)
def test_step_maintenance_moves_every_momentum_copy(method: str) -> None:
    model = build_model(tiny_peer(method))
    heads = model.online_heads()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    online = [p.detach().clone() for m in (model.encoder, *heads.values()) for p in m.parameters()]
    copies = [model.teacher, *(model.momentum[name] for name in heads)]
    assert sum(1 for m in copies for _ in m.parameters()) == sum(1 for _ in model.teacher.parameters()) + \
        sum(1 for _ in model.momentum.parameters()), "every momentum parameter is a copy of an online one"
    before = [p.detach().clone() for m in copies for p in m.parameters()]
    maintenance = model.step_maintenance()
    assert maintenance.apply() == {}  # without a momentum nothing moves
    assert all(torch.equal(p, b) for p, b in zip([p for m in copies for p in m.parameters()], before))
    maintenance.apply(teacher_momentum=0.25)
    for t, t0, s in zip([p for m in copies for p in m.parameters()], before, online, strict=True):
        torch.testing.assert_close(t, 0.25 * t0 + 0.75 * s)
    model.train()
    assert model.training and not model.teacher.training and not model.momentum.training


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast(method: str, generator: torch.Generator) -> None:
    model = build_model(tiny_peer(method))
    images, region_ids = demo_batch(model.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, region_ids, incubation=False, generator=generator)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert params_without_gradient(model) == []
