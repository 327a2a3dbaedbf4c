"""The model on the fused Triton ops (interpreter on CPU) equals the model on the torch reference.

The kernel tests check every op alone; this checks the model wires them in correctly: the same
weights, batch and mask generator give the same losses and gradients with ``backend="triton"``
as with ``backend="torch"``, in the incubation and in the end-to-end phase, up to the fp32 rounding
spread measured on the torch reference (``_rounding_support``).
"""

from __future__ import annotations

import pytest
import torch

from _rounding_support import Results, assert_within_rounding, losses_and_gradients, reference_and_rounding_spread
from pacofr.data.regions import template_region_ids
from pacofr.models import ModelConfig, build_model
from pacofr.ops import backend_status

pytestmark = pytest.mark.skipif(not backend_status("triton", torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu"))[0],
                                reason="triton cannot run here (on CPU it needs TRITON_INTERPRET=1)")


def _run(model: torch.nn.Module, images: torch.Tensor, region_ids: torch.Tensor, incubation: bool) -> Results:
    model.zero_grad(set_to_none=True)
    out = model(images, region_ids, incubation=incubation, generator=torch.Generator().manual_seed(7))
    return losses_and_gradients(model, out)


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

    # the tolerance: ROUNDING_FACTOR times the spread of 3 reruns of the fp32 reference with every
    # parameter nudged by one ulp (the size of an fp32 rounding error here; derivation in _rounding_support)
    want, spread = reference_and_rounding_spread(
        reference, lambda model: _run(model, images, region_ids, incubation), 3, torch.Generator().manual_seed(2))
    got = _run(fused, images, region_ids, incubation)

    assert any(name.startswith("grad:") for name in want)
    assert_within_rounding(got, want, spread)
