"""Lazy access to the compiled CUDA extension ``pacofr._C``.

The extension registers its ops in the ``torch.ops.pacofr_cuda`` namespace and exposes a few
build facts (compiled architectures, a kernel-image probe) through pybind11.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

OPS_NAMESPACE = "pacofr_cuda"
REBUILD_HINT = ("rebuild with `PACOFR_BUILD_CUDA=1 pip install --no-build-isolation .` on a machine "
                "with a CUDA toolkit and a CUDA build of torch (README, 'Building wheels')")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from pacofr import _C
    except ImportError as err:
        if "pacofr._C" in str(err) or "No module named" in str(err):
            return None, f"pacofr._C is not built in this install; {REBUILD_HINT}"
        return None, f"pacofr._C failed to load ({err}); it was probably built against another torch: {REBUILD_HINT}"
    return _C, None


def module() -> ModuleType | None:
    """The loaded ``pacofr._C`` module, or None."""
    return _load()[0]


def status() -> tuple[bool, str]:
    """Whether ``pacofr._C`` is loaded, and why not."""
    mod, err = _load()
    return (True, "pacofr._C loaded") if mod is not None else (False, err or "unknown error")


def has_op(name: str) -> bool:
    """Whether the loaded extension registered ``torch.ops.pacofr_cuda.<name>``."""
    if module() is None:
        return False
    return hasattr(getattr(torch.ops, OPS_NAMESPACE), name)


def compiled_arches() -> list[str]:
    """The ``sm_XY`` targets the extension was compiled for (empty when it is not built)."""
    mod = module()
    return [] if mod is None else [f"sm_{a // 10}" for a in mod.compiled_arches()]


def kernel_image_status(device_index: int = 0) -> tuple[bool, str]:
    """Whether the extension holds a kernel image that runs on CUDA device ``device_index``."""
    mod = module()
    if mod is None:
        return False, "pacofr._C is not built"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible"
    ok, message = mod.probe_kernel_image(device_index)
    return bool(ok), str(message)
