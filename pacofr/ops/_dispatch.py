"""Backend registry and selection for the ops in `pacofr.ops`.

Every op has up to three implementations: ``torch`` (the reference: plainly correct, runs
anywhere), ``triton`` and ``cuda`` (fused kernels). Which one runs is decided, first match wins:

1. the op's ``backend=`` argument when it is not ``"auto"``;
2. the innermost :func:`use_backend` context;
3. the ``PACOFR_BACKEND`` environment variable;
4. ``auto``: for CUDA tensors the op's preference order among the backends that are available
   (:data:`AUTO_ORDER`: triton, then cuda, then torch, as the README says, until the GPU run
   ranks them), for CPU tensors ``torch``.

A call the fused backends cannot take (an op passes the reason, e.g. float64 data or more
candidates than the kernels keep) runs on ``torch`` under ``auto``; asking for a backend that
cannot run raises :class:`BackendUnavailableError` saying what is missing and how to get it.
``auto`` never raises it (``torch`` always works).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pacofr import _extension, _triton

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda")
BACKEND_CHOICES: tuple[str, ...] = (*BACKENDS, "auto")
ENV_VAR = "PACOFR_BACKEND"
AUTO_ORDER: tuple[str, ...] = ("triton", "cuda", "torch")
"""The order ``auto`` tries the backends in on CUDA tensors (every op)."""

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("pacofr_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A specific backend was requested but cannot run here."""


def _validate_choice(name: str, source: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKEND_CHOICES:
        raise ValueError(f"{source} must be one of {BACKEND_CHOICES}, got {name!r}")
    return value


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for every op called inside the block (unless an op is given one itself).

    >>> with pacofr.ops.use_backend("torch"):
    ...     dist, idx = pacofr.ops.nearest_token(x, codebook)
    """
    token = _forced_backend.set(_validate_choice(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced_backend.reset(token)


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for, after the argument, the context and the environment are applied."""
    choice = _validate_choice(backend, "backend")
    if choice != "auto":
        return choice
    forced = _forced_backend.get()
    if forced is not None and forced != "auto":
        return forced
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _validate_choice(env, f"environment variable {ENV_VAR}")
    return "auto"


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def backend_status(backend: str, device: torch.device, op: str | None = None) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on tensors of ``device``; the reason when it cannot."""
    if backend == "torch":
        return True, "always available"
    if backend == "triton":
        return _triton.status(device)
    if backend == "cuda":
        ok, why = _extension.status()
        if not ok:
            return False, why
        if device.type != "cuda":
            return False, f"the cuda backend needs CUDA tensors, got tensors on {device}"
        if op is not None and not _extension.has_op(op):
            return False, f"pacofr._C was built without the op {op!r}; rebuild from this source tree"
        return True, "pacofr._C loaded"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@dataclass
class Op:
    """One public op: its implementations and the order ``auto`` tries them in on CUDA tensors."""

    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    auto_order: tuple[str, ...] = AUTO_ORDER

    def implementation(self, backend: str = "auto", tensors: Sequence[torch.Tensor] = (), *,
                       fused_refusal: str | None = None) -> tuple[str, Callable]:
        """Resolve ``backend`` for these tensors to ``(backend_name, function)``.

        ``fused_refusal``: why the fused backends cannot take this call (None: they can). ``auto``
        then runs ``torch``; an explicit fused backend raises :class:`BackendUnavailableError`
        with the reason.
        """
        choice = requested_backend(backend)
        device = _device_of(tensors)
        if choice == "auto":
            order = self.auto_order if device.type == "cuda" and fused_refusal is None else ("torch",)
            if fused_refusal is not None:
                logger.debug("%s: %s; using the torch backend", self.name, fused_refusal)
            for candidate in order:
                if candidate in self.impls and backend_status(candidate, device, self.name)[0]:
                    return candidate, self.impls[candidate]
            return "torch", self.impls["torch"]
        if choice not in self.impls:
            raise BackendUnavailableError(
                f"{self.name}: backend {choice!r} is not implemented; it has {sorted(self.impls)}")
        if choice != "torch" and fused_refusal is not None:
            raise BackendUnavailableError(f"{self.name}: backend {choice!r} {fused_refusal}; "
                                          "use backend='torch' (or 'auto')")
        ok, why = backend_status(choice, device, self.name)
        if not ok:
            raise BackendUnavailableError(f"{self.name}: backend {choice!r} is unavailable: {why}")
        return choice, self.impls[choice]


_REGISTRY: dict[str, Op] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def decorate(fn: Callable) -> Callable:
        entry = _REGISTRY.setdefault(op, Op(op))
        entry.impls[backend] = fn
        return fn

    return decorate


def get_op(name: str) -> Op:
    """The registered op ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no op named {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered_ops() -> dict[str, Op]:
    """All registered ops by name (a copy)."""
    return dict(_REGISTRY)
