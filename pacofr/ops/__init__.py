"""Public ops of pacofr. Each is one function with ``backend="auto"|"torch"|"triton"|"cuda"``.

See :mod:`pacofr.ops._dispatch` for how a backend is chosen (argument, :func:`use_backend`,
``PACOFR_BACKEND``, then the fastest available for the tensors given).
"""

from pacofr.ops._dispatch import (
    BACKEND_CHOICES,
    BACKENDS,
    BackendUnavailableError,
    backend_status,
    get_op,
    registered_ops,
    requested_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "BackendUnavailableError",
    "backend_status",
    "get_op",
    "registered_ops",
    "requested_backend",
    "use_backend",
]
