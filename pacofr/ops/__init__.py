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
from pacofr.ops.nearest_token import nearest_token
from pacofr.ops.patches import gather_patches, masked_patch_loss, patch_targets, scatter_tokens
from pacofr.ops.soft_assign import codebook_stats, soft_assign

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "BackendUnavailableError",
    "backend_status",
    "get_op",
    "nearest_token",
    "registered_ops",
    "requested_backend",
    "use_backend",
    "gather_patches",
    "patch_targets",
    "masked_patch_loss",
    "scatter_tokens",
    "soft_assign",
    "codebook_stats",
]
