"""``pacofr eval linear-probe`` / ``knn`` / ``finetune`` end to end on a tiny checkpoint, an export,
random init and baselines, on a user's folders, CSVs and zips; the errors a user meets."""

from __future__ import annotations

import json
import logging
import statistics
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _eval_helpers import run_eval
from PIL import Image

from pacofr import checkpoint as ckpt
from pacofr.eval.encoders import load_encoder, random_encoder
from pacofr.eval.extractors import extract_features, open_extractor
from pacofr.eval.finetune import FinetuneConfig, run_finetune
from pacofr.eval.proxy import PROXIES, demo_overlap
from pacofr.eval.data_sources import open_data
from pacofr.eval.readers import read_labelled
from pacofr.eval.user_data_commands import DATA_HELP
from pacofr.models import PaCoFR
from pacofr.models.config import ModelConfig
from pacofr.train.config import PretrainConfig
from pacofr.train.export import export_encoder
from pacofr.train.seeding import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PaCoFR]:
    """A PaCoFR 'tiny' model whose encoder and teacher weights differ from any initialisation,
    saved with the checkpoint API like a training run does."""
    cfg = PretrainConfig(model=ModelConfig.preset("tiny", backend="torch", sc="relation"))  # with an EMA teacher
    seed_everything(123)
    model = PaCoFR(cfg.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.05 * torch.randn_like(param))
        for param in model.teacher.parameters():
            param.mul_(0.5)
    meta = {"step": 7, "epoch": 1, "config": cfg.to_dict(), "alignment_recipe": {"size": 224}}
    path = ckpt.save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints", model, {"step": 7}, meta)
    return path, model


@pytest.fixture(scope="module")
def stripes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable two-class folder: random stripes (any orientation, frequency, phase) tinted
    red-ish ("warm") or blue-ish ("cold") with random brightness and pixel noise."""
    root = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:40, 0:40].astype(np.float64)
    for label, tint in (("warm", (1.0, 0.75, 0.6)), ("cold", (0.6, 0.75, 1.0))):
        (root / label).mkdir()
        for i in range(60):
            angle = rng.uniform(0, np.pi)
            phase = (rows * np.sin(angle) + cols * np.cos(angle)) * rng.uniform(0.3, 1.2) + rng.uniform(0, 2 * np.pi)
            grey = (0.5 + 0.4 * np.sin(phase)) * rng.uniform(0.6, 1.0)
            rgb = np.clip(grey[..., None] * np.array(tint) + rng.normal(0, 0.05, (40, 40, 3)), 0, 1)
            Image.fromarray((rgb * 255).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


def _read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def _result(payload: dict, protocol: str, pool: str | None = None) -> dict:
    found = [r for r in payload["results"] if r["protocol"] == protocol and (pool is None or r["pool"] == pool)]
    assert len(found) == 1, payload["results"]
    return found[0]


def _check_summary(result: dict, seeds: int) -> None:
    tests = [r["test"] for r in result["runs"]]
    assert len(tests) == seeds and result["seeds"] == list(range(seeds))
    assert result["mean"] == pytest.approx(statistics.fmean(tests))
    assert result["std"] == pytest.approx(statistics.pstdev(tests))


def test_checkpoint_encoder_holds_the_trained_weights(tiny_checkpoint) -> None:
    path, model = tiny_checkpoint
    for teacher, module in ((False, model.encoder), (True, model.teacher)):
        loaded = load_encoder(str(path.parent.parent), teacher=teacher)  # the run folder resolves to it
        assert loaded.img_size == 32 and loaded.mean == model.cfg.pixel_mean
        assert loaded.source["step"] == 7 and loaded.source["model_args"]["img_size"] == 32
        expected = module.state_dict()
        got = loaded.model.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_linear_probe_cli_on_checkpoint_and_export_agree(tiny_checkpoint, tmp_path: Path) -> None:
    path, _ = tiny_checkpoint
    export_dir = tmp_path / "export"
    export_encoder(path, export_dir)
    common = ["--data", "proxy:lfw-face-vs-nonface", "--seeds", "2", "--epochs", "20", "--pool", "cls+mean"]
    assert run_eval(["linear-probe", "--checkpoint", str(path), "--out", str(tmp_path / "a"), *common]) == 0
    assert run_eval(["linear-probe", "--checkpoint", str(export_dir), "--out", str(tmp_path / "b"), *common]) == 0
    from_ckpt, from_export = _read(tmp_path / "a", "linear_probe"), _read(tmp_path / "b", "linear_probe")
    assert from_ckpt["row"]["kind"] == "encoder" and from_ckpt["row"]["name"] == "PaCo-FR step 7"
    assert from_ckpt["row"]["source"]["kind"] == "checkpoint" and from_export["row"]["source"]["kind"] == "export"
    assert from_export["row"]["img_size"] == 32 and from_export["row"]["std"] == list(ModelConfig().pixel_std)
    assert from_ckpt["data"]["split_sizes"] == {"train": 135, "val": 33, "test": 32}
    assert from_ckpt["data"]["per_class"]["test"] == {"face": 16, "nonface": 16}
    probe = _result(from_ckpt, "linear", "cls+mean")
    assert probe["feature_dim"] == 64  # cls + mean of a 32-d encoder
    _check_summary(probe, seeds=2)
    # identical weights, inputs and seeds: identical probes, run by run
    assert probe["runs"] == _result(from_export, "linear", "cls+mean")["runs"]
    assert from_ckpt["environment"]["versions"]["pacofr"] and from_ckpt["environment"]["date"]


def test_export_and_checkpoint_features_are_identical(tiny_checkpoint, tmp_path: Path) -> None:
    path, _ = tiny_checkpoint
    export_encoder(path, tmp_path / "export")
    data = open_data("proxy:lfw-face-vs-nonface", tmp_path)
    feats = [extract_features(open_extractor(spec), data.images, ["cls", "tokens"], indices=range(20))
             for spec in (str(path), str(tmp_path / "export"))]
    assert feats[0]["cls"].shape == (20, 32) and feats[0]["tokens"].shape == (20, 16 * 32)
    for pool in ("cls", "tokens"):
        torch.testing.assert_close(feats[0][pool], feats[1][pool], rtol=0, atol=0)


def test_probe_and_knn_learn_stripes_and_not_shuffled_labels(stripes: Path, tmp_path: Path) -> None:
    """Through the whole pipeline (files -> resize -> normalise -> random ViT -> head), an easy
    visual distinction is learnt and a random relabelling of the same images is not."""
    assert run_eval(["linear-probe", "--checkpoint", "random:tiny", "--data", str(stripes), "--pool", "mean",
                     "--seeds", "2", "--epochs", "40", "--out", str(tmp_path / "real")]) == 0
    real = _read(tmp_path / "real", "linear_probe")
    assert real["row"]["source"]["kind"] == "random" and real["row"]["source"]["preset"] == "tiny"
    assert _result(real, "linear")["mean"] > 90, real["results"]
    assert run_eval(["knn", "--checkpoint", "random:tiny", "--data", str(stripes), "--pool", "mean",
                     "--out", str(tmp_path / "knn")]) == 0
    assert _result(_read(tmp_path / "knn", "knn"), "knn")["mean"] > 80

    rng = np.random.default_rng(1)
    lines = ["path,label"] + [f"{p.relative_to(stripes).as_posix()},{'xy'[int(rng.integers(2))]}"
                             for p in sorted(stripes.rglob("*.png"))]
    (stripes / "shuffled.csv").write_text("\n".join(lines) + "\n")
    assert run_eval(["linear-probe", "--checkpoint", "random:tiny", "--data", str(stripes / "shuffled.csv"),
                     "--pool", "mean", "--seeds", "2", "--epochs", "40", "--out", str(tmp_path / "shuf")]) == 0
    assert _result(_read(tmp_path / "shuf", "linear_probe"), "linear")["mean"] < 80


def test_baselines_run_through_the_same_commands(stripes: Path, tmp_path: Path) -> None:
    for name in ("raw", "hog"):
        assert run_eval(["linear-probe", "--checkpoint", f"baseline:{name}", "--data", str(stripes), "--seeds", "1",
                         "--epochs", "20", "--out", str(tmp_path / name)]) == 0
        payload = _read(tmp_path / name, "linear_probe")
        assert payload["row"] == {"name": {"raw": "raw pixels", "hog": "HOG"}[name], "kind": "baseline",
                                  "baseline": name, "grey_size": 64}
        assert [r["pool"] for r in payload["results"]] == [name]


def test_finetune_reports_the_final_step_and_leaves_the_encoder(tiny_checkpoint, stripes: Path, tmp_path: Path) -> None:
    path, _ = tiny_checkpoint
    loaded = load_encoder(str(path))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    data = read_labelled(stripes)
    run_finetune(loaded, data, pool="cls", cfg=FinetuneConfig(steps=2, lrs=(1e-3,), seeds=(0,)))
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # a copy was trained
    assert run_eval(["finetune", "--checkpoint", str(path), "--data", str(stripes), "--steps", "30", "--seeds", "2",
                     "--lr", "1e-3,3e-3", "--out", str(tmp_path)]) == 0
    result = _result(_read(tmp_path, "finetune"), "finetune")
    _check_summary(result, seeds=2)
    assert all(len(r["train_loss_curve"]) == 30 for r in result["runs"])
    assert result["selection"]["grid"] == [{"lr": 1e-3}, {"lr": 3e-3}] and len(result["selection"]["val_scores"]) == 2
    assert result["mean"] > 80, result
    assert result["config"]["batch_size"] == 32


def test_regression_from_a_csv_and_a_zip(tmp_path: Path) -> None:
    """A user's numeric label (an age) over images in a zip: ridge head, MAE in the label's unit."""
    rng = np.random.default_rng(0)
    lines = ["path,age"]
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for i in range(120):
            age = float(rng.uniform(0, 80))
            grey = np.full((24, 24), int(40 + 2 * age), dtype=np.uint8)  # older = brighter
            archive.writestr(f"f/{i}.png", _png(grey))
            lines.append(f"f/{i}.png,{age:.1f}")
    (tmp_path / "ages.csv").write_text("\n".join(lines) + "\n")
    assert run_eval(["linear-probe", "--checkpoint", "baseline:raw", "--data", str(tmp_path / "ages.csv"),
                     "--images", str(tmp_path / "images.zip"), "--label", "age", "--regression", "--unit", "years",
                     "--seeds", "2", "--out", str(tmp_path / "o")]) == 0
    result = _result(_read(tmp_path / "o", "linear_probe"), "linear")
    assert result["metric"] == "MAE" and result["unit"] == "years" and not result["higher_is_better"]
    assert result["mean"] < 2.0 and result["std"] == 0.0  # ridge: closed form


def _png(pixels: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_random_preset_matches_the_pretraining_start() -> None:
    cfg = ModelConfig.preset("tiny")
    state = torch.random.get_rng_state()
    a = random_encoder(cfg, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # global generator untouched
    seed_everything(5)
    start = PaCoFR(cfg).encoder  # what run_pretraining builds after seed_everything(train.seed)
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in start.state_dict().items())
    b = random_encoder(cfg, seed=6)
    assert not torch.equal(a.model.patch_embed.proj.weight, b.model.patch_embed.proj.weight)


def test_proxy_set_is_labelled_as_documented(tmp_path: Path) -> None:
    data = open_data("proxy:lfw-face-vs-nonface", tmp_path)
    assert data.targets.names == ["face", "nonface"] and data.targets.values.tolist() == [0] * 100 + [1] * 100
    assert data.images.keys[0] == "face/lfw_000.png" and data.images.keys[-1] == "nonface/lfw_199.png"
    from skimage.data import lfw_subset

    first = data.images.read(0)[:, :, 0].astype(np.float64) / 255
    assert np.abs(first - lfw_subset()[0]).max() <= 0.5 / 255 + 1e-9
    assert 0 < demo_overlap() <= 100
    assert "lfw-face-vs-nonface" in DATA_HELP and set(PROXIES) == {"lfw-face-vs-nonface"}


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The stderr of a refused ``pacofr eval`` (exit 2): exactly one ``error: ...`` line."""
    capsys.readouterr()
    assert run_eval(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    return stderr


def test_bad_arguments_name_the_argument(tiny_checkpoint, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    path, _ = tiny_checkpoint
    out = ["--out", str(tmp_path / "x")]
    proxy = ["--data", "proxy:lfw-face-vs-nonface"]
    assert "--checkpoint" in _error(["linear-probe", "--checkpoint", str(tmp_path / "none"), *proxy, *out], capsys)
    text = _error(["linear-probe", "--checkpoint", "random:huge", *proxy, *out], capsys)
    assert "--checkpoint random:huge" in text and "preset must be one of" in text
    assert "--data" in _error(["linear-probe", "--checkpoint", "random:tiny", "--data", str(tmp_path / "no"), *out], capsys)
    text = _error(["linear-probe", "--checkpoint", "random:tiny", "--data", "proxy:cats", *out], capsys)
    assert "--data proxy:cats" in text and "unknown proxy set" in text
    export_encoder(path, tmp_path / "export")
    assert "--teacher" in _error(["linear-probe", "--checkpoint", str(tmp_path / "export"), "--teacher", *proxy, *out], capsys)
    one_class = tmp_path / "one.csv"
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{i}.png")
    one_class.write_text("path,label\n" + "".join(f"img/{i}.png,a\n" for i in range(3)))
    text = _error(["linear-probe", "--checkpoint", "random:tiny", "--data", str(one_class), *out], capsys)
    assert f"--data {one_class}" in text and "has 1 class(es) ['a']; a classifier needs at least 2" in text
    assert "--checkpoint" in _error(["finetune", "--checkpoint", "baseline:hog", *proxy, *out], capsys)
    assert "--teacher" in _error(["knn", "--checkpoint", "baseline:hog", "--teacher", *proxy, *out], capsys)
    assert "unknown baseline" in _error(["knn", "--checkpoint", "baseline:sift", *proxy, *out], capsys)
    assert not (tmp_path / "x").exists()  # nothing written on errors
    for bad, name in ((["--seeds", "0"], "--seeds"), (["--pool", "max"], "--pool"), (["--epochs", "-1"], "--epochs"),
                      (["--lr", "fast"], "--lr"), (["--l2", "-1"], "--l2")):
        with pytest.raises(SystemExit) as exit_info:
            run_eval(["linear-probe", "--checkpoint", "random:tiny", *proxy, *out, *bad])
        assert exit_info.value.code == 2 and f"argument {name}" in capsys.readouterr().err


def test_small_sets_without_a_test_split_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ("a", "b"):
        (tmp_path / "tiny" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "tiny" / cls / "0.png")
    assert read_labelled(tmp_path / "tiny").splits == ["train", "val"]  # fixed by the hash of the names
    text = _error(["linear-probe", "--checkpoint", "random:tiny", "--data", str(tmp_path / "tiny"),
                   "--out", str(tmp_path / "o")], capsys)
    assert "--data" in text and "the test split of the 2 labelled images is empty" in text


def test_empty_labels_and_single_image_classes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18 item 10: empty label cells made a class named ''; a class with one image scored 0.0
    without a warning."""
    (tmp_path / "img").mkdir()
    for i in range(40):
        Image.fromarray(np.full((8, 8), 6 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    rows = [f"img/{i}.png,{'dark' if i < 20 else 'light'}" for i in range(40)]
    (tmp_path / "empty.csv").write_text("path,label\n" + "\n".join(rows[:5] + ["img/5.png,"] + rows[6:]) + "\n")
    text = _error(["linear-probe", "--checkpoint", "baseline:raw", "--data", str(tmp_path / "empty.csv"),
                   "--out", str(tmp_path / "o")], capsys)
    assert "--data" in text and "empty label" in text and "row 7 (img/5.png)" in text
    (tmp_path / "single.csv").write_text("path,label\n" + "\n".join(rows[:39] + ["img/39.png,grey"]) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_eval(["knn", "--checkpoint", "baseline:raw", "--data", str(tmp_path / "single.csv"),
                         "--out", str(tmp_path / "o")]) == 0
    assert "single image" in caplog.text and "'grey'" in caplog.text
    assert any("single image" in w for w in _read(tmp_path / "o", "knn")["warnings"])


def test_a_grey_npz_with_its_own_split(tmp_path: Path) -> None:
    """A grey image set as an npz (uint8 (N, H, W)) with string labels and a split array."""
    rng = np.random.default_rng(0)
    labels = np.array(["smile", "neutral"] * 30)
    images = np.stack([np.full((20, 16), 200 if label == "smile" else 40, dtype=np.uint8) for label in labels])
    images = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    split = np.array(["train"] * 40 + ["test"] * 20)
    np.savez(tmp_path / "grey.npz", images=images, labels=labels, split=split)
    assert run_eval(["knn", "--checkpoint", "random:tiny", "--data", str(tmp_path / "grey.npz"), "--seeds", "1",
                     "--out", str(tmp_path / "o")]) == 0
    payload = _read(tmp_path / "o", "knn")
    assert payload["data"]["split_sizes"]["test"] == 20 and payload["data"]["names"] == ["neutral", "smile"]
    assert "split as given" in payload["data"]["protocol"]
    assert _result(payload, "knn", "mean")["mean"] > 90


def test_linear_probe_reports_the_pool_picked_on_validation(stripes: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_eval(["linear-probe", "--checkpoint", "random:tiny", "--data", str(stripes), "--seeds", "1",
                     "--epochs", "10", "--out", str(tmp_path)]) == 0
    payload = _read(tmp_path, "linear_probe")
    results = {r["pool"]: r for r in payload["results"]}
    assert set(results) == {"cls", "mean"}  # every pool stays in the JSON
    best_val = max(r["val_mean"] for r in payload["results"])
    expected = next(r for r in payload["results"] if r["val_mean"] == best_val)  # first of a tie, as the study
    assert payload["picked"] == {"pool": expected["pool"], "by": "validation", "mean": expected["mean"],
                                 "std": expected["std"], "val_mean": expected["val_mean"]}
    first_line = capsys.readouterr().out.splitlines()[0]
    assert f"linear/{expected['pool']} {expected['mean']:.4g}" in first_line and "picked on validation" in first_line


def test_pick_pool_reads_validation_never_test() -> None:
    from pacofr.eval.user_data_commands import pick_pool

    results = [{"protocol": "linear", "pool": "cls", "mean": 90.0, "std": 0.0, "val_mean": 70.0, "higher_is_better": True},
               {"protocol": "linear", "pool": "mean", "mean": 60.0, "std": 1.0, "val_mean": 80.0, "higher_is_better": True}]
    assert pick_pool(results)["pool"] == "mean"
    errors = [{**r, "higher_is_better": False} for r in results]  # an error (lower is better): the smaller val
    assert pick_pool(errors)["pool"] == "cls"
    assert pick_pool(results[:1]) is None  # one pool: nothing to pick
    assert pick_pool([{**r, "val_mean": float("nan")} for r in results]) is None  # no val split: report all
