"""The host-testable logic of the CUDA kernels, checked on the CPU without a GPU.

``csrc/host_tests/host_logic_driver.cpp`` compiles the ``__host__ __device__`` functions the kernels
use (keys and top-k lists, the MMA fragment address maps, the ranking epilogue, the reported
distance, FastDivmod, the patch indexer, the segment reduction, launch-limit and tile arithmetic)
with the host compiler; every answer is checked here against an independent Python reference.

The MMA check is an emulation of one warp from the PTX ISA's documented semantics ("Matrix
Fragments for mma.m16n8k16 / mma.m16n8k8", "ldmatrix"): the lanes hand ldmatrix the addresses the
kernel's maps give, ldmatrix deals the 16-byte rows out to the registers, the fragment tables say
which matrix element each register is for the MMA, and the product the kernel then reads through
its accumulator map must be ``A @ B^T``. Nothing of the driver's maps is reused by the emulator.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER_SOURCE = ROOT / "csrc" / "host_tests" / "host_logic_driver.cpp"
EMPTY_KEY = (1 << 64) - 1
LIST_LENGTHS = (1, 2, 4, 8, 16)
NAN_LAST, NAN_AS_INFINITY = 0, 1

Driver = Callable[[str], list[str]]


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Driver:
    """The compiled host driver: driver(stdin text) -> stdout lines."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++) to build csrc/host_tests/host_logic_driver.cpp")
    exe = tmp_path_factory.mktemp("cuda_host_logic") / "host_logic_driver"
    build = subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                            "-o", str(exe), str(DRIVER_SOURCE)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr

    def run(text: str) -> list[str]:
        done = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split("\n")

    return run


def bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def from_bits(words: np.ndarray) -> np.ndarray:
    return np.asarray(words, dtype=np.uint32).view(np.float32)


def join(values) -> str:
    return " ".join(str(int(v)) for v in values)


# ------------------------------------------------------------------------------------------
# (score, index) keys and top-k lists
# ------------------------------------------------------------------------------------------

def order_key(score: float, index: int, nan_rank: int) -> tuple:
    """The documented order: smaller score first, ties to the smaller index, -0 == +0, NaN last
    (nearest_token) or equal to +inf (soft_assign)."""
    if math.isnan(score):
        return (1, 0.0, index) if nan_rank == NAN_LAST else (0, math.inf, index)
    return (0, float(score), index)


SPECIAL_SCORES = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.17549435e-38,
                           -1.17549435e-38, 3.4028235e38, -3.4028235e38, 0.5, -0.5], dtype=np.float32)


def random_scores(rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaussian, small integers (ties), and the special values, shuffled."""
    parts = [rng.standard_normal(n).astype(np.float32), rng.integers(-3, 4, n).astype(np.float32),
             np.repeat(SPECIAL_SCORES, 3)]
    scores = np.concatenate(parts)
    return scores[rng.permutation(len(scores))]


@pytest.mark.parametrize("nan_rank", [NAN_LAST, NAN_AS_INFINITY])
def test_keys_order_as_score_then_index_and_decode(driver: Driver, nan_rank: int) -> None:
    rng = np.random.default_rng()
    scores = random_scores(rng, 400)
    indices = rng.choice(2**31 - 1, size=len(scores), replace=False)
    lines = driver(f"keys {nan_rank} {len(scores)} " + " ".join(f"{b} {i}" for b, i in zip(bits(scores), indices)))
    keys = np.array([int(line.split()[0]) for line in lines], dtype=object)
    decoded = from_bits(np.array([int(line.split()[1]) for line in lines]))
    decoded_index = np.array([int(line.split()[2]) for line in lines])
    expected = sorted(range(len(scores)), key=lambda i: order_key(float(scores[i]), int(indices[i]), nan_rank))
    assert sorted(range(len(scores)), key=lambda i: keys[i]) == expected
    assert (decoded_index == indices).all()
    finite = ~np.isnan(scores)
    assert (decoded[finite] == scores[finite]).all()  # -0.0 decodes as +0.0, equal as numbers
    if nan_rank == NAN_LAST:
        assert np.isnan(decoded[~finite]).all()
    else:
        assert (decoded[~finite] == np.inf).all()


def expected_top(keys: list[int], kp: int) -> list[int]:
    return (sorted(keys) + [EMPTY_KEY] * kp)[:kp]


@pytest.mark.parametrize("kp", LIST_LENGTHS)
@pytest.mark.parametrize("lanes", [1, 4, 32])
@pytest.mark.parametrize("n", [3, 37, 300])
def test_top_lists_by_insertion_and_by_butterfly_merge(driver: Driver, kp: int, lanes: int, n: int) -> None:
    rng = np.random.default_rng()
    scores = random_scores(rng, n)[:n]
    indices = rng.choice(2**31 - 1, size=n, replace=False)
    nan_rank = int(rng.integers(0, 2))
    text = f"topk {kp} {nan_rank} {lanes} {n} " + " ".join(f"{b} {i}" for b, i in zip(bits(scores), indices))
    single, merged = driver(text)
    key_lines = driver(f"keys {nan_rank} {n} " + " ".join(f"{b} {i}" for b, i in zip(bits(scores), indices)))
    keys = [int(line.split()[0]) for line in key_lines]
    want = expected_top(keys, kp)
    assert [int(v) for v in single.split()] == want
    assert [int(v) for v in merged.split()] == want


# ------------------------------------------------------------------------------------------
# MMA fragments: one warp emulated from the PTX ISA tables
# ------------------------------------------------------------------------------------------

def layout(driver: Driver) -> dict[str, np.ndarray]:
    rows = np.array([[int(v) for v in line.split()] for line in driver("layout")])
    assert rows.shape == (32, 12)
    return {"a": rows[:, 0:2], "b": rows[:, 2:4], "acc": rows[:, 4:12].reshape(32, 4, 2)}


def ldmatrix_x4(tile_bytes: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """PTX ldmatrix.m8n8.x4.b16: lane 8j+r gives the address of row r of matrix j (16 bytes); lane l
    receives in register j the 4 bytes at offset 4*(l%4) of row l/4 of matrix j. Returns (32, 4, 4)
    bytes: lane, register, byte."""
    out = np.zeros((32, 4, 4), dtype=np.uint8)
    for lane in range(32):
        for j in range(4):
            row, byte = sources[8 * j + lane // 4]
            start = byte + 4 * (lane % 4)
            out[lane, j] = tile_bytes[row, start:start + 4]
    return out


STORAGE = {
    # kind: (values -> stored elements, 4 little-endian bytes of a register -> its elements as float64)
    "float16": (lambda m: m.astype(np.float16), lambda raw: raw.view(np.float16).astype(np.float64)),
    "bfloat16": (lambda m: (m.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16),
                 lambda raw: (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)),
    "tf32": (lambda m: m.astype(np.float32), lambda raw: raw.view(np.float32).astype(np.float64)),
}


def mma_16816_operands(a_vals: np.ndarray, b_vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PTX fragment tables of mma.m16n8k16 (.f16/.bf16), per lane (g = lane/4, t = lane%4), two
    elements per register, the lower half first:
    A a0..a7: row g + 8 for i in {2, 3, 6, 7}, else g; col 2t + (i & 1), + 8 for i >= 4.
    B b0..b3: row (k) 2t + (i & 1), + 8 for i >= 2; col (n) g."""
    a = np.full((16, 16), np.nan)
    b = np.full((16, 8), np.nan)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(8):
            a[g + 8 if i in (2, 3, 6, 7) else g, 2 * t + (i & 1) + (8 if i >= 4 else 0)] = a_vals[lane, i]
        for i in range(4):
            b[2 * t + (i & 1) + (8 if i >= 2 else 0), g] = b_vals[lane, i]
    return a, b


def mma_1688_tf32_operands(a_vals: np.ndarray, b_vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PTX fragment tables of mma.m16n8k8 (.tf32), one element per register:
    A a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B b0 (k=t, n=g), b1 (k=t+4, n=g)."""
    a = np.full((16, 8), np.nan)
    b = np.full((8, 8), np.nan)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i, (row, col) in enumerate([(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]):
            a[row, col] = a_vals[lane, i]
        b[t, g], b[t + 4, g] = b_vals[lane, 0], b_vals[lane, 1]
    return a, b


C_TABLE = [lambda g, t: (g, 2 * t), lambda g, t: (g, 2 * t + 1), lambda g, t: (g + 8, 2 * t),
           lambda g, t: (g + 8, 2 * t + 1)]
"""PTX accumulator table (both shapes): c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)."""


def check_warp_product(maps: dict[str, np.ndarray], queries: np.ndarray, codes: np.ndarray, kind: str) -> None:
    """queries (16 rows) and codes (16 codes) of one 32-byte k-slab, small integers (exact in every
    input type), stored row-major as the kernel stores them; the MMA product read through the
    kernel's accumulator map must equal queries @ codes^T."""
    store, decode = STORAGE[kind]
    q_bytes = np.ascontiguousarray(store(queries)).view(np.uint8).reshape(16, 32)
    c_bytes = np.ascontiguousarray(store(codes)).view(np.uint8).reshape(16, 32)
    a_raw = ldmatrix_x4(q_bytes, maps["a"])
    b_raw = ldmatrix_x4(c_bytes, maps["b"])
    a_vals = np.stack([decode(a_raw[lane].reshape(-1)) for lane in range(32)])
    b_vals = np.stack([decode(b_raw[lane].reshape(-1)) for lane in range(32)])
    want = queries.astype(np.float64) @ codes.astype(np.float64).T  # (16 rows, 16 codes)
    per_reg = a_vals.shape[1] // 4  # elements per 32-bit register: 2 (16-bit) or 1 (tf32)
    for tile in range(2):  # registers {0, 1} of the B load feed n-tile 0, {2, 3} n-tile 1
        b_tile = b_vals[:, 2 * tile * per_reg:(2 * tile + 2) * per_reg]
        a, b = (mma_1688_tf32_operands if kind == "tf32" else mma_16816_operands)(a_vals, b_tile)
        assert not np.isnan(a).any() and not np.isnan(b).any(), "the fragments leave matrix elements unset"
        product = a @ b
        for lane in range(32):
            for reg in range(4):
                row, col = C_TABLE[reg](lane // 4, lane % 4)
                kernel_row, kernel_col = maps["acc"][lane, reg]
                assert product[row, col] == want[kernel_row, 8 * tile + kernel_col], (kind, lane, reg)


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "tf32"])
def test_mma_fragments_compute_the_tile_product(driver: Driver, kind: str) -> None:
    rng = np.random.default_rng()
    maps = layout(driver)
    k_slab = 8 if kind == "tf32" else 16  # 32 bytes of k per row
    for _ in range(3):
        queries = rng.integers(-8, 9, size=(16, k_slab)).astype(np.float32)
        codes = rng.integers(-8, 9, size=(16, k_slab)).astype(np.float32)
        check_warp_product(maps, queries, codes, kind)


def test_the_simt_lane_reads_the_accumulator_rows_and_codes(driver: Driver) -> None:
    """The exact-fp32 SIMT path computes, per lane, rows l/4 and l/4 + 8 by codes 2(l%4) and
    2(l%4) + 1: the accumulator map must be exactly that (the epilogue is shared)."""
    acc = layout(driver)["acc"]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        assert [tuple(acc[lane, r]) for r in range(4)] == [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t),
                                                            (g + 8, 2 * t + 1)]


def test_ldmatrix_row_reads_are_bank_conflict_free(driver: Driver) -> None:
    """Each 8-lane phase of ldmatrix reads eight 16-byte rows; with the kernel's row pitches they must
    fall in 32 distinct 4-byte banks, for the ring stage and for resident query tiles of any D."""
    maps = layout(driver)
    dims = [16, 48, 64, 128, 512, 1536, 3072, 4112]
    lines = driver(f"tiles {len(dims)} {join(dims)}")
    pitches = [int(line.split()[0]) for line in lines[:-1]]
    stage_pitch = int(lines[-1].split()[2])
    for pitch in [stage_pitch, *pitches]:
        assert pitch % 64 == 16
        for operand in ("a", "b"):
            for slab_byte in (0, 32):
                for tile_row in (0, 16, 48):
                    for matrix in range(4):
                        banks = set()
                        for r in range(8):
                            row, byte = maps[operand][8 * matrix + r]
                            start = (tile_row + row) * pitch + slab_byte + byte
                            assert start % 16 == 0, "ldmatrix rows must be 16-byte aligned"
                            banks.update(((start // 4) + w) % 32 for w in range(4))
                        assert len(banks) == 32, (operand, pitch, matrix)


def test_tile_shared_memory_fits_the_devices(driver: Driver) -> None:
    """bf16 D = 256 and 768 keep the query tile resident on sm_80 (163 KiB per block) and sm_90
    (227 KiB); every streaming layout fits sm_80; the cross-warp merge fits in the ring."""
    sm80, sm90 = 163 * 1024, 227 * 1024
    lines = driver("tiles 3 512 1536 65536")
    threads, codes, stage_pitch, stages, *rows = (int(v) for v in lines[-1].split())
    assert threads == 256 and codes == 128
    for line, (fits80, fits90) in zip(lines[:-1], [(True, True), (False, True), (False, False)]):
        values = [int(v) for v in line.split()]
        resident, streaming = values[1:6], values[6:11]
        assert (resident[0] + 1024 <= sm80) == fits80 and (resident[0] + 1024 <= sm90) == fits90
        assert all(s + 1024 <= sm80 for s in streaming)
    for kp, block_rows in zip(LIST_LENGTHS, rows):
        assert block_rows * kp * 8 <= stages * codes * stage_pitch


# ------------------------------------------------------------------------------------------
# the ranking epilogue of a whole warp (two warps along codes), merges included
# ------------------------------------------------------------------------------------------

def reference_key(score: np.float32, index: int, nan_rank: int) -> int:
    """Python's make_key: order-preserving score bits << 32 | index."""
    if np.isnan(score):
        word = 0xFFFFFFFF if nan_rank == NAN_LAST else (0x7F800000 | 0x80000000)
    else:
        b = int(bits(np.float32(0.0) if score == 0 else score))
        word = (~b & 0xFFFFFFFF) if b & 0x80000000 else (b | 0x80000000)
    return (word << 32) | index


@pytest.mark.parametrize("kp,m_tiles,n_tiles", [(1, 2, 8), (2, 2, 8), (4, 2, 8), (8, 1, 8), (16, 1, 8), (16, 2, 8),
                                                (1, 1, 8), (1, 1, 16), (4, 1, 16), (16, 1, 16)])
@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("nan_rank", [NAN_LAST, NAN_AS_INFINITY])
@pytest.mark.parametrize("ragged", [False, True])
def test_epilogue_keeps_each_rows_k_best_codes(driver: Driver, kp: int, m_tiles: int, n_tiles: int,
                                               cosine: bool, nan_rank: int, ragged: bool) -> None:
    """Warp tiles of n_tiles n8 MMA tiles (8: the mma.sync kernel; 16: the wgmma kernel's 128 codes);
    the driver's two warps take alternate code tiles. Every tile but a ``ragged`` last one is full
    (codes past n_codes in it must never be listed); an infinite and a NaN code term make +inf and
    NaN scores, which tie under NAN_AS_INFINITY."""
    rng = np.random.default_rng()
    tile_codes = 8 * n_tiles
    tiles = int(rng.integers(2, 6))
    n_codes = int(rng.integers((tiles - 1) * tile_codes + 1, tiles * tile_codes)) if ragged else tiles * tile_codes
    rows = 16 * m_tiles
    dots = rng.integers(-3, 4, size=(rows, tiles * tile_codes)).astype(np.float32)  # many exact ties
    dots[rng.integers(0, rows)] = np.nan  # a NaN query row
    terms = rng.choice(np.float32([0.5, 1.0, 2.0]), size=n_codes).astype(np.float32)
    special = rng.choice(n_codes, size=2, replace=False)
    terms[special] = [np.nan, np.inf]  # a NaN code and an infinite one
    acc = np.zeros((tiles, 32, m_tiles, n_tiles, 4), dtype=np.float32)
    for tile in range(tiles):
        for lane in range(32):
            for mi in range(m_tiles):
                for ni in range(n_tiles):
                    for reg in range(4):
                        row, col = C_TABLE[reg](lane // 4, lane % 4)  # PTX accumulator layout
                        acc[tile, lane, mi, ni, reg] = dots[16 * mi + row, tile * tile_codes + 8 * ni + col]
    text = (f"epilogue {kp} {m_tiles} {n_tiles} {int(cosine)} {nan_rank} {tiles} {n_codes} "
            f"{join(bits(acc.reshape(-1)))} {join(bits(terms))}")
    lines = driver(text)
    assert len(lines) == rows
    with np.errstate(invalid="ignore"):  # inf * 0 and inf - inf: the NaN scores the kernel makes too
        for row in range(rows):
            d = dots[row, :n_codes]
            scores = (-d) * terms if cosine else terms - d  # fp32, as the kernel: -dot * term, term - dot
            keys = [reference_key(scores[c], c, nan_rank) for c in range(n_codes)]
            assert [int(v) for v in lines[row].split()] == expected_top(keys, kp), f"row {row}"


def test_reported_distance_follows_the_reference_formulas(driver: Driver) -> None:
    rng = np.random.default_rng()
    n = 400
    scores = np.concatenate([rng.standard_normal(n).astype(np.float32) * 10, np.float32([np.nan, -np.inf, 0.0])])
    norms = np.concatenate([np.abs(rng.standard_normal(n)).astype(np.float32) * 5, np.float32([1.0, 4.0, 0.0])])
    norms[:20] = 0.0
    # nearest_token's finite-range rule: a squared norm that is not <= 2^124 (NaN, inf, larger) gives NaN
    norms[20:26] = np.float32([np.nan, np.inf, 2.0 ** 124, np.nextafter(np.float32(2.0 ** 124), np.float32(np.inf)),
                               3e38, 1e30])
    cosine = rng.integers(0, 2, size=len(scores))
    text = f"distance {len(scores)} " + " ".join(f"{s} {q} {c}" for s, q, c in zip(bits(scores), bits(norms), cosine))
    got = from_bits(np.array([int(v) for v in driver(text)]))
    with np.errstate(all="ignore"):
        inv = np.where(norms > 0, np.float32(1) / np.sqrt(norms), np.float32(0)).astype(np.float32)
        cos = (np.float32(1) + scores * inv).astype(np.float32)
        l2 = (norms + np.float32(2) * scores).astype(np.float32)
        l2 = np.where(l2 < 0, np.float32(0), l2)  # NaN stays NaN
    want = np.where(cosine == 1, cos, l2)
    want = np.where(norms <= np.float32(2.0 ** 124), want, np.float32(np.nan))
    assert np.isnan(got[20:26]).tolist() == [True, True, False, True, True, False]
    assert (np.isnan(got) == np.isnan(want)).all()
    assert (got[~np.isnan(want)] == want[~np.isnan(want)]).all()


# ------------------------------------------------------------------------------------------
# patch kernels: FastDivmod, the patch indexer, the (rows, values) tiling
# ------------------------------------------------------------------------------------------

def test_fast_divmod_is_exact(driver: Driver) -> None:
    rng = np.random.default_rng()
    divisors = [1, 2, 3, 7, 255, 256, 1000003, 2**30, 2**31 - 1, *rng.integers(1, 2**31, 40).tolist()]
    pairs = []
    for d in divisors:
        for n in [0, 1, d - 1, d, d + 1, 2 * d - 1, 2**31 - 1, *rng.integers(0, 2**31, 20).tolist()]:
            if 0 <= n < 2**31:
                pairs.append((n, d))
    lines = driver(f"divmod {len(pairs)} " + " ".join(f"{n} {d}" for n, d in pairs))
    for (n, d), line in zip(pairs, lines):
        assert tuple(int(v) for v in line.split()) == (n // d, n % d), (n, d)


@pytest.mark.parametrize("layout_kind", ["contiguous", "channels_last", "expanded"])
def test_patch_indexer_offsets(driver: Driver, layout_kind: str) -> None:
    rng = np.random.default_rng()
    for _ in range(6):
        b, c, p = int(rng.integers(1, 4)), int(rng.choice([1, 3])), int(rng.choice([1, 2, 4, 8, 16]))
        h, w = p * int(rng.integers(1, 6)), p * int(rng.integers(1, 6))
        strides = {"contiguous": (c * h * w, h * w, w, 1), "channels_last": (h * w * c, 1, w * c, c),
                   "expanded": (0, h * w, w, 1)}[layout_kind]
        sb, sc, sh, sw = strides
        n_img = int(rng.integers(1, 7))
        length, patch_dim, grid_cols = (h // p) * (w // p), p * p * c, w // p
        queries = [(int(rng.integers(-3, length + 3)), int(rng.integers(0, b * n_img)), int(rng.integers(0, patch_dim)))
                   for _ in range(200)]
        lines = driver(f"patch {b} {c} {h} {w} {p} {sb} {sc} {sh} {sw} {n_img} {len(queries)} "
                       + " ".join(f"{i} {r} {k}" for i, r, k in queries))
        for (patch_id, row, k), line in zip(queries, lines):
            ok, base, offset, channel = (int(v) for v in line.split())
            assert ok == (0 <= patch_id < length)
            if ok:
                image, prow, pcol = row // n_img, patch_id // grid_cols, patch_id % grid_cols
                assert base == image * sb + prow * p * sh + pcol * p * sw
            pixel, ch = divmod(k, c)
            assert (offset, channel) == (ch * sc + (pixel // p) * sh + (pixel % p) * sw, ch)


def test_row_tiling_covers_every_value_once(driver: Driver) -> None:
    cases = [(1, 1), (7, 31), (3, 32), (5, 33), (9, 100), (2, 192), (4, 256), (3, 768), (1000, 3), (2**31 - 1, 48)]
    lines = driver(f"tiling {len(cases)} " + " ".join(f"{r} {v}" for r, v in cases))
    for (rows, values), line in zip(cases, lines):
        tx, ty, bx, by = (int(v) for v in line.split())
        assert tx % 32 == 0 and 32 <= tx <= 256 and tx * ty <= 256 and ty >= 1
        assert bx * ty >= rows and (bx - 1) * ty < rows  # rows covered by blocks x, no block wasted
        assert by * tx >= values and (by - 1) * tx < values


# ------------------------------------------------------------------------------------------
# the fixed-order segment reduction (deterministic codebook gradient and codebook_stats)
# ------------------------------------------------------------------------------------------

def skewed_codes(rng: np.random.Generator, n_codes: int, n_entries: int, hot_share: float) -> np.ndarray:
    """Zipf-like usage (one code holds hot_share of the entries) plus out-of-range codes."""
    hot = int(rng.integers(0, n_codes))
    codes = rng.integers(0, n_codes, size=n_entries)
    codes[rng.random(n_entries) < hot_share] = hot
    bad = rng.choice(n_entries, size=min(6, n_entries), replace=False)
    codes[bad] = rng.choice([-1, -7, n_codes, n_codes + 5], size=len(bad))
    return np.sort(codes, kind="stable")


@pytest.mark.parametrize("n_entries,n_codes,columns,hot_share", [
    (1, 1, 1, 0.0), (127, 5, 3, 0.5), (128, 3, 2, 0.0), (129, 40, 4, 0.2), (1500, 30, 3, 0.7),
    (4000, 1000, 2, 0.6), (640, 2, 1, 0.99)])
def test_segment_reduction_sums_every_code_once_in_a_fixed_order(driver: Driver, n_entries: int, n_codes: int,
                                                                 columns: int, hot_share: float) -> None:
    rng = np.random.default_rng()
    codes = skewed_codes(rng, n_codes, n_entries, hot_share)
    values = rng.standard_normal((n_entries, columns)).astype(np.float32)
    head = f"segments {n_entries} {n_codes} {columns} "
    body = f" {' '.join(str(int(c)) for c in codes)} {join(bits(values.reshape(-1)))}"
    first = driver(head + "1" + body)
    second = driver(head + "2" + body)  # chunks visited in another order: the same bits
    assert first == second
    assert len(first) == n_codes
    for code, line in enumerate(first):
        written, *words = (int(v) for v in line.split())
        mine = codes == code
        assert written == (columns if mine.any() else 0), f"code {code} written {written} times"
        got = from_bits(np.array(words, dtype=np.uint32)).astype(np.float64)
        want = values[mine].astype(np.float64).sum(axis=0) if mine.any() else np.zeros(columns)
        scale = np.abs(values[mine]).astype(np.float64).sum(axis=0) if mine.any() else np.zeros(columns)
        assert (np.abs(got - want) <= 1e-6 * scale + 1e-30).all(), f"code {code}"


def test_launch_limits(driver: Driver) -> None:
    cases = [  # x, y, z, static, dynamic, limit -> grid ok, shared ok
        ((1, 1, 1, 0, 0, 49152), (1, 1)),
        ((0, 1, 1, 0, 0, 49152), (0, 1)),
        ((2**31 - 1, 65535, 65535, 0, 49152, 49152), (1, 1)),
        ((2**31, 1, 1, 0, 0, 49152), (0, 1)),
        ((1, 65536, 1, 0, 0, 49152), (0, 1)),
        ((1, 1, 65536, 0, 0, 49152), (0, 1)),
        # the old soft_assign check: D = 12288 fp32 values (49152 bytes) plus a few hundred bytes of
        # static scratch passed "dynamic <= 48 KiB" and failed at launch
        ((1, 1, 1, 304, 49152, 49152), (1, 0)),
        ((1, 1, 1, 1024, 231424, 232448), (1, 1)),
        ((1, 1, 1, 1025, 231424, 232448), (1, 0)),
        ((1, 1, 1, 0, 232449, 232448), (1, 0)),
    ]
    lines = driver(f"limits {len(cases)} " + " ".join(join(c) for c, _ in cases))
    assert [tuple(int(v) for v in line.split()) for line in lines] == [want for _, want in cases]


# ------------------------------------------------------------------------------------------
# the Hopper (wgmma) kernel's shared-memory layout, matrix descriptors and kernel choice
# ------------------------------------------------------------------------------------------

def wgmma_read_address(start: int, leading: int, stride: int, row: int, byte: int) -> int:
    """Where wgmma reads byte ``byte`` (along K) of row ``row`` (along M or N) of a K-major operand without
    swizzle (PTX ISA, "Shared Memory Matrix Layout"): core matrices of 8 rows x 16 bytes, rows 16 bytes
    apart inside one, core matrices ``leading`` bytes apart along K and ``stride`` bytes apart along M/N."""
    return start + (row // 8) * stride + (byte // 16) * leading + (row % 8) * 16 + byte % 16


def decode_descriptor(value: int) -> tuple[int, int, int, int, int]:
    """(start address, leading byte offset, stride byte offset, base offset, swizzle) of a wgmma matrix
    descriptor: bits 0-13, 16-29, 32-45 hold the three byte values >> 4, 49-51 the base offset,
    62-63 the swizzle mode."""
    field = lambda low, bits: (value >> low) & ((1 << bits) - 1)  # noqa: E731
    return field(0, 14) << 4, field(16, 14) << 4, field(32, 14) << 4, field(49, 3), field(62, 2)


@pytest.mark.parametrize("rows,columns", [(128, 4), (128, 8), (128, 16), (64, 48)])
def test_wgmma_layout_is_what_the_descriptors_read(driver: Driver, rows: int, columns: int) -> None:
    """The kernel writes the 16-byte vector (row, column) at core_offset(row, column, columns) and hands
    wgmma descriptors with leading offset 128 and stride offset columns * 128: every byte of every k16
    slab and 64-row (A) or 128-row (B) operand must then be read from where it was written."""
    offsets = np.array([[int(v) for v in line.split()] for line in driver(f"wgmma_layout {rows} {columns}")])
    assert offsets.shape == (rows, columns)
    assert len(set(offsets.ravel())) == rows * columns and offsets.max() + 16 == rows * columns * 16  # dense
    for first_row in range(0, rows, 64):
        for slab in range(columns // 2):
            start = int(offsets[first_row, 2 * slab])
            for row in range(first_row, min(rows, first_row + 64)):
                for byte in range(0, 32, 16):
                    written = int(offsets[row, 2 * slab + byte // 16])
                    assert wgmma_read_address(start, 128, columns * 128, row - first_row, byte) == written


def test_wgmma_descriptor_fields(driver: Driver) -> None:
    cases = [(0x400, 128, 512), (0x3FFF0, 128, 16 * 128), (0x12340, 256, 6144), (0x10, 16, 0x3FFF0)]
    lines = driver(f"descriptor {len(cases)} " + " ".join(join(c) for c in cases))
    for (address, leading, stride), line in zip(cases, lines):
        assert decode_descriptor(int(line)) == (address, leading, stride, 0, 0)  # no swizzle, base offset 0


def test_kernel_choice(driver: Driver) -> None:
    """The wgmma kernel only for an enabled dispatch, capability 9.0, 16-bit inputs, its sm_90a image and a
    query tile that fits; otherwise mma.sync."""
    fits = (1024, 200 * 1024, 227 * 1024)
    cases = [((9, 0, 1, 1, *fits, 1), 1), ((9, 0, 1, 1, *fits, 0), 0), ((8, 0, 1, 1, *fits, 1), 0),
             ((9, 1, 1, 1, *fits, 1), 0), ((10, 0, 1, 1, *fits, 1), 0), ((9, 0, 0, 1, *fits, 1), 0),
             ((9, 0, 1, 0, *fits, 1), 0), ((9, 0, 1, 1, 1024, 227 * 1024, 227 * 1024, 1), 0)]
    lines = driver(f"dispatch {len(cases)} " + " ".join(join(c) for c, _ in cases))
    assert [int(v) for v in lines] == [want for _, want in cases]


def test_wgmma_kernel_is_off_unless_asked_for(driver: Driver) -> None:
    """Off by default until the GPU tests have run it; PACOFR_CUDA_WGMMA=1 (exactly) switches it on."""
    values = ["-", "1", "0", "10", "yes"]
    assert [int(v) for v in driver(f"wgmma_switch {len(values)} {' '.join(values)}")] == [0, 1, 0, 0, 0]


def test_wgmma_shared_memory(driver: Driver) -> None:
    """128 resident query rows of D bytes (rounded up to 128) and 2 stages of 128 x 128-byte code chunks with
    their 128 fp32 terms: bf16 D = 256 fits two blocks per SM (228 KiB, 1 KiB static and 1 KiB reserved per
    block), bf16 D = 768 one block (227 KiB per block)."""
    dims = [16, 512, 1536]
    got = [int(v) for v in driver(f"wgmma_shared {len(dims)} {join(dims)}")]
    assert got == [128 * (-(-d // 128) * 128) + 2 * (128 * 128 + 128 * 4) for d in dims]
    assert 2 * (got[1] + 1024 + 1024) <= 228 * 1024
    assert got[-1] + 1024 <= 227 * 1024
