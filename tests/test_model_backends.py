"""The model on the fused Triton ops (interpreter on CPU) equals the model on the torch reference.

The kernel tests check every op alone; this checks the model wires them in correctly: the same
weights, batch and mask generator give the same losses and gradients with ``backend="triton"``
as with ``backend="torch"``, in the incubation and in the end-to-end phase.
"""

from __future__ import annotations

import pytest
import torch

from pacofr.data.regions import template_region_ids
from pacofr.models import ModelConfig, build_model
from pacofr.ops import backend_status

pytestmark = pytest.mark.skipif(not backend_status("triton", torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu"))[0],
                                reason="triton cannot run here (on CPU it needs TRITON_INTERPRET=1)")


def _run(model: torch.nn.Module, images: torch.Tensor, region_ids: torch.Tensor, incubation: bool
         ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(images, region_ids, incubation=incubation, generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    losses = {name: float(value) for name, value in out.losses.items()}
    losses["total"] = float(out.loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("incubation", [True, False], ids=["incubation", "end_to_end"])
@pytest.mark.parametrize("method", ["paco", "mae"])
def test_triton_backend_matches_torch_backend(method: str, incubation: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    reference = build_model(ModelConfig.preset("tiny", method=method, backend="torch")).to(device)
    fused = build_model(ModelConfig.preset("tiny", method=method, backend="triton")).to(device)
    fused.load_state_dict(reference.state_dict())
    cfg = reference.cfg
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
    region_ids = template_region_ids(cfg.grid_size, cfg.img_size).expand(3, -1).contiguous().to(device)

    want_losses, want_grads = _run(reference, images, region_ids, incubation)
    got_losses, got_grads = _run(fused, images, region_ids, incubation)

    assert got_losses.keys() == want_losses.keys()
    for name, value in want_losses.items():
        assert got_losses[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
