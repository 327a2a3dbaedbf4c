"""The prepare pipeline: outputs, counts, policies, bad files, resumption after interruption."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from _data_support import DenseStubDetector, StubDetector, jpeg_bytes, stub_photo, write_bytes

from pacofr.cli import main as cli_main
from pacofr.data.alignment import TEMPLATE_224, AlignmentRecipe
from pacofr.data.prepare import PrepareConfig, face_key, prepare_faces
from pacofr.data.storage import INDEX_NAME, RECIPE_NAME, SUMMARY_NAME, WORK_DIR, read_jsonl
from pacofr.train.lock import RunFolderLockedError

TESTS_DIR = Path(__file__).resolve().parent

INDEX_STEP = 1e-3
"""The index stores landmark coordinates rounded to 3 decimals: each is within half a step of the value."""

FIT_NOISE_PX = 16 * 224 * 2.0**-53
"""float64 noise of aligning the stub's exactly template-shaped faces (a similarity and its least-squares
inverse) on a 224 crop: measured at most 4.6 * 224 * 2^-53 px over 600 stub faces of varied photo sizes."""


def make_sources(root: Path, count: int = 0) -> Path:
    """A folder with every kind of input; ``count`` extra one-face photos."""
    write_bytes(root, "one.jpg", jpeg_bytes(stub_photo(1, seed=1)))
    stub_photo(2, seed=2).save(root / "two.png")
    write_bytes(root, "none.jpg", jpeg_bytes(stub_photo(0, seed=3)))
    sub = root / "sub" / "deeper"
    sub.mkdir(parents=True)
    stub_photo(1, seed=4).convert("L").save(sub / "grey.png")  # grey 110 at (0, 0): one face
    rgba = stub_photo(1, seed=5).convert("RGBA")
    rgba.putpixel((5, 5), (1, 2, 3, 0))
    rgba.save(root / "sub" / "alpha.png")
    write_bytes(root, "empty.png", b"")
    write_bytes(root, "corrupt.jpg", b"GIF89a but not really" * 20)
    full = jpeg_bytes(stub_photo(1, seed=6))
    write_bytes(root, "truncated.jpg", full[: len(full) // 2])
    write_bytes(root, "notes.txt", b"not a photo")
    for number in range(count):
        write_bytes(root, f"many/photo_{number:03d}.jpg", jpeg_bytes(stub_photo(1, seed=100 + number)))
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every output file's bytes, leaving out the resumable run's work folder."""
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file() and WORK_DIR not in path.parts}


def start_slow_prepare(src: Path, dst: Path, journal_lines: int) -> subprocess.Popen:
    """A prepare of ``src`` into ``dst`` in another process (0.3 s per photo), returned once its
    journal holds ``journal_lines`` lines (or after 60 s)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from _data_support import StubDetector
        from pacofr.data.prepare import prepare_faces
        prepare_faces({str(src)!r}, {str(dst)!r}, detector_factory=StubDetector(delay=0.3))
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    journal = dst / WORK_DIR / "journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count("\n") >= journal_lines:
            break
        time.sleep(0.02)
    return process


def test_files_output_counts_and_landmarks(tmp_path):
    src = make_sources(tmp_path / "src")
    dst = tmp_path / "dst"
    summary = prepare_faces(src, dst, detector_factory=StubDetector())
    assert (summary.inputs, summary.faces, summary.images_with_faces) == (8, 4, 4)
    assert (summary.no_face, summary.unreadable, summary.not_images, summary.multi_face_images) == (1, 3, 1, 1)
    assert summary.multi_face_skipped == 0 and summary.too_small == 0
    assert [e.split(":")[0] for e in summary.unreadable_examples] == ["corrupt.jpg", "empty.png", "truncated.jpg"]
    records = list(read_jsonl(dst / INDEX_NAME))
    assert [r["source"] for r in records] == ["one.jpg", "sub/alpha.png", "sub/deeper/grey.png", "two.png"]
    for record in records:
        crop = Image.open(dst / record["file"])
        assert crop.size == (224, 224) and crop.mode == "RGB"
        # the stub's faces are exactly template-shaped, so they land on the template, to the index's rounding
        np.testing.assert_allclose(record["landmarks"], TEMPLATE_224, rtol=0, atol=INDEX_STEP / 2 + FIT_NOISE_PX)
        assert face_key(record["source"]) in record["file"]
    # "largest" kept the bigger face: the stub's boxes are 85.7 and 53.6 px wide (200 template px at 40 % and 25 %
    # of the 120 px side over 112), 70 lies between them
    assert records[-1]["box"][2] - records[-1]["box"][0] > 70
    recipe = AlignmentRecipe.from_dict(json.loads((dst / RECIPE_NAME).read_text()))
    assert recipe.size == 224 and recipe.detector == "stub"
    stored = json.loads((dst / SUMMARY_NAME).read_text())
    assert stored["format"] == "files" and stored["counts"]["faces"] == 4
    assert "faces written: 4 from 4 photos" in summary.format()


def test_dense_landmarks_are_aligned_and_stored(tmp_path):
    src = make_sources(tmp_path / "src")
    prepare_faces(src, tmp_path / "dst", detector_factory=DenseStubDetector())
    for record in read_jsonl(tmp_path / "dst" / INDEX_NAME):
        dense = np.asarray(record["landmarks_dense"])
        assert dense.shape == (6, 2)
        # same transform as the 5 points, both rounded: one step apart at most, if float64 noise straddles a
        # rounding boundary
        np.testing.assert_allclose(dense[:5], record["landmarks"], rtol=0, atol=INDEX_STEP + FIT_NOISE_PX)
        # the centroid maps to the mean of the mapped points; each side rounded by at most half a step
        np.testing.assert_allclose(dense[5], np.mean(record["landmarks"], axis=0), rtol=0,
                                   atol=INDEX_STEP + FIT_NOISE_PX)
    prepare_faces(src, tmp_path / "plain", detector_factory=StubDetector())
    assert all("landmarks_dense" not in record for record in read_jsonl(tmp_path / "plain" / INDEX_NAME))


def test_multi_face_policies_and_min_size(tmp_path):
    src = make_sources(tmp_path / "src")
    every = prepare_faces(src, tmp_path / "all", PrepareConfig(multi_face="all"), detector_factory=StubDetector())
    assert every.faces == 5
    faces = [r for r in read_jsonl(tmp_path / "all" / INDEX_NAME) if r["source"] == "two.png"]
    assert [f["face"] for f in faces] == [0, 1]
    skipped = prepare_faces(src, tmp_path / "skip", PrepareConfig(multi_face="skip"), detector_factory=StubDetector())
    assert (skipped.faces, skipped.multi_face_skipped) == (3, 1)
    # the second face of two.png is 25 % of 120 px, the others 40 %: a 60 px minimum keeps only the big ones
    small = prepare_faces(src, tmp_path / "min", PrepareConfig(multi_face="all", min_size=60),
                          detector_factory=StubDetector())
    assert small.faces == 4 and small.multi_face_images == 0
    tiny = prepare_faces(src, tmp_path / "tiny", PrepareConfig(min_size=500), detector_factory=StubDetector())
    assert (tiny.faces, tiny.too_small, tiny.no_face) == (0, 4, 1)


@pytest.mark.parametrize("output_format", ["files", "shards"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, output_format):
    src = make_sources(tmp_path / "src", count=6)
    config = PrepareConfig(output_format=output_format, shard_size=3)
    clean = prepare_faces(src, tmp_path / "clean", config, detector_factory=StubDetector())
    with pytest.raises(KeyboardInterrupt):
        prepare_faces(src, tmp_path / "resumed", config, detector_factory=StubDetector(), stop_after=5)
    assert not (tmp_path / "resumed" / INDEX_NAME).exists()  # nothing final before the end
    resumed = prepare_faces(src, tmp_path / "resumed", config, detector_factory=StubDetector())
    assert (resumed.resumed, resumed.processed) == (5, clean.inputs - 5)
    assert tree(tmp_path / "clean") == tree(tmp_path / "resumed")
    again = prepare_faces(src, tmp_path / "resumed", config, detector_factory=StubDetector())
    assert again.processed == 0 and again.faces == clean.faces
    assert tree(tmp_path / "clean") == tree(tmp_path / "resumed")


def test_a_killed_run_resumes_to_the_same_output(tmp_path):
    src = make_sources(tmp_path / "src", count=12)
    prepare_faces(src, tmp_path / "clean", detector_factory=StubDetector())
    dst = tmp_path / "killed"
    process = start_slow_prepare(src, dst, journal_lines=3)
    journal = dst / WORK_DIR / "journal.jsonl"
    process.send_signal(signal.SIGKILL)
    process.wait()
    lines = journal.read_text().count("\n")
    assert 3 <= lines < 20, "the run must be killed half way"  # one journal line per photo, of 20
    assert not (dst / INDEX_NAME).exists()
    resumed = prepare_faces(src, dst, detector_factory=StubDetector())
    assert resumed.resumed == lines
    assert tree(tmp_path / "clean") == tree(dst)


def test_a_torn_journal_line_and_stale_scratch_files_are_recovered(tmp_path):
    src = make_sources(tmp_path / "src")
    prepare_faces(src, tmp_path / "clean", detector_factory=StubDetector())
    dst = tmp_path / "torn"
    with pytest.raises(KeyboardInterrupt):
        prepare_faces(src, dst, detector_factory=StubDetector(), stop_after=3)
    journal = dst / WORK_DIR / "journal.jsonl"
    with open(journal, "a") as handle:
        handle.write('{"source": "two.png", "outc')  # a write cut short by a crash
    write_bytes(dst / WORK_DIR / "tmp", ".tmp-123-half.jpg", b"half a crop")
    resumed = prepare_faces(src, dst, detector_factory=StubDetector())
    assert resumed.resumed == 3
    assert tree(tmp_path / "clean") == tree(dst)
    assert not (dst / WORK_DIR / "tmp").exists()


def test_shards_hold_the_same_crops_as_files(tmp_path):
    src = make_sources(tmp_path / "src", count=4)
    prepare_faces(src, tmp_path / "files", detector_factory=StubDetector())
    prepare_faces(src, tmp_path / "shards", PrepareConfig(output_format="shards", shard_size=3),
                  detector_factory=StubDetector())
    files = list(read_jsonl(tmp_path / "files" / INDEX_NAME))
    shards = list(read_jsonl(tmp_path / "shards" / INDEX_NAME))
    assert len(files) == len(shards) == 8
    assert sorted(p.name for p in (tmp_path / "shards" / "shards").iterdir()) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not (tmp_path / "shards" / WORK_DIR / "staged").exists()
    for by_file, by_shard in zip(files, shards):
        assert by_file["landmarks"] == by_shard["landmarks"] and by_file["source"] == by_shard["source"]
        with open(tmp_path / "shards" / "shards" / by_shard["shard"], "rb") as handle:
            handle.seek(by_shard["offset"])
            data = handle.read(by_shard["size"])
        assert data == (tmp_path / "files" / by_file["file"]).read_bytes()
    with tarfile.open(tmp_path / "shards" / "shards" / "shard-000000.tar") as tar:
        assert len(tar.getmembers()) == 3


def test_several_workers_give_the_same_output(tmp_path):
    src = make_sources(tmp_path / "src", count=3)
    prepare_faces(src, tmp_path / "one", detector_factory=StubDetector())
    summary = prepare_faces(src, tmp_path / "two", detector_factory=StubDetector(), workers=2)
    assert summary.faces == 7
    assert tree(tmp_path / "one") == tree(tmp_path / "two")


def test_changed_settings_and_bad_arguments_are_refused(tmp_path):
    src = make_sources(tmp_path / "src")
    prepare_faces(src, tmp_path / "dst", detector_factory=StubDetector())
    with pytest.raises(ValueError, match="other settings.*jpeg_quality"):
        prepare_faces(src, tmp_path / "dst", PrepareConfig(jpeg_quality=80), detector_factory=StubDetector())
    with pytest.raises(ValueError, match="dst must differ"):
        prepare_faces(src, src, detector_factory=StubDetector())
    with pytest.raises(ValueError, match="multi_face"):
        PrepareConfig(multi_face="first")
    with pytest.raises(NotADirectoryError):
        prepare_faces(tmp_path / "missing", tmp_path / "x", detector_factory=StubDetector())


def test_new_photos_extend_a_finished_files_folder(tmp_path):
    src = make_sources(tmp_path / "src")
    prepare_faces(src, tmp_path / "dst", detector_factory=StubDetector())
    write_bytes(src, "later.jpg", jpeg_bytes(stub_photo(1, seed=77)))
    summary = prepare_faces(src, tmp_path / "dst", detector_factory=StubDetector())
    assert (summary.processed, summary.faces) == (1, 5)
    prepare_faces(src, tmp_path / "fresh", detector_factory=StubDetector())
    assert tree(tmp_path / "dst") == tree(tmp_path / "fresh")


def test_cli_explains_a_missing_detector_package(tmp_path, monkeypatch, capsys):
    src = make_sources(tmp_path / "src")
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails
    code = cli_main(["prepare", str(src), str(tmp_path / "dst"), "--no-progress"])
    assert code == 2
    assert 'pip install "pacofr[faces]"' in capsys.readouterr().err


def test_stub_photos_decode_to_their_face_count():
    for faces in range(3):
        data = io.BytesIO(jpeg_bytes(stub_photo(faces)))
        pixel = np.asarray(Image.open(data).convert("RGB"))[0, 0, 0]
        assert int(pixel) // 100 == faces  # the JPEG keeps the code readable


def _indexed(dst):
    """The index and the bytes of every crop it points at (what a data set reads)."""
    records = list(read_jsonl(dst / INDEX_NAME))
    return records, {r["file"]: (dst / r["file"]).read_bytes() for r in records}


def test_a_photo_with_the_same_name_but_other_content_is_redone(tmp_path, caplog):
    first, second = tmp_path / "s1", tmp_path / "s2"
    for number in range(3):
        write_bytes(first, f"p{number}.jpg", jpeg_bytes(stub_photo(1, seed=10 + number)))
    write_bytes(second, "p0.jpg", jpeg_bytes(stub_photo(1, seed=99)))  # another person, the same name
    dst = tmp_path / "dst"
    prepare_faces(first, dst, detector_factory=StubDetector())
    with caplog.at_level("WARNING", logger="pacofr.data.prepare"):
        summary = prepare_faces(second, dst, detector_factory=StubDetector())
    assert (summary.resumed, summary.processed, summary.faces) == (0, 1, 1)
    assert "2 photo(s) prepared into" in caplog.text and "are not under" in caplog.text
    prepare_faces(second, tmp_path / "fresh", detector_factory=StubDetector())
    assert _indexed(dst) == _indexed(tmp_path / "fresh")


def test_a_photo_changed_in_place_is_redone_and_a_touched_one_is_not(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for number in range(2):  # BMP: the same size for every photo of these dimensions
        stub_photo(1, seed=20 + number).save(src / f"p{number}.bmp")
    dst = tmp_path / "dst"
    prepare_faces(src, dst, detector_factory=StubDetector())
    before = _indexed(dst)
    size = (src / "p0.bmp").stat().st_size
    stub_photo(1, seed=77).save(src / "p0.bmp")  # p0: same size, other pixels
    assert (src / "p0.bmp").stat().st_size == size
    os.utime(src / "p1.bmp", ns=(10**18, 10**18))  # p1: the same bytes, only a new mtime
    summary = prepare_faces(src, dst, detector_factory=StubDetector())
    assert (summary.resumed, summary.processed) == (1, 1)
    after = _indexed(dst)
    prepare_faces(src, tmp_path / "fresh", detector_factory=StubDetector())
    assert after == _indexed(tmp_path / "fresh")
    assert after != before


@pytest.mark.timeout(120)
def test_special_files_are_skipped_and_counted_and_a_size_cap_holds(tmp_path, monkeypatch):
    src = make_sources(tmp_path / "src")
    os.mkfifo(src / "pipe.jpg")  # reading it would block forever
    (src / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    (src / "gone.jpg").symlink_to(src / "nothing-here.jpg")
    (src / "link.jpg").symlink_to(src / "one.jpg")  # a link to a regular file is a photo like any other
    write_bytes(src, "locked/hidden.jpg", jpeg_bytes(stub_photo(1, seed=8)))
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = prepare_faces(src, tmp_path / "dst", detector_factory=StubDetector())
    assert (summary.special_files, summary.unreadable_folders) == (3, 1)
    assert summary.skipped_examples == ["gone.jpg: not a regular file", "pipe.jpg: not a regular file",
                                        "zero.jpg: not a regular file", "locked/: folder cannot be listed"]
    assert (summary.inputs, summary.faces) == (9, 5)
    assert "skipped: 3 special files (not regular files), 1 folders that cannot be listed" in summary.format()
    stored = json.loads((tmp_path / "dst" / SUMMARY_NAME).read_text())["counts"]
    assert (stored["special_files"], stored["unreadable_folders"]) == (3, 1)
    capped = prepare_faces(src, tmp_path / "capped", PrepareConfig(max_bytes=2000), detector_factory=StubDetector())
    assert capped.faces == 0
    assert any("exceeds max_bytes=2000" in example for example in capped.unreadable_examples)


def test_file_names_that_are_not_utf8_are_prepared_and_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # names as raw bytes: Latin-1 'é' (0xE9) is not UTF-8, so Python sees a lone surrogate
    with open(os.path.join(os.fsencode(src), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(jpeg_bytes(stub_photo(1, seed=7)))
    with open(os.path.join(os.fsencode(src), b"bro\xffken.jpg"), "wb") as handle:
        handle.write(b"not a jpeg")
    write_bytes(src, "plain.jpg", jpeg_bytes(stub_photo(1, seed=8)))
    dst = tmp_path / "dst"
    summary = prepare_faces(src, dst, detector_factory=StubDetector())
    assert (summary.inputs, summary.faces, summary.unreadable) == (3, 2, 1)
    sources = sorted(record["source"] for record in read_jsonl(dst / INDEX_NAME))
    assert sources == sorted([os.fsdecode(b"caf\xe9.jpg"), "plain.jpg"])
    report = summary.format()
    report.encode("utf-8")  # printable: a surrogate would raise UnicodeEncodeError here
    assert "bro\\xffken.jpg" in report
    again = prepare_faces(src, dst, detector_factory=StubDetector())
    assert (again.resumed, again.processed) == (3, 0)


def test_a_second_prepare_into_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    src = make_sources(tmp_path / "src", count=12)
    prepare_faces(src, tmp_path / "clean", detector_factory=StubDetector())
    dst = tmp_path / "busy"
    process = start_slow_prepare(src, dst, journal_lines=1)
    try:
        with pytest.raises(RunFolderLockedError, match=f"pid {process.pid}"):
            prepare_faces(src, dst, PrepareConfig(output_format="files"), detector_factory=StubDetector())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (dst / INDEX_NAME).exists()
    prepare_faces(src, dst, detector_factory=StubDetector())  # the dead holder's lock is taken over
    assert tree(tmp_path / "clean") == tree(dst)
