"""PaCoFR end to end on tiny models (CPU): every flag runs, loss assembly, phases, training, hooks."""

from __future__ import annotations

import math

import pytest
import torch

from pacofr.data.regions import template_region_ids
from pacofr.models import ModelConfig, PaCoFR
from pacofr.ops import patch_targets

BATCH = 4

# every non-default flag value of method.md (the default config covers the defaults)
FLAG_CASES = [
    {},
    {"mask_mode": "random"},
    {"mask_mode": "block"},
    {"replace_from": "masked"},
    {"replace_from": "all"},
    {"encoder_mask": "mask_token"},
    {"encoder_pos": "learned"},
    {"bp_input": "context"},
    {"bp_after": "decay"},
    {"bp_after": "keep_small"},
    {"code_update": "ema"},
    {"target": "pixels"},
    {"rec_on": "all"},
    {"sc": "equivariance"},
    {"sc": "off"},
    {"straight_through": True},
    {"num_candidates": 1},
    {"num_candidates": 2},
    {"num_candidates": 8},
    {"incubation_patches": "replaced"},
    {"method": "mae"},
    {"r_rep": 0.0},
    {"regularise_in_incubation": False},
]
# parameters a flag leaves idle by design
IDLE = {"r_rep": {"patch_codebook.code2tok.weight", "patch_codebook.code2tok.bias"}}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **overrides)


def face_batch(cfg: ModelConfig, batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images in [0, 1] (structure a decoder can learn) and template region ids."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=cfg.img_size, mode="bilinear", align_corners=False)
    images = (images + 0.05 * torch.rand(images.shape, generator=g)).clamp(0, 1)
    region_ids = template_region_ids(cfg.grid_size, cfg.img_size).expand(batch, -1).contiguous()
    return images, region_ids


def grads_of(model: PaCoFR) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", FLAG_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_every_flag_runs_forward_backward(overrides: dict, generator: torch.Generator) -> None:
    cfg = tiny(**overrides)
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    received: set[str] = set()
    for incubation in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(images, region_ids, incubation=incubation, generator=generator)
        assert out.loss.dim() == 0 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        assert out.loss.requires_grad
        assert all(not v.requires_grad and v.dim() == 0 for v in (*out.losses.values(), *out.stats.values()))
        assert set(out.losses) <= set(model.loss_names()) and set(out.stats) <= set(model.stat_names())
        out.loss.backward()
        for name, grad in grads_of(model).items():
            assert torch.isfinite(grad).all(), name
            received.add(name)
        model.after_step(teacher_momentum=0.99)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    idle = set().union(*(IDLE.get(key, set()) for key in overrides))
    assert trainable - received == idle, "parameters that never get a gradient are wired wrong"


def test_loss_is_the_weighted_sum_of_the_reported_terms(generator: torch.Generator) -> None:
    cfg = tiny(w_bp=0.7, w_code=1.3, w_align=0.4, w_ent=0.02, w_sc=0.3, alpha_rep=0.6)
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    out = model(images, region_ids, incubation=True, generator=generator)
    t = out.losses
    assert set(t) == {"rec", "rec_masked", "rec_replaced", "bp", "code", "ent", "sc"}
    assert torch.allclose(t["rec"], t["rec_masked"] + 0.6 * t["rec_replaced"])
    expected = t["rec"] + 0.7 * t["bp"] + 1.3 * t["code"] + 0.02 * t["ent"] + 0.3 * t["sc"]
    assert torch.allclose(out.loss.detach(), expected, rtol=1e-5)
    out = model(images, region_ids, incubation=False, generator=generator)
    t = out.losses
    assert set(t) == {"rec", "rec_masked", "rec_replaced", "align", "ent", "sc"}
    expected = t["rec"] + 0.4 * t["align"] + 0.02 * t["ent"] + 0.3 * t["sc"]
    assert torch.allclose(out.loss.detach(), expected, rtol=1e-5)
    assert 0 <= t["ent"] <= math.log(cfg.codebook_size)


def test_bp_after_incubation_variants(generator: torch.Generator) -> None:
    images, region_ids = face_batch(tiny())
    keep = PaCoFR(tiny(bp_after="keep_small", bp_small_weight=0.1))
    out = keep(images, region_ids, incubation=False, generator=generator)
    assert "bp" in out.losses and "code" not in out.losses and out.stats["bp_weight"].item() == pytest.approx(0.1)

    decay = PaCoFR(tiny(bp_after="decay", bp_decay_half_life=2))
    weights = []
    for _ in range(3):
        out = decay(images, region_ids, incubation=False, generator=generator)
        out.loss.backward()
        decay.after_step()
        weights.append(out.stats["bp_weight"].item())
    assert weights == pytest.approx([1.0, 0.5 ** 0.5, 0.5])
    assert int(decay.post_incubation_steps) == 3

    off = PaCoFR(tiny())
    out = off(images, region_ids, incubation=False, generator=generator)
    assert "bp" not in out.losses and out.stats["bp_weight"].item() == 0.0


def test_context_beliefs_only_after_incubation(generator: torch.Generator) -> None:
    cfg = tiny(bp_input="context")
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    assert "ctx" not in model(images, region_ids, incubation=True, generator=generator).losses
    out = model(images, region_ids, incubation=False, generator=generator)
    assert out.losses["ctx"] >= 0
    out.loss.backward()
    assert model.context_head.weight.grad is not None


@pytest.mark.parametrize("code_update", ["grad", "ema"])
def test_codebook_gradient_follows_code_update(code_update: str, generator: torch.Generator) -> None:
    cfg = tiny(code_update=code_update, sc="off")
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    weight = model.patch_codebook.codebook.weight
    model(images, region_ids, incubation=True, generator=generator).loss.backward()
    assert (weight.grad is None) == (code_update == "ema")
    before = weight.detach().clone()
    model.after_step()
    changed = not torch.equal(before, weight.detach())
    assert changed == (code_update == "ema"), "EMA codes move in after_step, gradient codes do not"
    weight.grad = None
    model(images, region_ids, incubation=False, generator=generator).loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0, "after incubation E learns by gradient"


def test_mae_control(generator: torch.Generator) -> None:
    cfg = tiny(method="mae")
    model = PaCoFR(cfg)
    assert model.patch_codebook is None and model.teacher is None and model.sc_proj is None
    images, region_ids = face_batch(cfg)
    out = model(images, region_ids, incubation=True, generator=generator)
    assert set(out.losses) == {"rec", "rec_masked"} and out.stats == {}
    assert torch.equal(out.loss.detach(), out.losses["rec"])
    assert model.after_step() == {}


def _train(model: PaCoFR, images: torch.Tensor, region_ids: torch.Tensor, incubation: bool,
           steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Evaluate (fixed masks), take ``steps`` AdamW steps, evaluate again with the same masks."""
    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            out = model(images, region_ids, incubation=incubation, generator=torch.Generator().manual_seed(123))
        return {"loss": out.loss.item(), **{k: v.item() for k, v in out.losses.items()}}

    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=2e-3, betas=(0.9, 0.95))
    before = evaluate()
    for step in range(steps):
        out = model(images, region_ids, incubation=incubation, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.after_step(teacher_momentum=0.99)
    return before, evaluate()


@pytest.mark.parametrize("method", ["paco", "mae"])
def test_training_reduces_the_loss(method: str) -> None:
    torch.manual_seed(0)
    cfg = tiny(method=method)
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg, batch=8)
    phases = (True, False) if method == "paco" else (False,)
    for incubation in phases:
        before, after = _train(model, images, region_ids, incubation, steps=40)
        assert after["loss"] < 0.8 * before["loss"], (incubation, before, after)
        assert after["rec"] < before["rec"], (incubation, before, after)
        if incubation:
            assert after["code"] < before["code"] and after["bp"] < before["bp"], (before, after)


def test_reconstruct_shapes_range_and_pasting(generator: torch.Generator) -> None:
    cfg = tiny()
    model = PaCoFR(cfg).train()
    images, region_ids = face_batch(cfg)
    panels = model.reconstruct(images, region_ids, generator=torch.Generator().manual_seed(5))
    assert model.training, "reconstruct restores the training mode"
    assert set(panels) == {"input", "corrupted", "reconstruction"}
    for image in panels.values():
        assert image.shape == images.shape and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
    assert torch.equal(panels["input"], images)
    # the same masks again, to know which patches were visible / masked
    from pacofr.masking import sample_masks

    masks = sample_masks(region_ids, cfg, torch.Generator().manual_seed(5))
    p, g = cfg.patch_size, cfg.grid_size
    pixel_labels = masks.membership().view(-1, 1, g, 1, g, 1).expand(-1, 3, g, p, g, p).reshape(images.shape)
    visible = pixel_labels == 0
    assert torch.equal(panels["reconstruction"][visible], images[visible])
    assert torch.equal(panels["corrupted"][visible], images[visible])
    assert (panels["corrupted"][pixel_labels == 2] == 0.5).all()


@pytest.mark.parametrize("target", ["norm_pix", "pixels"])
def test_reconstruct_denormalises_a_perfect_prediction(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that predicts its target exactly reconstructs the input exactly."""
    cfg = tiny(target=target)
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)

    def perfect(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return patch_targets(images, ids, cfg.patch_size, norm_pix=target == "norm_pix", eps=cfg.norm_pix_eps)

    monkeypatch.setattr(model.decoder, "predict", perfect)
    panels = model.reconstruct(images, region_ids, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(panels["reconstruction"], images, atol=1e-4)


def test_param_groups() -> None:
    model = PaCoFR(tiny(encoder_pos="learned"))
    decay_group, no_decay_group = model.param_groups(0.05)
    assert decay_group["weight_decay"] == 0.05 and no_decay_group["weight_decay"] == 0.0
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    assert not decay & no_decay
    named = dict(model.named_parameters())
    trainable = {id(p) for p in named.values() if p.requires_grad}
    assert decay | no_decay == trainable
    assert not any(id(p) in trainable for p in model.teacher.parameters())
    for name in ("encoder.cls_token", "encoder.pos_embed", "decoder.mask_token", "patch_codebook.codebook.weight"):
        assert id(named[name]) in no_decay, name
    for name, p in named.items():
        if p.ndim <= 1 and p.requires_grad:
            assert id(p) in no_decay, name
    for name in ("encoder.blocks.0.attn.qkv.weight", "decoder.pred.weight", "patch_codebook.code2pix.weight",
                 "patch_codebook.belief.fc1.weight", "sc_proj.weight"):
        assert id(named[name]) in decay, name
    fixed = PaCoFR(tiny())
    assert not fixed.encoder.pos_embed.requires_grad
    assert all(p is not fixed.encoder.pos_embed for g in fixed.param_groups(0.05) for p in g["params"])


def test_teacher_ema_update() -> None:
    model = PaCoFR(tiny())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in model.encoder.parameters()]
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.parameters(), teacher))
    model.after_step(teacher_momentum=0.25)
    for t, t0, s in zip(model.teacher.parameters(), teacher, student):
        assert torch.allclose(t, 0.25 * t0 + 0.75 * s, atol=1e-6)
    model.update_teacher(0.0)
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.parameters(), student))
    model.train()
    assert not model.teacher.training


def test_dead_codes_are_restarted_from_beliefs(generator: torch.Generator) -> None:
    cfg = tiny(dead_code_warmup=1, dead_code_threshold=0.5, sc="off")
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    book = model.patch_codebook
    model(images, region_ids, incubation=False, generator=generator)
    assert model.after_step()["restarted_codes"] > 0, "K=64 codes and 8 queries: most codes are dead"
    model(images, region_ids, incubation=False, generator=generator)
    q = model._pending[-1].q
    before = book.codebook.weight.detach().clone()
    restarted = model.after_step()["restarted_codes"]
    changed = (book.codebook.weight != before).any(dim=1)
    # a code re-drawn from the same belief as last step keeps its value, hence >=
    assert restarted >= changed.sum().item() > 0
    # every restarted code is one of the current beliefs (unit vectors)
    new_rows = book.codebook.weight[changed]
    distance = (new_rows.unsqueeze(1) - q.unsqueeze(0)).norm(dim=-1).min(dim=1).values
    assert distance.max() < 1e-5


def test_usage_tracking_units(generator: torch.Generator) -> None:
    """Usage is counted so that a uniformly used code gets 1 per step whatever the batch size."""
    model = PaCoFR(tiny(restart_dead_codes=False))
    book = model.patch_codebook
    indices = torch.arange(64).repeat(3).unsqueeze(1)  # every code three times
    book.track_usage(indices, None)
    assert torch.allclose(book.codebook.ema_counts, torch.full((64,), 1 - book.codebook.decay))


def test_non_finite_batches_do_not_poison_the_codebook(generator: torch.Generator) -> None:
    cfg = tiny(dead_code_warmup=0, dead_code_threshold=0.5, sc="off")
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    images[0] = float("nan")
    out = model(images, region_ids, incubation=False, generator=generator)
    assert not torch.isfinite(out.loss)
    model.after_step()
    assert torch.isfinite(model.patch_codebook.codebook.weight).all()
    assert torch.isfinite(model.patch_codebook.codebook.ema_counts).all()


def test_eval_forwards_leave_no_codebook_work(generator: torch.Generator) -> None:
    model = PaCoFR(tiny()).eval()
    images, region_ids = face_batch(tiny())
    with torch.no_grad():
        model(images, region_ids, incubation=True, generator=generator)
    assert model._pending == []


def test_bf16_autocast(generator: torch.Generator) -> None:
    cfg = tiny()
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    for incubation in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, region_ids, incubation=incubation, generator=generator)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_inputs() -> None:
    cfg = tiny()
    model = PaCoFR(cfg)
    images, region_ids = face_batch(cfg)
    with pytest.raises(ValueError, match="img_size=32"):
        model(torch.rand(2, 3, 64, 64), region_ids[:2], incubation=True)
    with pytest.raises(ValueError, match="region_ids must have shape"):
        model(images, region_ids[:, :8], incubation=True)
    with pytest.raises(TypeError, match="region_ids"):
        model(images, region_ids.int(), incubation=True)


@pytest.mark.parametrize("regularise", [True, False])
def test_entropy_and_consistency_in_incubation_follow_the_flag(regularise: bool, generator: torch.Generator) -> None:
    images, region_ids = face_batch(tiny())
    model = PaCoFR(tiny(regularise_in_incubation=regularise))
    incubating = model(images, region_ids, incubation=True, generator=generator).losses
    after = model(images, region_ids, incubation=False, generator=generator).losses
    assert ({"ent", "sc"} <= incubating.keys()) is regularise
    assert not ({"ent", "sc"} & incubating.keys()) or regularise
    assert {"ent", "sc", "align"} <= after.keys()
