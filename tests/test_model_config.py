"""ModelConfig: method.md defaults, presets, validation, round trips, YAML-style coercion."""

from __future__ import annotations

import pytest

from pacofr.models import ModelConfig
from pacofr.train.fields import ConfigError, from_dict, set_by_path


def test_defaults_are_method_md() -> None:
    cfg = ModelConfig()
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (224, 16, 768, 12, 12)
    assert (cfg.num_patches, cfg.patch_dim) == (196, 768)
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (512, 8, 16)
    assert (cfg.codebook_size, cfg.code_dim, cfg.bp_hidden, cfg.num_candidates, cfg.tau_b) == (4096, 64, 512, 4, 0.1)
    assert (cfg.r_mask, cfg.r_rep, cfg.num_regions, cfg.other_region, cfg.regions) == (0.75, 0.1, 14, -1, "landmarks")
    assert (cfg.mask_mode, cfg.replace_from, cfg.encoder_mask, cfg.straight_through) == ("random", "masked", "drop", False)
    assert (cfg.bp_after, cfg.bp_input, cfg.code_update, cfg.target, cfg.rec_on, cfg.sc) == (
        "off", "pixels", "grad", "norm_pix", "masked+replaced", "relation")
    assert (cfg.codebook, cfg.prototypes, cfg.bp_ste, cfg.low_usage_threshold, cfg.alpha_rep) == (
        True, "table", True, 0.1, 1.0)
    assert (cfg.w_align, cfg.w_ent, cfg.w_sc, cfg.teacher_momentum, cfg.teacher_momentum_end) == (0.5, 0.01, 0.1, 0.996, 1.0)
    assert (cfg.norm_pix_eps, cfg.mae_mask_ratio) == (1e-6, 0.75)


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_presets(name: str) -> None:
    cfg = ModelConfig.preset(name)
    assert cfg.img_size % cfg.patch_size == 0
    assert ModelConfig.preset(name, sc="off").sc == "off"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_names_and_demo_size() -> None:
    assert set(ModelConfig.preset_names()) == {"tiny", "demo", "vit_tiny", "vit_small", "vit_base"}
    demo = ModelConfig.preset("demo")
    assert 64 <= demo.img_size <= 96 and 96 <= demo.embed_dim <= 192 and 4 <= demo.depth <= 6
    assert 256 <= demo.codebook_size <= 512
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")


@pytest.mark.parametrize("changes, message", [
    ({"img_size": 100}, "multiple of patch_size"),
    ({"embed_dim": 100, "num_heads": 12}, "divisible by num_heads"),
    ({"num_candidates": 8, "codebook_size": 4}, "num_candidates"),
    ({"replace_from": "visible", "r_mask": 0.9, "r_rep": 0.1}, "leave no pixel patch"),
    ({"replace_from": "masked", "r_mask": 0.1, "r_rep": 0.2}, "replace_from='masked'"),
    ({"tau_b": 0.0}, "tau_b"),
    ({"r_mask": 1.5}, "r_mask"),
    ({"teacher_momentum": 0.9, "teacher_momentum_end": 0.8}, "teacher_momentum"),
    ({"pixel_std": (1.0, 0.0, 1.0)}, "pixel_std"),
    ({"other_region": 14}, "other_region"),
    ({"alpha_rep": 1.5}, "alpha_rep"),
    ({"codebook": False, "bp_input": "context"}, "needs the codebook"),
    ({"low_usage_threshold": 2.0}, "low_usage_threshold"),
    ({"w_sc": -1.0}, "w_sc"),
    ({"sc": "layuot"}, "sc must be one of"),
    ({"mlp_ratio": -1.0}, "mlp_ratio must be > 0"),
    ({"mlp_ratio": 1e-4}, "mlp_ratio must be > 0"),  # int(768 * 1e-4) = 0: no MLP width
    ({"drop_path_rate": 2.0}, r"drop_path_rate must be in \[0, 1\)"),
    ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
    ({"num_regions": 1}, "num_regions must be >= 2"),
    ({"timm_name": ""}, "timm_name must name"),
    ({"timm_name": "  "}, "timm_name must name"),
    ({"codebook_size": 10**11}, "more than .* parameters"),
    ({"embed_dim": 10**6, "num_heads": 1}, "more than .* parameters"),
    ({"img_size": 16 * 10**5}, "patches; at most"),
])
def test_validation_names_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)
    with pytest.raises(ValueError, match=message):
        ModelConfig().replace(**changes)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"codebook_count": 3})


def test_yaml_style_values_are_coerced_and_checked() -> None:
    cfg = from_dict(ModelConfig, {"sc": "off", "pixel_mean": [0.5, 0.5, 0.5], "straight_through": "true"})
    assert cfg.sc == "off" and cfg.pixel_mean == (0.5, 0.5, 0.5) and cfg.straight_through is True
    assert set_by_path(cfg, "mask_mode", "block").mask_mode == "block"
    with pytest.raises(ConfigError, match="mask_mode"):
        set_by_path(cfg, "mask_mode", "stripes")


def test_timm_kwargs() -> None:
    cfg = ModelConfig.preset("demo")
    assert cfg.timm_kwargs() == dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                                     mlp_ratio=4.0, drop_path_rate=0.0, num_classes=0)


@pytest.mark.parametrize("preset", ["tiny", "demo", "vit_small"])
@pytest.mark.parametrize("method", ["paco", "mae"])
def test_parameter_lower_bound_is_below_the_built_models_count(preset: str, method: str) -> None:
    from pacofr.models import build_model

    cfg = ModelConfig.preset(preset, method=method)
    built = sum(p.numel() for p in build_model(cfg).parameters())  # the truth: the model itself
    assert 0 < cfg.parameter_lower_bound() <= built
