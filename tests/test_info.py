"""`pacofr info` tells the truth about this machine, and the CUDA extension is what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pacofr import _extension
from pacofr.info import collect_info, format_info


def test_info_matches_torch() -> None:
    info = collect_info()
    assert info["torch"] == torch.__version__
    assert info["device"]["cuda_available"] == torch.cuda.is_available()
    assert info["backends"]["torch"]["available"] is True
    assert info["cuda_extension"]["loaded"] == (_extension.module() is not None)
    text = format_info(info)
    assert f"torch             {torch.__version__}" in text


def test_info_on_cpu_says_cuda_backend_is_unavailable() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    info = collect_info()
    assert info["backends"]["cuda"]["available"] is False
    assert "CPU only" in format_info(info)


def test_cli_json_round_trips() -> None:
    out = subprocess.run([sys.executable, "-m", "pacofr", "info", "--json"], check=True,
                         capture_output=True, text=True)
    parsed = json.loads(out.stdout)
    assert parsed["torch"] == torch.__version__


@pytest.mark.skipif(os.environ.get("PACOFR_EXPECT_C") != "1",
                    reason="PACOFR_EXPECT_C=1 is set where the build is expected to include pacofr._C")
def test_extension_was_built_for_the_default_arches() -> None:
    """Where the build promised `_C` (the Makefile's CUDA check), it loads and targets sm_80 + sm_90."""
    ok, why = _extension.status()
    assert ok, why
    arches = _extension.compiled_arches()
    expected = os.environ.get("PACOFR_EXPECT_ARCHES", "sm_80,sm_90").split(",")
    assert sorted(arches) == sorted(expected)


@pytest.mark.gpu
def test_extension_runs_on_this_gpu() -> None:
    ok, why = _extension.status()
    if not ok:
        pytest.skip(why)
    runs, detail = _extension.kernel_image_status(torch.cuda.current_device())
    assert runs, detail


@pytest.mark.parametrize("present, blocked, state, words", [
    (False, False, _extension.NOT_BUILT, "not built"),
    (True, True, _extension.LOAD_FAILED, "built, but fails to load"),
])
def test_info_tells_not_built_from_fails_to_load(monkeypatch: pytest.MonkeyPatch, present: bool, blocked: bool,
                                                  state: str, words: str) -> None:
    """A plain install (no `_C` file) and a `_C` that exists but cannot be imported are told apart."""
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        if name == "pacofr._C":
            return real_find_spec("pacofr.version") if present else None  # any spec stands for "a file exists"
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if blocked:  # `from pacofr import _C` raises ImportError, as a .so built for another torch does
        monkeypatch.setitem(sys.modules, "pacofr._C", None)
        monkeypatch.delattr("pacofr._C", raising=False)
    _extension._load.cache_clear()
    try:
        assert _extension.load_state() == state
        assert _extension.module() is None
        info = collect_info()
        assert info["cuda_extension"]["state"] == state
        assert words in format_info(info)
    finally:
        monkeypatch.undo()
        _extension._load.cache_clear()
