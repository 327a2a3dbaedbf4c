"""Whether Triton kernels can run, and on which tensors.

On a CUDA device Triton compiles kernels for the GPU. On CPU tensors it runs them only through
its interpreter, which must be switched on with ``TRITON_INTERPRET=1`` *before* ``triton`` is
imported (the test suite does this on machines without a GPU).

The kernels themselves are the package ``pacofr.kernels``, which exists only through the
installed package (setup.py maps the folder ``kernels/`` to it): an install that failed, or a
source tree put on ``sys.path`` without installing, has ``triton`` but no kernels, and the triton
backend is then unavailable too.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import torch

KERNELS_PACKAGE = "pacofr.kernels"


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its interpreter in this process.

    Triton fixes the mode when it is first imported: its own ``tl.*`` helpers are built as
    interpreted functions only if ``TRITON_INTERPRET=1`` was set then. Changing the variable later
    does not switch modes, so once triton is imported the answer comes from triton itself, and
    before that from the environment variable that the import will read.
    """
    if "triton.language" not in sys.modules:
        return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a triton without an interpreter
        return False
    return isinstance(sys.modules["triton.language"].sum, InterpretedFunction)


@functools.lru_cache(maxsize=1)
def import_error() -> str | None:
    """None when ``import triton`` works, else the error text."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "unavailable"
        return f"{type(err).__name__}: {err}"
    return None


@functools.lru_cache(maxsize=1)
def kernels_import_error() -> str | None:
    """None when ``import pacofr.kernels`` works, else the error text."""
    try:
        importlib.import_module(KERNELS_PACKAGE)
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def version() -> str | None:
    """Triton's version, or None when it does not import."""
    if import_error() is not None:
        return None
    import triton

    return triton.__version__


def status(device: torch.device) -> tuple[bool, str]:
    """Whether the triton backend can run on tensors of ``device``, and why not."""
    err = import_error()
    if err is not None:
        return False, f"triton does not import ({err}); install it with `pip install triton`"
    err = kernels_import_error()
    if err is not None:
        return False, (f"{KERNELS_PACKAGE} does not import ({err}): the Triton kernels come with the installed "
                       "package (setup.py maps kernels/ to pacofr.kernels); install it with `pip install -e .` "
                       "(PACOFR_BUILD_CUDA=0 installs it without building pacofr._C)")
    if device.type == "cuda":
        return True, f"triton {version()} on {device}"
    if interpreter_enabled():
        return True, f"triton {version()} interpreter (TRITON_INTERPRET=1) on CPU tensors"
    return False, (f"triton runs tensors on {device} only through its interpreter: set "
                   "TRITON_INTERPRET=1 before importing triton, or use CUDA tensors or backend='torch'")
