"""pacofr: PaCo-FR face-representation pre-training with fused Triton and CUDA kernels."""

import logging

from pacofr.version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
