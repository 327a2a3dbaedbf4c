"""Lazy access to the compiled CUDA extension ``pacofr._C``.

The extension registers its ops in the ``torch.ops.pacofr_cuda`` namespace and exposes a few
build facts (compiled architectures, a kernel-image probe) through pybind11.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch

OPS_NAMESPACE = "pacofr_cuda"
REBUILD_HINT = ("rebuild with `PACOFR_BUILD_CUDA=1 pip install --no-build-isolation .` on a machine "
                "with a CUDA toolkit and a CUDA build of torch (README, 'Building wheels')")


#: what :func:`load_state` can report
NOT_BUILT, LOAD_FAILED, LOADED = "not-built", "load-failed", "loaded"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str, str]:
    """``(module or None, state, detail)``; ``state`` is one of NOT_BUILT, LOAD_FAILED, LOADED.

    "Not built" means no ``pacofr/_C*.so`` exists in this install (a plain ``pip install .`` without
    a CUDA toolkit); "failed to load" means the file exists but importing it failed (built against
    another torch, or a missing CUDA runtime library), with the import error as the detail.
    """
    if importlib.util.find_spec("pacofr._C") is None:
        return None, NOT_BUILT, f"pacofr._C is not built in this install; {REBUILD_HINT}"
    try:
        from pacofr import _C
    except (ImportError, OSError) as err:
        return None, LOAD_FAILED, (f"pacofr._C is built but failed to load ({err}); it was probably built "
                                   f"against another torch: {REBUILD_HINT}")
    return _C, LOADED, "pacofr._C loaded"


def module() -> ModuleType | None:
    """The loaded ``pacofr._C`` module, or None."""
    return _load()[0]


def status() -> tuple[bool, str]:
    """Whether ``pacofr._C`` is loaded, and why not."""
    mod, _, detail = _load()
    return mod is not None, detail


def load_state() -> str:
    """``"not-built"``, ``"load-failed"`` or ``"loaded"``: why :func:`status` says what it says."""
    return _load()[1]


def has_op(name: str) -> bool:
    """Whether the loaded extension registered ``torch.ops.pacofr_cuda.<name>``."""
    if module() is None:
        return False
    return hasattr(getattr(torch.ops, OPS_NAMESPACE), name)


def compiled_arches() -> list[str]:
    """The ``sm_XY`` targets the extension was compiled for, each once (empty when it is not built);
    ``9.0a`` counts as ``sm_90``, since nvcc lists it as 900 like ``9.0``."""
    mod = module()
    return [] if mod is None else sorted({f"sm_{a // 10}" for a in mod.compiled_arches()})


def kernel_image_status(device_index: int = 0) -> tuple[bool, str]:
    """Whether the extension holds a kernel image that runs on CUDA device ``device_index``."""
    mod = module()
    if mod is None:
        return False, "pacofr._C is not built"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible"
    ok, message = mod.probe_kernel_image(device_index)
    return bool(ok), str(message)
