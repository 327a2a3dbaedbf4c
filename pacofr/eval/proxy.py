"""Offline labelled proxy sets, named ``proxy:NAME`` on the command line.

No labelled face set (identities, expressions, attributes) installs offline (see
``shared/design/offline-faces.md``), so the built-in evaluation is a **proxy**:

``lfw-face-vs-nonface``
    ``skimage.data.lfw_subset()`` (scikit-image): 100 real face crops from Labeled Faces in the
    Wild and 100 non-face crops, 25 x 25 greyscale, labelled face / non-face. It measures whether
    features separate faces from other image content; it says nothing about recognition,
    expression or attributes. The packaged demo pre-training set was made from the same 100 LFW
    photos (aligned, enlarged), so the face class of the probe was seen, without labels, during
    pre-training; :func:`demo_overlap` counts it.

A proxy is written once as a class-per-folder tree of PNG files (``face/lfw_000.png``...) and then
read like any user folder, so it takes the same split rule (:mod:`pacofr.eval.splits`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pacofr.eval.labelled import LabelledSet
from pacofr.eval.readers import read_folder

logger = logging.getLogger(__name__)

PROXY_PREFIX = "proxy:"


@dataclass(frozen=True)
class ProxySet:
    """A labelled set built from data that ships inside an installed package."""

    name: str
    description: str
    write: Callable[[Path], None]  # writes root/<class>/<image>.png


def _write_lfw_face_vs_nonface(root: Path) -> None:
    try:
        from skimage.data import lfw_subset
    except ImportError as err:
        raise ValueError("proxy:lfw-face-vs-nonface needs scikit-image (pip install 'pacofr[demo]')") from err
    images = lfw_subset()  # (200, 25, 25) float64 in [0, 1]: 100 faces, then 100 non-faces
    if images.shape[0] != 200:
        raise ValueError(f"skimage.data.lfw_subset() returned {images.shape[0]} images, expected 200")
    for index, image in enumerate(images):
        folder = root / ("face" if index < 100 else "nonface")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"lfw_{index:03d}.png")


PROXIES: dict[str, ProxySet] = {
    "lfw-face-vs-nonface": ProxySet(
        name="lfw-face-vs-nonface",
        description=("PROXY task, not face recognition: face vs non-face on skimage.data.lfw_subset() "
                     "(100 real LFW face crops + 100 non-face crops, 25x25 greyscale, resized to the "
                     "encoder's input and replicated to RGB). Chance = about 0.5."),
        write=_write_lfw_face_vs_nonface,
    ),
}


def is_proxy(source: str) -> bool:
    """Whether a ``--data`` value names a proxy set (``proxy:NAME``)."""
    return str(source).startswith(PROXY_PREFIX)


def proxy_set(source: str) -> ProxySet:
    """The :class:`ProxySet` of ``proxy:NAME`` (ValueError listing the known names otherwise)."""
    name = str(source)[len(PROXY_PREFIX):] if is_proxy(source) else str(source)
    if name not in PROXIES:
        raise ValueError(f"unknown proxy set {name!r}; known: {[PROXY_PREFIX + n for n in PROXIES]}")
    return PROXIES[name]


def open_proxy(source: str, scratch: Path) -> LabelledSet:
    """The labelled set of ``proxy:NAME``, written under ``scratch`` on first use."""
    proxy = proxy_set(source)
    root = Path(scratch) / proxy.name
    if not root.is_dir():
        proxy.write(root)
        logger.info("wrote proxy set %s to %s", proxy.name, root)
    data = read_folder(root)
    data.source = PROXY_PREFIX + proxy.name
    return data


def demo_overlap() -> int:
    """How many photos of the packaged demo pre-training faces come from ``lfw_subset`` (and are
    therefore face-class images of ``proxy:lfw-face-vs-nonface``)."""
    from pacofr.data.demo import demo_root
    from pacofr.data.storage import INDEX_NAME

    lines = (demo_root() / INDEX_NAME).read_text().splitlines()
    return sum(1 for line in lines if line.strip() and json.loads(line).get("source", "").startswith("lfw/"))
