"""Backend selection: argument, context manager, environment variable, auto, and clear errors."""

from __future__ import annotations

import pytest
import torch

from pacofr import _triton
from pacofr.ops import _dispatch
from pacofr.ops._dispatch import BackendUnavailableError, Op, requested_backend, use_backend


@pytest.fixture
def toy_op() -> Op:
    """An op with all three backends that report which one ran."""
    return Op("toy", {name: (lambda name=name: name) for name in _dispatch.BACKENDS})


def test_default_is_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert requested_backend() == "auto"


def test_argument_beats_context_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert requested_backend() == "triton"
    with use_backend("cuda"):
        assert requested_backend() == "cuda"
        assert requested_backend("torch") == "torch"
        with use_backend("torch"):
            assert requested_backend() == "torch"
        assert requested_backend() == "cuda"
    assert requested_backend() == "triton"


def test_bad_names_are_rejected_naming_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        requested_backend("tensorrt")
    with pytest.raises(ValueError, match=r"use_backend\(name\)"):
        with use_backend("gpu"):
            pass
    monkeypatch.setenv(_dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="PACOFR_BACKEND"):
        requested_backend()


def test_auto_on_cpu_tensors_is_torch(toy_op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    name, fn = toy_op.implementation("auto", [torch.zeros(3)])
    assert name == "torch" and fn() == "torch"


def test_auto_on_cuda_prefers_the_first_available(toy_op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend a CUDA device: auto must walk the op's preference order (default: the README's, triton
    first, then cuda, then torch) and skip what cannot run."""
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    fake = torch.empty(0, device="meta")
    monkeypatch.setattr(_dispatch, "_device_of", lambda tensors: torch.device("cuda", 0))
    available = {"torch": True, "triton": False, "cuda": True}
    monkeypatch.setattr(_dispatch, "backend_status", lambda b, d, op=None: (available[b], "test"))
    assert toy_op.auto_order == ("triton", "cuda", "torch")
    assert toy_op.implementation("auto", [fake])[0] == "cuda"
    available["triton"] = True
    assert toy_op.implementation("auto", [fake])[0] == "triton"
    available["triton"] = available["cuda"] = False
    assert toy_op.implementation("auto", [fake])[0] == "torch"
    toy_op.auto_order = ("cuda", "triton", "torch")
    available["cuda"] = available["triton"] = True
    assert toy_op.implementation("auto", [fake])[0] == "cuda"


def test_every_public_op_prefers_triton_as_the_readme_says() -> None:
    import pacofr.ops  # noqa: F401 - registers every op

    for name, op in _dispatch.registered_ops().items():
        if not name.startswith("test_"):
            assert op.auto_order == ("triton", "cuda", "torch"), name


def test_a_call_the_fused_backends_refuse_runs_on_torch_or_raises_by_name(
        toy_op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    fake = torch.empty(0, device="meta")
    monkeypatch.setattr(_dispatch, "_device_of", lambda tensors: torch.device("cuda", 0))
    monkeypatch.setattr(_dispatch, "backend_status", lambda b, d, op=None: (True, "test"))
    assert toy_op.implementation("auto", [fake], fused_refusal="cannot do this")[0] == "torch"
    assert toy_op.implementation("torch", [fake], fused_refusal="cannot do this")[0] == "torch"
    with pytest.raises(BackendUnavailableError, match="toy: backend 'triton' cannot do this; use backend='torch'"):
        toy_op.implementation("triton", [fake], fused_refusal="cannot do this")


def test_unavailable_backend_says_what_is_missing(toy_op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    cpu = [torch.zeros(2)]
    with pytest.raises(BackendUnavailableError, match="cuda.*(not built|CUDA tensors|failed to load)"):
        toy_op.implementation("cuda", cpu)
    monkeypatch.setattr(_triton, "interpreter_enabled", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        toy_op.implementation("triton", cpu)


def test_unimplemented_backend_lists_what_exists() -> None:
    op = Op("half_done", {"torch": lambda: "torch"})
    with pytest.raises(BackendUnavailableError, match=r"not implemented; it has \['torch'\]"):
        op.implementation("triton", [torch.zeros(1)])


def test_forced_backend_from_environment_is_used_by_auto(toy_op: Op, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert toy_op.implementation("auto", [torch.zeros(1)])[0] == "torch"


def test_register_and_lookup() -> None:
    @_dispatch.register("test_only_op", "torch")
    def reference() -> str:
        return "ref"

    try:
        assert _dispatch.get_op("test_only_op").impls["torch"] is reference
        with pytest.raises(KeyError, match="no op named"):
            _dispatch.get_op("missing_op")
        with pytest.raises(ValueError, match="backend must be one of"):
            _dispatch.register("test_only_op", "opencl")
    finally:
        _dispatch._REGISTRY.pop("test_only_op", None)
