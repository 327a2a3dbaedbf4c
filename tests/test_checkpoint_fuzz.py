"""Random corruptions at the checkpoint loader (hypothesis, derandomised, bounded in time).

Each example damages one file of the newest of two checkpoints (bit flips, truncation, zero
length, a rewritten header, appended bytes, a missing file) and checks that

* loading it is refused with a one-line CorruptCheckpointError / FileNotFoundError naming the
  checkpoint and the file, and never loads altered weights (only damage to ``checksums.json``
  that leaves it meaning the same may load, and then the weights are the saved ones);
* ``--resume``'s fallback lands on the older, intact checkpoint with its exact weights;
* for a checkpoint written before checksums (no verification possible) every failure is still a
  one-line CorruptCheckpointError, never a parser's own exception.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pacofr import checkpoint as ckpt

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FILES = (ckpt.WEIGHTS_FILE, ckpt.STATE_FILE, ckpt.META_FILE, ckpt.CHECKSUMS_FILE)
DATA_FILES = FILES[:3]
NEWEST, OLDER = "step_00000002", "step_00000001"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6))
    model.register_buffer("counts", torch.arange(6.0) + seed)
    return model


def _save_pair(directory: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints of steps 1 and 2 in ``directory``; returns the weights each holds."""
    saved = {}
    for step in (1, 2):
        model = _model(step)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.ones(2, 8)).sum().backward()
        opt.step()
        state = {"step": step, "optimizer": opt.state_dict(), "rng": [{"torch": torch.get_rng_state()}]}
        meta = {"step": step, "epoch": 0, "config": {"train": {"seed": step}}}
        ckpt.save_checkpoint(directory, model, state, meta)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return saved


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    directory = tmp_path_factory.mktemp("pristine")
    return directory, _save_pair(directory)


@pytest.fixture(scope="module")
def pristine_legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("legacy")
    _save_pair(directory)
    for step_dir in directory.iterdir():
        (step_dir / ckpt.CHECKSUMS_FILE).unlink()
        meta = json.loads((step_dir / ckpt.META_FILE).read_text())
        meta.pop(ckpt.FORMAT_KEY)
        (step_dir / ckpt.META_FILE).write_text(json.dumps(meta))
    return directory


@contextmanager
def _damaged_copy(source: Path, corruption: tuple[str, str, object]) -> Iterator[tuple[Path, Path]]:
    """A copy of checkpoints folder ``source`` whose newest checkpoint has ``corruption``:
    yields (the copy, its newest checkpoint)."""
    name, kind, params = corruption
    with tempfile.TemporaryDirectory(prefix="pacofr-fuzz-") as scratch:
        directory = Path(scratch) / "checkpoints"
        shutil.copytree(source, directory)
        _apply(directory / NEWEST / name, kind, params)
        yield directory, directory / NEWEST


def _header_length(name: str, data: bytes) -> int:
    """How many leading bytes are the file's header (where parsers look first)."""
    if name == ckpt.WEIGHTS_FILE and len(data) >= 8:
        return min(len(data), 8 + int.from_bytes(data[:8], "little"))
    return min(len(data), 64)


@st.composite
def damage(draw: st.DrawFn, names: tuple[str, ...]) -> tuple[str, str, object]:
    """(file, kind, parameters) of one corruption."""
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["flip", "truncate", "empty", "header", "append", "missing"]))
    if kind == "flip":
        params: object = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                       min_size=1, max_size=16))
    elif kind == "truncate":
        params = draw(st.floats(0, 1, exclude_max=True))
    elif kind == "header":
        params = (draw(st.floats(0, 1, exclude_max=True)), draw(st.binary(min_size=1, max_size=16)))
    elif kind == "append":
        params = draw(st.binary(min_size=1, max_size=64))
    else:
        params = None
    return name, kind, params


def _apply(path: Path, kind: str, params: object) -> None:
    if kind == "missing":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if kind == "flip":
        for where, mask in params:  # type: ignore[union-attr]
            data[int(where * len(data))] ^= mask
    elif kind == "truncate":
        data = data[: int(params * len(data))]  # type: ignore[operator]
    elif kind == "empty":
        data = bytearray()
    elif kind == "header":
        where, patch = params  # type: ignore[misc]
        start = int(where * _header_length(path.name, bytes(data)))
        original = bytes(data[start:start + len(patch)])
        if original == patch[: len(original)]:
            patch = bytes(b ^ 0x5A for b in patch)
        data[start:start + len(patch)] = patch
    elif kind == "append":
        data += params  # type: ignore[operator]
    path.write_bytes(bytes(data))


def _assert_one_line_naming(err: BaseException, folder: Path) -> None:
    text = str(err)
    assert "\n" not in text, text
    assert str(folder) in text, text
    assert any(name in text for name in FILES), text


def _weights(folder: Path, seed: int = 99) -> dict[str, torch.Tensor]:
    model = _model(seed)
    ckpt.load_weights(model, folder)
    return model.state_dict()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@FUZZ
@given(corruption=damage(FILES))
def test_a_corrupted_checkpoint_is_refused_and_the_fallback_finds_the_intact_one(
        pristine: tuple[Path, dict[int, dict[str, torch.Tensor]]], corruption: tuple[str, str, object]) -> None:
    source, saved = pristine
    with _damaged_copy(source, corruption) as (directory, newest):
        try:
            loaded = ckpt.load_checkpoint(newest)
            weights = _weights(newest)
        except (ckpt.CorruptCheckpointError, FileNotFoundError) as err:
            _assert_one_line_naming(err, newest)
            assert ckpt.find_intact_checkpoint(directory) == directory / OLDER
            fallback = ckpt.load_checkpoint(directory, fallback=True)
            assert fallback.step == 1 and _equal(_weights(fallback.path), saved[1])
        else:  # only a change of checksums.json that leaves its meaning intact may load
            assert corruption[0] == ckpt.CHECKSUMS_FILE, corruption
            assert loaded.step == 2 and _equal(weights, saved[2])


@FUZZ
@given(corruption=damage(DATA_FILES))
def test_an_unverifiable_old_checkpoint_fails_only_with_one_line_errors(
        pristine_legacy: Path, corruption: tuple[str, str, object]) -> None:
    with _damaged_copy(pristine_legacy, corruption) as (_, newest):
        try:
            loaded = ckpt.load_checkpoint(newest)
            ckpt.load_weights(_model(5), loaded)
        except (ckpt.CorruptCheckpointError, FileNotFoundError) as err:
            _assert_one_line_naming(err, newest)
