"""Recording what pacofr launches, without running it.

* :class:`KernelRecorder`: while active, a launch ``kernel[grid](*args, **kwargs)`` of any Triton
  kernel in :mod:`pacofr.kernels` is recorded (kernel, arguments, launch options) instead of run.
  Output buffers stay as the launcher allocated them (uninitialised): recorded calls are for
  compiling, not for their values.
* :func:`compile_only_dispatch`: lets ``backend="triton"`` be chosen for CPU tensors without
  Triton's interpreter, so the public ops' own launch code runs (and is recorded) on a machine
  without a GPU. The launchers then pick the tiles they would pick on a GPU.
* :class:`OpCallRecorder`: records the calls the library makes to the torch implementation of
  every registered op (their validated arguments), computing the real results, so a whole model
  step can run on the CPU and its op calls be replayed on the triton backend afterwards.

All three patch module state for the duration of a ``with`` block and restore it after.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

WARP_SIZE = 32


@dataclass
class KernelLaunch:
    """One recorded launch, bound for one architecture the way Triton's runtime binds it.

    Only the binding is kept (argument types and specialisations, constexprs, options), never the
    argument tensors, so recording thousands of launches at full benchmark shapes costs no memory.
    """

    kernel: Any  #: triton.runtime.jit.JITFunction
    arch: int
    signature: dict[str, str]
    constexprs: dict[tuple, Any]  #: keyed by argument path, as triton.compile wants them
    attrs: dict[tuple, Any]
    options: Any  #: the backend's options object (num_warps, num_stages, ...)
    origin: str
    ctas: int = 0  #: CTAs of the launch grid (0 when unknown)

    @property
    def name(self) -> str:
        return self.kernel.__name__


def grid_ctas(grid: Any, kwargs: dict) -> int:
    """CTAs of a Triton launch grid: a tuple of up to three sizes, or a callable of the launch's keyword
    arguments (Triton's ``meta``) returning one."""
    dims = grid(kwargs) if callable(grid) else grid
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    total = 1
    for size in dims:
        total *= int(size)
    return total


def bind_launch(kernel: Any, args: tuple, kwargs: dict, arch: int, origin: str, ctas: int = 0) -> KernelLaunch:
    """Bind ``kernel[grid](*args, **kwargs)`` for ``sm_{arch}`` exactly as ``JITFunction.run`` does."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, WARP_SIZE))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return KernelLaunch(kernel, arch, dict(signature), constexprs, attrs, options, origin, ctas)


def triton_kernels() -> dict[str, Any]:
    """Every ``@triton.jit`` kernel defined at module level in :mod:`pacofr.kernels`, by qualified name."""
    from triton.runtime.jit import JITFunction

    import pacofr.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                found[f"{info.name}.{attr}"] = value
    return found


class KernelRecorder:
    """Context manager that records every launch of a :mod:`pacofr.kernels` kernel instead of running it.

    Each launch is bound for every architecture in ``arches`` on the spot. ``origin`` (settable
    between calls) labels the launches that follow, e.g. the workload name.
    """

    def __init__(self, arches: tuple[int, ...] = (80, 90)) -> None:
        self.arches = arches
        self.launches: list[KernelLaunch] = []
        self.origin = ""
        self._patched: list[Any] = []

    def __enter__(self) -> KernelRecorder:
        from pacofr import _triton

        if _triton.interpreter_enabled():
            raise RuntimeError("the static check compiles kernels for a GPU: run it without TRITON_INTERPRET=1 "
                               "(Triton's interpreter replaces the kernels it would compile)")
        for kernel in triton_kernels().values():
            kernel.run = self._recorder(kernel)
            self._patched.append(kernel)
        return self

    def _recorder(self, kernel: Any) -> Callable[..., None]:
        def record(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            del warmup
            ctas = grid_ctas(grid, kwargs)
            self.launches += [bind_launch(kernel, args, kwargs, arch, self.origin, ctas) for arch in self.arches]

        return record

    def __exit__(self, *exc: object) -> None:
        for kernel in self._patched:
            del kernel.run  # back to the class's JITFunction.run
        self._patched.clear()


@contextlib.contextmanager
def compile_only_dispatch() -> Iterator[None]:
    """Inside the block the triton backend counts as available on every device and never as interpreted."""
    from pacofr import _triton

    saved = _triton.status, _triton.interpreter_enabled
    _triton.status = lambda device: (True, "compile-only recording (benchmarks.static)")
    _triton.interpreter_enabled = lambda: False
    try:
        yield
    finally:
        _triton.status, _triton.interpreter_enabled = saved


@dataclass
class OpCall:
    """The arguments one call passed to an op's implementation (tensors as aliases, strides kept)."""

    op: str
    args: tuple[Any, ...]
    origin: str


def _alias(value: Any) -> Any:
    """A fresh leaf viewing the same memory with the same strides (expanded views included), or ``value``.

    Replayed calls only record launches, so the values need not survive; shapes, strides, dtypes
    and ``requires_grad`` (which decides whether a backward is launched) must.
    """
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().requires_grad_(value.requires_grad)


@dataclass
class OpCallRecorder:
    """Context manager recording the arguments of every call to the torch implementation of an op."""

    calls: list[OpCall] = field(default_factory=list)
    origin: str = ""
    _saved: dict[str, Callable] = field(default_factory=dict)

    def __enter__(self) -> OpCallRecorder:
        from pacofr.ops import registered_ops

        for name, op in registered_ops().items():
            original = op.impls["torch"]
            self._saved[name] = original
            op.impls["torch"] = self._wrap(name, original)
        return self

    def _wrap(self, name: str, original: Callable) -> Callable:
        def recorded(*args: Any) -> Any:
            self.calls.append(OpCall(name, tuple(_alias(a) for a in args), self.origin))
            return original(*args)

        return recorded

    def __exit__(self, *exc: object) -> None:
        from pacofr.ops import registered_ops

        for name, op in registered_ops().items():
            if name in self._saved:
                op.impls["torch"] = self._saved[name]
        self._saved.clear()


def run_with_backward(fn: Callable[[], Any]) -> None:
    """Call ``fn`` and back-propagate a gradient of ones through every differentiable tensor it returns."""
    tensors = [t for t in _flatten(fn()) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    if tensors:
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def replay_on_triton(calls: list[OpCall], recorder: KernelRecorder) -> None:
    """Call every recorded op again on its triton implementation (and back-propagate through it)."""
    from pacofr.ops import get_op

    for call in calls:
        impl = get_op(call.op).impls.get("triton")
        if impl is None:
            continue
        recorder.origin = call.origin
        args = tuple(_alias(a) for a in call.args)
        run_with_backward(lambda impl=impl, args=args: impl(*args))
