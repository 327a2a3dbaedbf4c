"""``pacofr prepare``: photos -> aligned 224x224 face crops with their landmarks.

Stage 1 (parallel, resumable) detects, selects and aligns the faces of every photo not yet in
the journal, writes each crop as a JPEG and appends one journal line per photo (also for photos
with no face or that cannot be read, so they are not retried). A journal line is reused only for
the same content: it records the photo's size, modification time and SHA-256, and a photo whose
size or mtime changed is hashed again and redone unless its content is the same. Only regular
files are read (FIFOs, devices and links to them are skipped and counted, as are folders that
cannot be listed), and none larger than ``max_bytes``. Stage 2 writes the sorted index,
the recipe and the summary (format "files") or packs the crops into tar shards first (format
"shards"). Crop file names derive from the source path, JPEG encoding is deterministic and the
final index is sorted, so an interrupted run resumed later gives the same output as a run that
was never interrupted. One run at a time writes into a folder: a second is refused naming the first
(a flock on ``.pacofr-prepare/.pacofr-run.lock``, dropped by the kernel however the holder ends).
File names need not be valid UTF-8: they are handled as the bytes the file system gives.
See ``pacofr.data.storage`` for the layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pacofr.data.alignment import AlignmentRecipe, transform_points
from pacofr.data.detection import Detection, FaceDetector, create_detector, select_faces
from pacofr.data.image_io import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    FolderScan,
    UnreadableImageError,
    load_image,
    read_regular_file,
    scan_sources,
)
from pacofr.data.storage import (
    IMAGES_DIR,
    INDEX_NAME,
    RECIPE_NAME,
    SHARDS_DIR,
    SUMMARY_NAME,
    WORK_DIR,
    dumps_line,
    read_jsonl,
    write_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)
from pacofr.train.lock import RunLock

logger = logging.getLogger(__name__)

FORMATS = ("files", "shards")
MULTI_FACE_POLICIES = ("largest", "all", "skip")
OUTCOMES = ("ok", "no_face", "too_small", "multi_skipped", "unreadable")
_JOURNAL = "journal.jsonl"
_SETTINGS = "settings.json"
_COMPLETE = "complete.json"
_STAGED = "staged"
_SCRATCH = "tmp"
_EXAMPLES = 20


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Settings of a prepare run (a resumed run must use the same ones).

    Attributes:
        output_format: "files" (JPEGs + index) or "shards" (tar shards + index).
        multi_face: "largest", "all" or "skip" (photos with several faces).
        min_size: faces whose detection box is shorter than this (source pixels) are ignored.
        image_size: side of the aligned crops.
        border: fill outside the photo ("constant", "replicate", "reflect").
        detector: detector name (see ``pacofr.data.detection.available_detectors``).
        detector_options: keyword options of the detector.
        jpeg_quality: JPEG quality of the crops.
        shard_size: faces per shard (format "shards").
        max_pixels: photos with more pixels are counted unreadable (decompression-bomb guard).
        max_bytes: files larger than this are counted unreadable without being read.
    """

    output_format: str = "files"
    multi_face: str = "largest"
    min_size: float = 32.0
    image_size: int = 224
    border: str = "constant"
    detector: str = "mtcnn"
    detector_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    jpeg_quality: int = 95
    shard_size: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.output_format not in FORMATS:
            raise ValueError(f"output_format must be one of {FORMATS}, got {self.output_format!r}")
        if self.multi_face not in MULTI_FACE_POLICIES:
            raise ValueError(f"multi_face must be one of {MULTI_FACE_POLICIES}, got {self.multi_face!r}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")

    def recipe(self) -> AlignmentRecipe:
        """The alignment recipe these settings produce."""
        return AlignmentRecipe.for_size(self.image_size, detector=self.detector, border=self.border)


@dataclasses.dataclass
class PrepareSummary:
    """What a prepare run found (counts over all inputs, including those done by earlier runs).

    Attributes:
        inputs: image files found under the source folder.
        faces: aligned faces written.
        images_with_faces: photos that gave at least one face.
        no_face: photos where the detector found nothing.
        too_small: photos whose faces were all below ``min_size``.
        multi_face_images: photos with more than one face above ``min_size``.
        multi_face_skipped: photos dropped by the "skip" policy.
        unreadable: image files that could not be decoded (examples in ``unreadable_examples``).
        not_images: files ignored because their name is not an image type.
        special_files: entries skipped because they are not regular files (FIFOs, devices,
            sockets, broken links, links to those).
        unreadable_folders: folders that could not be listed (what they hold is not counted).
        skipped_examples: the first special files and unreadable folders, by name.
        resumed: photos already done by an earlier, interrupted run (not stored in summary.json).
        processed: photos processed by this run (not stored in summary.json).
    """

    inputs: int = 0
    faces: int = 0
    images_with_faces: int = 0
    no_face: int = 0
    too_small: int = 0
    multi_face_images: int = 0
    multi_face_skipped: int = 0
    unreadable: int = 0
    not_images: int = 0
    special_files: int = 0
    unreadable_folders: int = 0
    unreadable_examples: list[str] = dataclasses.field(default_factory=list)
    skipped_examples: list[str] = dataclasses.field(default_factory=list)
    resumed: int = 0
    processed: int = 0

    def stored(self) -> dict[str, Any]:
        """The run-independent part, written to summary.json."""
        out = dataclasses.asdict(self)
        out.pop("resumed")
        out.pop("processed")
        return out

    def format(self) -> str:
        """Human-readable lines."""
        lines = [
            f"inputs: {self.inputs} image files ({self.resumed} done by an earlier run, {self.processed} now); "
            f"{self.not_images} other files ignored",
            f"faces written: {self.faces} from {self.images_with_faces} photos",
            f"no face: {self.no_face}; faces too small: {self.too_small}",
            f"photos with several faces: {self.multi_face_images} ({self.multi_face_skipped} skipped by policy)",
            f"unreadable files: {self.unreadable}",
        ]
        lines += [f"  {example}" for example in self.unreadable_examples]
        lines.append(f"skipped: {self.special_files} special files (not regular files), "
                     f"{self.unreadable_folders} folders that cannot be listed")
        lines += [f"  {example}" for example in self.skipped_examples]
        return "\n".join(lines)


# -- stage 1: one photo ------------------------------------------------------------------------
def name_bytes(name: str) -> bytes:
    """The bytes of a file name as the file system holds them: UTF-8, with the undecodable bytes
    Python keeps as lone surrogates (``surrogateescape``) given back as they were."""
    return name.encode("utf-8", "surrogateescape")


def display_name(name: str) -> str:
    """``name`` printable in any UTF-8 text: bytes that are not UTF-8 appear as ``\\xNN``."""
    return name_bytes(name).decode("utf-8", "backslashreplace")


def face_key(source: str) -> str:
    """Deterministic, file-system-safe, unique name stem for the crops of ``source``."""
    digest = hashlib.sha1(name_bytes(source)).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem)[:40].strip("._") or "img"
    return f"{stem}-{digest}"


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Deterministic JPEG bytes of a uint8 RGB array (4:2:0, no EXIF, no optimisation passes)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return buffer.getvalue()


def _points(values: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 3), round(float(y), 3)] for x, y in np.asarray(values, dtype=np.float64)]


def _face_record(detection: Detection, matrix: np.ndarray, source: str, face: int, file: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "source": source,
        "face": face,
        "file": file,
        "landmarks": _points(transform_points(matrix, detection.landmarks5)),
        "box": [round(float(v), 2) for v in detection.box],
        "score": round(float(detection.score), 5),
    }
    if detection.landmarks_dense is not None:
        record["landmarks_dense"] = _points(transform_points(matrix, detection.landmarks_dense))
    return record


def source_identity(path: Path) -> dict[str, Any]:
    """``size`` and ``mtime_ns`` of a photo (following links; -1 when it cannot be stat'ed) and
    ``sha256`` None: what a journal record holds when the content could not be read."""
    try:
        info = os.stat(path)
    except OSError:
        return {"size": -1, "mtime_ns": -1, "sha256": None}
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": None}


def _unreadable(record: dict[str, Any], err: UnreadableImageError) -> dict[str, Any]:
    logger.debug("%s", err)
    return {**record, "outcome": "unreadable", "reason": err.reason, "detected": 0}


def _same_content(record: dict[str, Any] | None, path: Path, max_bytes: int) -> bool:
    """Whether journal ``record`` describes the photo now at ``path``: same size and mtime, or
    else the same SHA-256 (the photo is read again only then)."""
    if record is None:
        return False
    identity = source_identity(path)
    if identity["size"] != record.get("size"):
        return False
    if identity["mtime_ns"] == record.get("mtime_ns"):
        return True
    if record.get("sha256") is None:
        return False
    try:
        data, _ = read_regular_file(path, max_bytes)
    except UnreadableImageError:
        return False
    return hashlib.sha256(data).hexdigest() == record["sha256"]


@dataclasses.dataclass
class _Worker:
    """Per-process state of stage 1."""

    src: Path
    dst: Path
    crops_dir: str
    config: PrepareConfig
    detector: FaceDetector

    def process(self, source: str) -> dict[str, Any]:
        """Journal record of one photo: its identity (see :func:`source_identity`), outcome,
        detection count and face records."""
        record: dict[str, Any] = {"source": source, "faces": []}
        try:
            data, info = read_regular_file(self.src / source, self.config.max_bytes)
        except UnreadableImageError as err:
            return _unreadable({**record, **source_identity(self.src / source)}, err)
        record.update(size=info.st_size, mtime_ns=info.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
        try:
            image = load_image(data, max_pixels=self.config.max_pixels)
        except UnreadableImageError as err:
            return _unreadable(record, err)
        detections = self.detector.detect(image)
        kept, outcome = select_faces(detections, self.config.multi_face, self.config.min_size)
        record.update(outcome=outcome, detected=sum(d.size >= self.config.min_size for d in detections))
        recipe = self.config.recipe()
        key = face_key(source)
        for number, detection in enumerate(kept):
            aligned, matrix = recipe.align(image, detection.landmarks5)
            file = f"{self.crops_dir}/{key[-2:]}/{key}_{number}.jpg"
            write_atomic(self.dst / file, encode_jpeg(aligned, self.config.jpeg_quality),
                         scratch=self.dst / WORK_DIR / _SCRATCH)
            record["faces"].append(_face_record(detection, matrix, source, number, file))
        return record


_PROCESS_WORKER: _Worker | None = None


def _init_process(src: Path, dst: Path, crops_dir: str, config: PrepareConfig,
                  detector_factory: Callable[[], FaceDetector]) -> None:
    global _PROCESS_WORKER
    import torch

    torch.set_num_threads(1)
    _PROCESS_WORKER = _Worker(src, dst, crops_dir, config, detector_factory())


def _process_in_worker(source: str) -> dict[str, Any]:
    assert _PROCESS_WORKER is not None, "worker not initialised"
    return _PROCESS_WORKER.process(source)


@dataclasses.dataclass(frozen=True)
class DetectorFactory:
    """Picklable recipe for building a registered detector in each worker process."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> FaceDetector:
        return create_detector(self.name, **dict(self.options))


# -- stage 2 -------------------------------------------------------------------------------------
def _pack_shards(dst: Path, faces: list[dict[str, Any]], shard_size: int) -> list[dict[str, Any]]:
    """Write the staged crops into tar shards; return the index records pointing into them."""
    shards_dir = dst / SHARDS_DIR
    shards_dir.mkdir(parents=True, exist_ok=True)
    scratch = dst / WORK_DIR / _SCRATCH
    scratch.mkdir(parents=True, exist_ok=True)
    index = []
    for start in range(0, len(faces), shard_size):
        name = f"shard-{start // shard_size:06d}.tar"
        chunk = faces[start:start + shard_size]
        temporary = scratch / f".tmp-{os.getpid()}-{name}"
        with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
            for record in chunk:
                data = (dst / record["file"]).read_bytes()
                info = tarfile.TarInfo(Path(record["file"]).name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(temporary, "r") as tar:
            offsets = {member.name: (member.offset_data, member.size) for member in tar.getmembers()}
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, shards_dir / name)
        for record in chunk:
            offset, size = offsets[Path(record["file"]).name]
            entry = {k: v for k, v in record.items() if k != "file"}
            entry.update(shard=name, offset=offset, size=size)
            index.append(entry)
    return index


def _summarise(records: list[dict[str, Any]], scan: FolderScan) -> PrepareSummary:
    counts = Counter(record["outcome"] for record in records)
    unreadable = sorted((r["source"], r.get("reason", "")) for r in records if r["outcome"] == "unreadable")
    return PrepareSummary(
        inputs=len(records),
        faces=sum(len(r["faces"]) for r in records),
        images_with_faces=sum(1 for r in records if r["faces"]),
        no_face=counts["no_face"],
        too_small=counts["too_small"],
        multi_face_images=sum(1 for r in records if r.get("detected", 0) > 1),
        multi_face_skipped=counts["multi_skipped"],
        unreadable=counts["unreadable"],
        not_images=len(scan.others),
        special_files=len(scan.special),
        unreadable_folders=len(scan.unreadable_folders),
        unreadable_examples=[f"{display_name(source)}: {display_name(reason)}"
                             for source, reason in unreadable[:_EXAMPLES]],
        skipped_examples=([f"{display_name(name)}: not a regular file" for name in scan.special]
                          + [f"{display_name(name)}/: folder cannot be listed"
                             for name in scan.unreadable_folders])[:_EXAMPLES],
    )


# -- the run ----------------------------------------------------------------------------------------
def _settings_dict(config: PrepareConfig, detector_name: str) -> dict[str, Any]:
    settings = dataclasses.asdict(config)
    settings["detector"] = detector_name
    settings["recipe"] = dataclasses.replace(config.recipe(), detector=detector_name).to_dict()
    return json.loads(json.dumps(settings, sort_keys=True, default=repr))


def _inputs_digest(src: Path, images: list[str]) -> str:
    """Fingerprint of the photo set: every name with its size and mtime."""
    lines = [f"{name}\t{info['size']}\t{info['mtime_ns']}" for name in images
             for info in (source_identity(src / name),)]
    return hashlib.sha1(name_bytes("\n".join(lines))).hexdigest()


def _load_journal(work: Path) -> dict[str, dict[str, Any]]:
    """Records of earlier runs by source; a torn last line is dropped and the journal rewritten."""
    path = work / _JOURNAL
    if not path.exists():
        return {}
    records = {record["source"]: record for record in read_jsonl(path, tolerate_torn_tail=True)}
    write_jsonl_atomic(path, (records[key] for key in sorted(records)))
    return records


def _run_stage_one(todo: list[str], worker_args: tuple, workers: int, journal: Path,
                   progress: bool, done: dict[str, dict[str, Any]],
                   stop_after: int | None) -> int:
    from tqdm import tqdm

    processed = 0
    with open(journal, "a", encoding="utf-8") as log, \
            tqdm(total=len(todo), disable=not progress, unit="img", desc="prepare") as bar:
        def results() -> Iterator[dict[str, Any]]:
            if workers <= 1:
                _init_process(*worker_args)
                for source in todo:
                    yield _process_in_worker(source)
                return
            context = multiprocessing.get_context("spawn")
            with context.Pool(workers, initializer=_init_process, initargs=worker_args) as pool:
                yield from pool.imap_unordered(_process_in_worker, todo, chunksize=1)

        for record in results():
            log.write(dumps_line(record))
            log.flush()
            done[record["source"]] = record
            processed += 1
            bar.update(1)
            if stop_after is not None and processed >= stop_after:
                raise KeyboardInterrupt(f"stopped after {processed} photos (stop_after)")
    return processed


def prepare_faces(src: str | os.PathLike, dst: str | os.PathLike, config: PrepareConfig | None = None, *,
                  workers: int = 1, progress: bool = False,
                  detector_factory: Callable[[], FaceDetector] | None = None,
                  stop_after: int | None = None) -> PrepareSummary:
    """Detect, align and store every face of the photos under ``src`` into ``dst``.

    Args:
        src: folder of photos (searched recursively; hidden entries and ``dst`` are skipped).
        dst: output folder; re-running with the same settings resumes where a run stopped.
        config: run settings (default ``PrepareConfig()``).
        workers: processes for stage 1 (1: in this process).
        progress: show a tqdm progress bar.
        detector_factory: picklable callable building the detector in each worker (default:
            the registered detector ``config.detector``); its ``name`` is recorded.
        stop_after: stop (raising KeyboardInterrupt) after this many photos, as an interruption
            would; for testing resumption.
    Returns:
        The run's summary (also written to ``dst/summary.json``).
    Raises:
        ValueError: ``dst`` was prepared with other settings, or a finished shard set would need
            photos it no longer has.
        RunFolderLockedError: another prepare is writing into ``dst`` (the message names it).
        MissingDependencyError: the detector's optional package is missing.
    """
    config = config or PrepareConfig()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_dir():
        raise NotADirectoryError(f"src must be a folder of photos, got {src}")
    if dst_path.resolve() == src_path.resolve():
        raise ValueError("dst must differ from src (the crops would be read back as photos)")
    factory = detector_factory or DetectorFactory(config.detector, tuple(sorted(config.detector_options.items())))
    work = dst_path / WORK_DIR
    with RunLock(work):
        return _prepare_locked(src_path, dst_path, work, config, workers, progress, factory, stop_after)


def _prepare_locked(src_path: Path, dst_path: Path, work: Path, config: PrepareConfig, workers: int,
                    progress: bool, factory: Callable[[], FaceDetector], stop_after: int | None) -> PrepareSummary:
    """:func:`prepare_faces` once it holds the folder's lock."""
    detector_name = getattr(factory, "name", config.detector)
    shutil.rmtree(work / _SCRATCH, ignore_errors=True)

    settings = _settings_dict(config, detector_name)
    settings_path = work / _SETTINGS
    if settings_path.exists():
        previous = json.loads(settings_path.read_text(encoding="utf-8"))
        previous.setdefault("max_bytes", DEFAULT_MAX_BYTES)  # folders prepared before the size cap existed
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(f"{dst_path} was prepared with other settings ({', '.join(changed)}); "
                             "use a new output folder or the same settings")
    else:
        write_json_atomic(settings_path, settings)

    scan = scan_sources(src_path, exclude=dst_path)
    images = scan.images
    if scan.special or scan.unreadable_folders:
        logger.warning("skipping %d special file(s) (not regular files) and %d folder(s) that cannot be listed "
                       "under %s, e.g. %s", len(scan.special), len(scan.unreadable_folders), src_path,
                       (scan.special + scan.unreadable_folders)[:3])
    inputs_digest = _inputs_digest(src_path, images)
    complete_path = work / _COMPLETE
    if complete_path.exists() and json.loads(complete_path.read_text())["inputs"] == inputs_digest:
        summary = PrepareSummary(**json.loads((dst_path / SUMMARY_NAME).read_text())["counts"])
        summary.resumed = summary.inputs
        logger.info("%s is already complete for these %d photos", dst_path, len(images))
        return summary
    if complete_path.exists() and config.output_format == "shards":
        raise ValueError(f"{dst_path} holds finished shards of another set of photos; use a new output folder")

    done = _load_journal(work)
    gone = sorted(set(done) - set(images))
    if gone:
        logger.warning("%d photo(s) prepared into %s earlier are not under %s now (e.g. %s): the index lists "
                       "only the photos under %s", len(gone), dst_path, src_path, gone[:3], src_path)
    todo = [source for source in images if not _same_content(done.get(source), src_path / source, config.max_bytes)]
    resumed = len(images) - len(todo)
    if resumed:
        logger.info("resuming: %d of %d photos already done", resumed, len(images))
    crops_dir = IMAGES_DIR if config.output_format == "files" else f"{WORK_DIR}/{_STAGED}"
    worker_args = (src_path, dst_path, crops_dir, config, factory)
    processed = _run_stage_one(todo, worker_args, workers, work / _JOURNAL, progress, done, stop_after)

    records = [done[source] for source in images]
    faces = [face for record in records for face in record["faces"]]
    summary = _summarise(records, scan)
    if config.output_format == "shards":
        faces = _pack_shards(dst_path, faces, config.shard_size)
    write_json_atomic(dst_path / RECIPE_NAME, settings["recipe"])
    write_jsonl_atomic(dst_path / INDEX_NAME, faces)
    write_json_atomic(dst_path / SUMMARY_NAME, {"format": config.output_format, "settings": settings,
                                                "counts": summary.stored()})
    write_json_atomic(complete_path, {"inputs": inputs_digest})
    if config.output_format == "shards":
        shutil.rmtree(work / _STAGED, ignore_errors=True)
    shutil.rmtree(work / _SCRATCH, ignore_errors=True)
    summary.resumed, summary.processed = resumed, processed
    return summary
