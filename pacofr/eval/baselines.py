"""Classic face descriptors, the anchors every encoder is compared with.

Each works on the image converted to grey (ITU-R 601 luma) and resized to ``size`` x ``size``
(bilinear, 64 by default, whatever the encoders' input size), and gives one feature vector:

* ``raw``: the grey pixels in [0, 1], size**2 values;
* ``pca``: the raw pixels projected on their first principal components ("eigenfaces"), fitted on
  the training images of each task (:func:`fit_pca`), at most :data:`PCA_COMPONENTS`;
* ``hog``: histograms of oriented gradients (scikit-image: 9 orientations, 8 x 8-pixel cells,
  2 x 2-cell blocks, L2-Hys), 1764 values at 64 px;
* ``lbp``: local binary patterns (8 neighbours at radius 1, the 59 "uniform" codes), one
  normalised histogram per cell of a 4 x 4 grid, 944 values.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from pacofr.data.detection import MissingDependencyError

BASELINES = ("raw", "pca", "hog", "lbp")
BASELINE_TITLES = {"raw": "raw pixels", "pca": "PCA (eigenfaces)", "hog": "HOG", "lbp": "LBP histograms"}
BASELINE_SIZE = 64
PCA_COMPONENTS = 100
LBP_GRID = 4
_LBP_CODES = 59  # nri_uniform codes of 8 neighbours
#: the optional module each baseline needs, and the pacofr extra that installs it
_NEEDS = {"hog": "skimage", "lbp": "skimage"}
_EXTRA = "eval"


def require_dependencies(names: Iterable[str]) -> None:
    """Raise :class:`MissingDependencyError` naming the extra to install when a baseline of ``names``
    needs a package that is not installed (call it before any work)."""
    missing = [name for name in names if name in _NEEDS and importlib.util.find_spec(_NEEDS[name]) is None]
    if missing:
        raise MissingDependencyError(f"the {' and '.join(missing)} baseline(s) need scikit-image, which is not "
                                     f"installed: pip install 'pacofr[{_EXTRA}]' (or scikit-image)")


def grey(image: np.ndarray, size: int) -> np.ndarray:
    """float64 (size, size) in [0, 1]: an RGB uint8 image in grey, resized bilinearly."""
    pil = Image.fromarray(image).convert("L")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    return np.asarray(pil, dtype=np.float64) / 255.0


def hog_features(image: np.ndarray) -> np.ndarray:
    """HOG of a grey (S, S) image in [0, 1] (see module doc)."""
    from skimage.feature import hog

    return hog(image, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2-Hys",
               feature_vector=True)


def lbp_features(image: np.ndarray) -> np.ndarray:
    """Per-cell histograms of uniform LBP codes of a grey (S, S) image in [0, 1] (see module doc)."""
    from skimage.feature import local_binary_pattern

    codes = local_binary_pattern(np.rint(image * 255).astype(np.uint8), P=8, R=1, method="nri_uniform")
    side = image.shape[0] // LBP_GRID
    hists = []
    for row in range(LBP_GRID):
        for col in range(LBP_GRID):
            cell = codes[row * side:(row + 1) * side, col * side:(col + 1) * side]
            counts = np.bincount(cell.astype(np.int64).ravel(), minlength=_LBP_CODES)[:_LBP_CODES]
            hists.append(counts / max(1, cell.size))
    return np.concatenate(hists)


def baseline_features(name: str, batch: Sequence[np.ndarray], size: int = BASELINE_SIZE) -> torch.Tensor:
    """float32 (B, F) descriptor ``name`` of uint8 RGB images (``pca`` gives the raw pixels, which
    :func:`fit_pca` then projects)."""
    if name not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}")
    if size < 16 or size % 16:  # HOG's 2 x 2 blocks of 8-pixel cells, LBP's 4 x 4 grid
        raise ValueError(f"baseline size must be a multiple of 16 and >= 16, got {size}")
    rows = []
    for image in batch:
        pixels = grey(image, size)
        if name in ("raw", "pca"):
            rows.append(pixels.ravel())
        elif name == "hog":
            rows.append(hog_features(pixels))
        else:
            rows.append(lbp_features(pixels))
    if not rows:
        return torch.empty(0, 0)
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def fit_pca(train: torch.Tensor, max_components: int = PCA_COMPONENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (1, F), components (F, k)) of the rows of ``train`` (N, F), k = min(max, N - 1, F),
    from the eigenvectors of the float64 covariance (largest first; signs fixed so the largest
    entry of each component is positive)."""
    if train.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 training images, got {train.shape[0]}")
    x = train.double()
    mean = x.mean(0, keepdim=True)
    centred = x - mean
    k = min(max_components, x.shape[0] - 1, x.shape[1])
    if x.shape[0] >= x.shape[1]:
        values, vectors = torch.linalg.eigh(centred.T @ centred)
        components = vectors[:, values.argsort(descending=True)[:k]]
    else:  # fewer images than pixels: eigenvectors of the Gram matrix, mapped back
        values, vectors = torch.linalg.eigh(centred @ centred.T)
        order = values.argsort(descending=True)[:k]
        components = centred.T @ vectors[:, order]
        components = components / components.norm(dim=0, keepdim=True).clamp_min(1e-12)
    signs = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    return mean.float(), components.float()
