"""Checkpoints written before MAE-face became its own model still load.

Until then the MAE-face control and the MCF-style model were built on PaCoFR and carried its
``post_incubation_steps`` buffer, so their ``model.safetensors`` hold that key, which the models no
longer have. The checkpoint here is written with exactly that layout: today's model plus the old
buffer (a 0-d int64 tensor), saved by :func:`pacofr.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _peer_helpers import tiny_peer
from pacofr import checkpoint as ckpt
from pacofr.models import build_model


@pytest.mark.parametrize("method", ["mae", "mcf"])
def test_a_checkpoint_with_the_retired_step_counter_loads(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = build_model(tiny_peer(method))
    old.register_buffer("post_incubation_steps", torch.tensor(7))  # the old layout's extra key
    assert "post_incubation_steps" in old.state_dict()
    folder = ckpt.save_checkpoint(tmp_path, old, {"step": 1}, {"step": 1, "epoch": 0})

    torch.manual_seed(1)  # other initial weights, so the load must replace every one of them
    new = build_model(tiny_peer(method))
    assert "post_incubation_steps" not in new.state_dict()
    ckpt.load_weights(new, folder)  # strict: any other unknown or missing key is still refused
    old_state = {k: v for k, v in old.state_dict().items() if k != "post_incubation_steps"}
    assert set(new.state_dict()) == set(old_state)
    assert all(torch.equal(new.state_dict()[k], v) for k, v in old_state.items())


def test_paco_keeps_its_step_counter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = build_model(tiny_peer("paco"))
    old.post_incubation_steps.fill_(5)
    folder = ckpt.save_checkpoint(tmp_path, old, {"step": 1}, {"step": 1, "epoch": 0})
    new = build_model(tiny_peer("paco"))
    ckpt.load_weights(new, folder)
    assert int(new.post_incubation_steps) == 5


def test_an_unknown_key_is_still_refused(tmp_path: Path) -> None:
    old = build_model(tiny_peer("mae"))
    old.register_buffer("something_else", torch.tensor(1))
    folder = ckpt.save_checkpoint(tmp_path, old, {"step": 1}, {"step": 1, "epoch": 0})
    with pytest.raises(ckpt.CorruptCheckpointError, match="model.safetensors cannot be loaded"):
        ckpt.load_weights(build_model(tiny_peer("mae")), folder)
