"""Checkpoints: atomic writes (a crash keeps the previous one loadable), keep-last-N, safe loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pacofr import checkpoint as ckpt


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_buffer("counts", torch.arange(3.0) + seed)
    return model


def _state(step: int) -> dict:
    opt = torch.optim.AdamW(_model(0).parameters(), betas=(0.9, 0.95))
    return {"step": step, "optimizer": opt.state_dict(), "rng": [{"torch": torch.get_rng_state(),
                                                                 "python": (3, tuple(range(5)), None)}]}


def _meta(step: int) -> dict:
    return {"step": step, "epoch": 0, "config": {"train": {"seed": 1}}, "alignment_recipe": {"size": 224},
            "pacofr_version": "0.1.0"}


def test_round_trip_restores_weights_buffers_state_and_meta(tmp_path: Path) -> None:
    source = _model(1)
    path = ckpt.save_checkpoint(tmp_path, source, _state(5), _meta(5))
    assert path.name == "step_00000005"
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 5 and loaded.meta["alignment_recipe"] == {"size": 224}
    assert torch.equal(loaded.state["rng"][0]["torch"], torch.get_rng_state())
    target = _model(2)
    ckpt.load_weights(target, path)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    assert ckpt.read_weights_meta(path / ckpt.WEIGHTS_FILE)["step"] == 5
    # the training state is readable without unpickling arbitrary objects
    torch.load(path / ckpt.STATE_FILE, weights_only=True)


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _model(1)
    ckpt.save_checkpoint(tmp_path, good, _state(1), _meta(1))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # dies after model.safetensors was written
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, _model(2), _state(2), _meta(2))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no partial files left
    latest = ckpt.resolve_checkpoint(tmp_path)
    target = _model(3)
    ckpt.load_weights(target, latest)
    assert torch.equal(target[0].weight, good[0].weight)


def test_a_killed_save_leaves_only_a_hidden_folder_that_is_ignored_then_cleaned(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, _model(1), _state(1), _meta(1))
    # what a SIGKILL in the middle of a save leaves behind: a temporary folder with some files
    partial = tmp_path / ".tmp-step_00000002-999999"
    partial.mkdir()
    (partial / ckpt.WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    # and a step folder someone copied half of
    half = tmp_path / "step_00000003"
    half.mkdir()
    (half / ckpt.META_FILE).write_text(json.dumps(_meta(3)))
    # the newest step folder is the one meant: refused naming what it lacks, never an older one silently
    with pytest.raises(FileNotFoundError, match="step_00000003 is incomplete: model.safetensors, state.pt missing"):
        ckpt.resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.resolve_checkpoint(half)
    assert ckpt.find_intact_checkpoint(tmp_path).name == "step_00000001"  # resume's fallback, with a warning
    ckpt.save_checkpoint(tmp_path, _model(4), _state(4), _meta(4))
    assert not partial.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000004"]


def test_keep_last_n(tmp_path: Path) -> None:
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, _model(step), _state(step), _meta(step), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, _model(1), _state(3), _meta(3))
    second = _model(2)
    ckpt.save_checkpoint(tmp_path, second, _state(3), _meta(3))
    target = _model(5)
    ckpt.load_weights(target, tmp_path)
    assert torch.equal(target[0].weight, second[0].weight)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]


def test_resolve_finds_the_newest_checkpoint_of_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ckpt.resolve_checkpoint(tmp_path)
    for step in (2, 10):
        ckpt.save_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR, _model(step), _state(step), _meta(step))
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_00000010"
    assert ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR).step == 10


def test_a_crash_between_the_renames_of_a_re_save_keeps_the_checkpoint(tmp_path: Path) -> None:
    first = _model(1)
    ckpt.save_checkpoint(tmp_path, first, _state(3), _meta(3), keep_last=1)
    # a crash right after the old copy was moved aside, before the new one took its place
    aside = tmp_path / ".tmp-old-step_00000003-999999"
    (tmp_path / "step_00000003").rename(aside)
    assert ckpt.resolve_checkpoint(tmp_path) == aside  # still found for --resume
    target = _model(5)
    ckpt.load_weights(target, tmp_path)
    assert torch.equal(target[0].weight, first[0].weight)
    ckpt.save_checkpoint(tmp_path, _model(2), _state(4), _meta(4), keep_last=2)  # puts it back, keeps it
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not aside.exists()


def _flip_bytes(path: Path, start: int, count: int) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(start, start + count):
        data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def _tensor_area_start(weights: Path) -> int:
    header_length = int.from_bytes(weights.read_bytes()[:8], "little")
    return 8 + header_length


def _damage(target: Path, kind: str) -> None:
    """Flip 3 bytes in the middle, cut the file in half, empty it, or garble its first 8 bytes."""
    data = target.read_bytes()
    if kind == "flip":
        _flip_bytes(target, len(data) // 2, 3)
    elif kind == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        _flip_bytes(target, 0, 8)


def _single_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_flipped_tensor_bytes_are_detected_by_load_checkpoint_and_load_weights(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(64, 64))  # a tensor area of 16 KiB
    path = ckpt.save_checkpoint(tmp_path, model, _state(1), _meta(1))
    weights = path / ckpt.WEIGHTS_FILE
    _flip_bytes(weights, _tensor_area_start(weights) + 100, 400)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"model.safetensors does not match its checksum") as err:
        ckpt.load_checkpoint(path)
    assert str(path) in _single_line(err.value)
    with pytest.raises(ckpt.CorruptCheckpointError, match="model.safetensors"):
        ckpt.load_weights(nn.Sequential(nn.Linear(64, 64)), path)


@pytest.mark.parametrize("name", [ckpt.WEIGHTS_FILE, ckpt.STATE_FILE, ckpt.META_FILE])
@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_every_damaged_file_is_a_one_line_error_naming_it(tmp_path: Path, name: str, damage: str) -> None:
    path = ckpt.save_checkpoint(tmp_path, _model(1), _state(1), _meta(1))
    _damage(path / name, damage)
    with pytest.raises(ckpt.CorruptCheckpointError) as err:
        ckpt.load_checkpoint(path)
    assert name in _single_line(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("name", [ckpt.WEIGHTS_FILE, ckpt.STATE_FILE, ckpt.META_FILE])
@pytest.mark.parametrize("damage", ["truncate", "empty", "header"])
def test_an_unverifiable_old_checkpoint_still_gives_one_line_parse_errors(tmp_path: Path, name: str,
                                                                          damage: str) -> None:
    path = ckpt.save_checkpoint(tmp_path, _model(1), _state(1), _meta(1))
    _make_legacy(path)
    _damage(path / name, damage)
    with pytest.raises(ckpt.CorruptCheckpointError) as err:
        loaded = ckpt.load_checkpoint(path)
        ckpt.load_weights(_model(2), loaded)
    assert name in _single_line(err.value)


def _make_legacy(path: Path) -> None:
    """What a checkpoint written before checksums looks like."""
    (path / ckpt.CHECKSUMS_FILE).unlink()
    meta = json.loads((path / ckpt.META_FILE).read_text())
    meta.pop(ckpt.FORMAT_KEY)
    (path / ckpt.META_FILE).write_text(json.dumps(meta))


def test_an_old_checkpoint_without_checksums_loads_with_a_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    source = _model(1)
    path = ckpt.save_checkpoint(tmp_path, source, _state(1), _meta(1))
    _make_legacy(path)
    with caplog.at_level("WARNING", logger="pacofr.checkpoint"):
        loaded = ckpt.load_checkpoint(path)
    assert "written before checkpoints carried checksums" in caplog.text and loaded.step == 1
    target = _model(2)
    ckpt.load_weights(target, loaded)
    assert torch.equal(target[0].weight, source[0].weight)


def test_a_missing_checksums_file_of_a_new_checkpoint_is_an_error(tmp_path: Path) -> None:
    path = ckpt.save_checkpoint(tmp_path, _model(1), _state(1), _meta(1))
    (path / ckpt.CHECKSUMS_FILE).unlink()
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksums.json is missing"):
        ckpt.load_checkpoint(path)


def test_fallback_skips_corrupted_and_incomplete_newer_checkpoints_and_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, _model(step), _state(step), _meta(step))
    (tmp_path / "step_00000003" / ckpt.STATE_FILE).write_bytes(b"")
    (tmp_path / "step_00000002" / ckpt.META_FILE).unlink()
    with caplog.at_level("WARNING", logger="pacofr.checkpoint"):
        assert ckpt.find_intact_checkpoint(tmp_path) == tmp_path / "step_00000001"
        assert ckpt.load_checkpoint(tmp_path, fallback=True).step == 1
    assert "skipping checkpoint step_00000003: " in caplog.text and "state.pt is 0 bytes" in caplog.text
    assert "skipping checkpoint step_00000002: " in caplog.text and "meta.json missing" in caplog.text
    # without fallback (export, evaluation) the newest complete checkpoint is refused, not replaced
    with pytest.raises(ckpt.CorruptCheckpointError, match="step_00000003: state.pt"):
        ckpt.load_checkpoint(tmp_path)
    # an explicitly named checkpoint is never replaced by another
    with pytest.raises(ckpt.CorruptCheckpointError, match="state.pt"):
        ckpt.find_intact_checkpoint(tmp_path / "step_00000003")
    (tmp_path / "step_00000001" / ckpt.WEIGHTS_FILE).write_bytes(b"x")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"no intact checkpoint in .*step_00000003.*step_00000001"):
        ckpt.find_intact_checkpoint(tmp_path)


def test_an_interrupted_pruning_leaves_no_half_deleted_step_folder(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, _model(step), _state(step), _meta(step), keep_last=2)
    real_rmtree = ckpt.shutil.rmtree

    def killed_half_way(path: object, *args: object, **kwargs: object) -> None:
        (Path(str(path)) / ckpt.WEIGHTS_FILE).unlink()  # the first file is gone, then the process dies
        raise KeyboardInterrupt("killed while pruning (simulated)")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, _model(3), _state(3), _meta(3), keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    step_folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert step_folders == ["step_00000002", "step_00000003"]
    assert all(ckpt.verify_checkpoint(tmp_path / name) for name in step_folders)
    ckpt.save_checkpoint(tmp_path, _model(4), _state(4), _meta(4), keep_last=2)  # cleans up the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
