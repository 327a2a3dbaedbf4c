"""MCF-style model (``method="mcf"``): wiring against a float64 recomputation, every parameter trained,
losses fall, the momentum branch, the frozen target network, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from _peer_helpers import demo_batch, params_without_gradient, tiny_peer
from _tolerances import U32
from pacofr.models.masking import sample_masks
from pacofr.models import MCF, ModelConfig, build_model
from pacofr.models.momentum import encode_kept
from pacofr.models.vit import normalised_images
from pacofr.ops import patch_targets

pytestmark = pytest.mark.usefixtures("one_thread")

RECOMPUTED_RTOL = 8 * U32
"""Relative bound between the model's fp32 losses and the test's recomputation (the same fp32 networks, the
loss formulas in float64): what differs is the fp32 reductions of the losses themselves. Measured over 30
seeds (initialisation and masks): worst 2.5 u per term and 2.3 u for the weighted total; 8 u is 3.2x that."""


def write_timm_folder(folder: Path, architecture: str, **model_args: object) -> Path:
    """A timm model folder (config.json + model.safetensors) of a randomly initialised ``architecture``."""
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    size = model.pretrained_cfg["input_size"][-1] if "img_size" not in model_args else model_args["img_size"]
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": architecture, "num_classes": 0, "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, size, size], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    return folder


@pytest.mark.parametrize("target", ["ema", ""])
def test_every_parameter_gets_a_gradient(target: str, generator: torch.Generator) -> None:
    cfg = tiny_peer("mcf", mcf_target=target)
    model = build_model(cfg)
    assert isinstance(model, MCF) and (model.feature_head is None) == (target == "")
    images, region_ids = demo_batch(cfg)
    out = model(images, region_ids, incubation=False, generator=generator)
    assert set(out.losses) == set(model.loss_names()) == ({"rec", "con"} | ({"feat"} if target else set()))
    assert out.loss.dtype == torch.float32 and out.loss.requires_grad and torch.isfinite(out.loss)
    out.loss.backward()
    assert params_without_gradient(model) == []
    assert all(p.grad is None for p in [*model.teacher.parameters(), *model.momentum.parameters()])


def test_losses_match_a_recomputation_from_the_pieces() -> None:
    """The terms recomputed from the model's encoder, decoder and heads with the same masks (each
    view paired with the other's key), the loss formulas in float64."""
    cfg = tiny_peer("mcf", w_mcf_rec=0.3, w_mcf_feat=0.7, w_mcf_con=1.9)
    torch.manual_seed(0)
    model = MCF(cfg)
    with torch.no_grad():  # a teacher that differs from the encoder, as after some training
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in model.momentum.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, region_ids = demo_batch(cfg, batch=5)
    out = model(images, region_ids, generator=torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(9)
    views = [sample_masks(region_ids, cfg, g) for _ in range(2)]
    assert all(v.ids_masked.shape[1] == round(0.75 * cfg.num_patches) for v in views)
    assert not torch.equal(views[0].ids_masked, views[1].ids_masked), "two differently masked views"
    with torch.no_grad():
        teacher_patches = model.teacher.forward_features(normalised_images(images, cfg))[:, 1:]
        rec, feat, q, k = [], [], [], []
        for v in views:
            latent = encode_kept(model.encoder, images, v.ids_keep, cfg)
            hidden = model.decoder(latent, v.ids_restore)
            pred = model.decoder.predict(hidden, v.ids_masked).double()
            pixels = patch_targets(images, v.ids_masked, cfg.patch_size, norm_pix=True, eps=1e-6).double()
            rec.append(((pred - pixels) ** 2).mean())
            idx = v.ids_masked.unsqueeze(-1)
            picked = torch.gather(hidden[:, 1:], 1, idx.expand(-1, -1, hidden.shape[-1]))
            wanted = torch.gather(teacher_patches, 1, idx.expand(-1, -1, teacher_patches.shape[-1]))
            feat.append((1 - F.cosine_similarity(model.feature_head(picked).double(), wanted.double(), dim=-1)).mean())
            q.append(F.normalize(model.predictor(model.projector(latent[:, 0])).double(), dim=1))
            key_latent = encode_kept(model.teacher, images, v.ids_keep, cfg)
            k.append(F.normalize(model.momentum["projector"](key_latent[:, 0]).double(), dim=1))

        def contrast(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            logits = queries @ keys.T / 0.2
            return 0.4 * (torch.logsumexp(logits, 1) - logits.diagonal()).mean()

        want = {"rec": sum(rec) / 2, "feat": sum(feat) / 2, "con": (contrast(q[0], k[1]) + contrast(q[1], k[0])) / 2}
    for name, value in want.items():
        assert out.losses[name].item() == pytest.approx(value.item(), rel=RECOMPUTED_RTOL, abs=0), name
    total = 0.3 * want["rec"] + 0.7 * want["feat"] + 1.9 * want["con"]
    assert out.loss.item() == pytest.approx(total.item(), rel=RECOMPUTED_RTOL, abs=0)


def test_param_groups_cover_the_trainable_parameters_only() -> None:
    model = MCF(tiny_peer("mcf"))
    decay, no_decay = model.param_groups(0.05)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.projector.fc1.weight) in {id(p) for p in decay["params"]}
    assert id(model.projector.fc1.bias) in {id(p) for p in no_decay["params"]}


def test_the_ema_target_is_the_teachers_full_face_features() -> None:
    cfg = tiny_peer("mcf")
    model = MCF(cfg)
    images, _ = demo_batch(cfg)
    want = model.teacher.forward_features(normalised_images(images, cfg))[:, 1:]
    torch.testing.assert_close(model._feature_target(images), want, rtol=0, atol=0)


def test_a_pacofr_encoder_as_frozen_target_gives_its_own_patch_features(tmp_path: Path) -> None:
    cfg = tiny_peer("mcf", mcf_target="random:tiny")
    model = MCF(cfg)
    net = model.target_network.model
    assert not any(k.startswith("target") for k in model.state_dict()), "the frozen network is not checkpointed"
    assert all(not p.requires_grad for p in net.parameters())
    images, _ = demo_batch(cfg)
    with torch.no_grad():
        want = net.forward_features(normalised_images(images, cfg))[:, 1:]  # same size and grid: no resampling
    # the same network on the same normalised pixels, pooled onto its own grid (a mean of one cell): exact
    # (measured bit-identical over 10 initialisations)
    torch.testing.assert_close(model._feature_target(images), want, rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["test_vit", "test_resnet"])
def test_any_timm_folder_serves_as_the_frozen_target(architecture: str, tmp_path: Path,
                                                     generator: torch.Generator) -> None:
    folder = write_timm_folder(tmp_path / architecture, architecture)
    cfg = tiny_peer("mcf", mcf_target=str(folder))
    model = MCF(cfg)
    net = model.target_network.model
    assert model.feature_head.out_features == net.num_features
    images, region_ids = demo_batch(cfg)
    target = model._feature_target(images)
    assert target.shape == (4, cfg.num_patches, net.num_features) and torch.isfinite(target).all()
    frozen = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.AdamW(model.param_groups(0.05), lr=1e-2)
    out = model(images, region_ids, generator=generator)
    out.loss.backward()
    optimizer.step()
    assert "feat" in out.losses and params_without_gradient(model) == []
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), frozen))


@pytest.mark.parametrize("spec", ["/no/such/folder", "timm:no_such_architecture_xyz"])
def test_a_target_that_cannot_be_loaded_is_one_clear_error(spec: str) -> None:
    with pytest.raises(ValueError, match=rf"model.mcf_target='{spec}' cannot be loaded as a frozen target network"):
        MCF(tiny_peer("mcf", mcf_target=spec))


def test_bad_settings_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="method='mcf' .*needs encoder_mask='drop'"):
        tiny_peer("mcf", encoder_mask="mask_token")
    with pytest.raises(ValueError, match="mcf_temperature must be > 0"):
        tiny_peer("mcf", mcf_temperature=0.0)
    with pytest.raises(ValueError, match="method='mcf' needs masked patches"):
        tiny_peer("mcf", mae_mask_ratio=0.0)
    with pytest.raises(ValueError, match="MCF needs cfg.method='mcf'"):
        MCF(ModelConfig.preset("tiny"))
    cfg = tiny_peer("mcf")
    model = MCF(cfg)
    images, region_ids = demo_batch(cfg)
    with pytest.raises(ValueError, match="img_size=32"):
        model(torch.rand(2, 3, 64, 64), region_ids[:2])
    with pytest.raises(TypeError, match="region_ids"):
        model(images, region_ids.int())


def test_reconstruct_panels(generator: torch.Generator) -> None:
    cfg = tiny_peer("mcf")
    model = MCF(cfg).train()
    images, region_ids = demo_batch(cfg)
    panels = model.reconstruct(images, region_ids, generator=generator)
    assert set(panels) == {"input", "corrupted", "reconstruction"} and model.training
    assert all(p.shape == images.shape and 0 <= p.min() and p.max() <= 1 for p in panels.values())
