"""The training step never materialises an (N, K) tensor of patches x codes (beliefs, logits, their gradients)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pacofr.data.regions import template_region_ids
from pacofr.models import ModelConfig, PaCoFR

pytestmark = pytest.mark.usefixtures("one_thread")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.where = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.numel() > self.numel:
                self.numel, self.where = value.numel(), f"{func} -> {tuple(value.shape)}"
        return out


@pytest.mark.parametrize("incubation", [True, False])
@pytest.mark.parametrize("bp_input", ["pixels", "context"])
def test_step_holds_no_patch_by_code_tensor(incubation: bool, bp_input: str) -> None:
    codes, batch = 16384, 64
    cfg = ModelConfig.preset("tiny", codebook_size=codes, bp_input=bp_input, bp_after="keep_small")
    torch.manual_seed(0)
    model = PaCoFR(cfg).train()
    images = torch.rand(batch, 3, cfg.img_size, cfg.img_size)
    region_ids = template_region_ids(cfg.grid_size, cfg.img_size).expand(batch, -1).contiguous()
    patches = batch * cfg.num_patches  # incubation labels every patch: N = B * L
    with LargestTensor() as largest:
        out = model(images, region_ids, incubation=incubation)
        out.loss.backward()
    assert "bp" in out.losses and "ent" in out.losses
    # the ops keep bounded chunks (2^22 scores); a dense (N, K) logits matrix or its gradient is 4x that here
    assert largest.numel <= patches * codes // 2, f"an N x K-sized tensor was built: {largest.where}"
