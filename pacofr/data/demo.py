"""The small set of real, aligned faces that ships inside the package (offline demos and tests).

Built by ``python -m pacofr.data.build_demo`` with the same detector and alignment as
``pacofr prepare``; ``SOURCES.md`` in the folder says where every photo comes from.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pacofr.data.datasets import AlignedFaceDataset
from pacofr.data.storage import INDEX_NAME

DEMO_DIR = ("assets", "demo_faces")


def demo_root() -> Path:
    """Folder of the packaged demo set (readable by ``AlignedFaceDataset``).

    Raises:
        FileNotFoundError: the package was installed without its data.
    """
    root = Path(str(resources.files("pacofr").joinpath(*DEMO_DIR)))
    if not (root / INDEX_NAME).is_file():
        raise FileNotFoundError(f"the demo faces are missing from {root}: reinstall pacofr with its package data, "
                                "or rebuild them with `python -m pacofr.data.build_demo`")
    return root


def demo_dataset(**kwargs: Any) -> AlignedFaceDataset:
    """``AlignedFaceDataset`` over the packaged demo faces; keyword arguments are passed on
    (``image_size``, ``augment``, ...)."""
    return AlignedFaceDataset(demo_root(), **kwargs)
