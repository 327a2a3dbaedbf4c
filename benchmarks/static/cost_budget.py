"""The cost budget of the headline rows: an ESTIMATE per kernel, read from its compiled code, beside the floor.

Headline rows (issue 27): nearest_token k = 1 and k = 8 at N = 50176, K = 8192, D = 256 and D = 64 and at
N = 37632, K = 16384, D = 256; soft_assign top-8 forward and backward at N = 50176, K = 8192, D = 256;
the patch gather at B = 256, 224 px, p = 16, 49 visible patches; all bf16. Each row is one recorded op
call (:func:`headline_workloads`, compiled with the rest of the static check); its Triton kernels, and
for nearest_token the ``pacofr._C`` ranking kernel, are budgeted with :mod:`.cost_model` from the
executed opcodes :mod:`.sass_flow` reads, at the launch's grid and tile geometry.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.static import cost_model
from benchmarks.static.launches import KernelLaunch, KernelRecorder, run_with_backward
from benchmarks.static.sass_flow import FlowCounts, flow_counts
from benchmarks.static.triton_aot import Variant, describe
from benchmarks.static.workloads import Workload, empty_tensor

ROOT = Path(__file__).resolve().parents[2]
RANKING_TILES_HEADER = ROOT / "csrc" / "ranking_tiles.h"
BF16, BF16_BYTES = torch.bfloat16, 2
INDEX_BYTES, DISTANCE_BYTES = 8, 4  # int64 indices, fp32 distances / weights / raw scores
#: the patch gather's geometry (kernels.md section 3.5, MAE-Base)
GATHER_BATCH, GATHER_SIZE, GATHER_PATCH, GATHER_KEEP, CHANNELS = 256, 224, 16, 49, 3
HEADLINE_PREFIX = "headline "


@dataclass(frozen=True)
class Headline:
    """One headline row: the op call, its compulsory work, and which kernels it budgets."""

    name: str
    call: Callable[[], None]
    work: cost_model.Workload
    kernels: tuple[str, ...]  #: Triton kernels of the call to budget
    codes: int = 0
    dim: int = 0
    rows: int = 0
    k: int = 0  #: nearest_token's k (0: no pacofr._C ranking row)


def _ranking_bytes(n: int, codes: int, dim: int) -> int:
    return BF16_BYTES * (n + codes) * dim


def _nearest_token(n: int, codes: int, dim: int, k: int) -> Headline:
    def call() -> None:
        from pacofr.ops import nearest_token

        nearest_token(empty_tensor((n, dim), BF16), empty_tensor((codes, dim), BF16), k, "l2", backend="triton")

    work = cost_model.Workload(flops=2.0 * n * codes * dim,
                               hbm_bytes=_ranking_bytes(n, codes, dim) + n * k * (INDEX_BYTES + DISTANCE_BYTES))
    return Headline(f"nearest_token k={k} N={n} K={codes} D={dim} bf16", call, work, ("nearest_token_kernel",),
                    codes=codes, dim=dim, rows=n, k=k)


def _soft_assign(n: int, codes: int, dim: int, m: int) -> tuple[Headline, Headline]:
    def call() -> None:
        from pacofr.ops import soft_assign

        q, book = empty_tensor((n, dim), BF16, True), empty_tensor((codes, dim), BF16, True)
        run_with_backward(lambda: soft_assign(q, book, m, 0.1, metric="cosine", deterministic=False,
                                              backend="triton")[::2])

    saved = n * m * (INDEX_BYTES + 2 * DISTANCE_BYTES) + DISTANCE_BYTES * n  # indices, weights, raw; ||q||
    forward = cost_model.Workload(flops=2.0 * n * codes * dim,
                                  hbm_bytes=_ranking_bytes(n, codes, dim) + BF16_BYTES * n * dim + saved)
    # read g_token and q, write g_q; read the saved pairs; read-modify-write the fp32 codebook gradient
    backward = cost_model.Workload(flops=0.0, hbm_bytes=3 * BF16_BYTES * n * dim + saved + 2 * 4 * codes * dim)
    name = f"soft_assign top-{m} N={n} K={codes} D={dim} bf16"
    return (Headline(f"{name} forward", call, forward, ("soft_assign_fwd_kernel",), codes=codes, dim=dim, rows=n),
            Headline(f"{name} backward", call, backward, ("soft_assign_bwd_kernel",), codes=codes, dim=dim, rows=n))


def _gather() -> Headline:
    def call() -> None:
        from pacofr.ops import gather_patches

        length = (GATHER_SIZE // GATHER_PATCH) ** 2
        ids = torch.arange(length).expand(GATHER_BATCH, -1)[:, :GATHER_KEEP].contiguous()
        gather_patches(empty_tensor((GATHER_BATCH, CHANNELS, GATHER_SIZE, GATHER_SIZE), BF16), ids, GATHER_PATCH,
                       mean=(0.5,) * CHANNELS, std=(0.25,) * CHANNELS, backend="triton", validate=False)

    values = GATHER_BATCH * GATHER_KEEP * GATHER_PATCH ** 2 * CHANNELS
    work = cost_model.Workload(flops=0.0, hbm_bytes=2 * BF16_BYTES * values)  # read the visible pixels, write them
    return Headline(f"gather_patches B={GATHER_BATCH} {GATHER_SIZE}px p={GATHER_PATCH} keep={GATHER_KEEP} bf16",
                    call, work, ("gather_patches_kernel",))


def headlines() -> list[Headline]:
    """The headline rows of issue 27, in table order."""
    rows = [_nearest_token(n, codes, dim, k) for (n, codes, dim) in ((50176, 8192, 256), (50176, 8192, 64),
                                                                       (37632, 16384, 256)) for k in (1, 8)]
    return [*rows, *_soft_assign(50176, 8192, 256, 8), _gather()]


def headline_workloads() -> list[Workload]:
    """The headline calls as static-check workloads (named ``headline <row>``; one per distinct call)."""
    seen: dict[str, Workload] = {}
    for row in headlines():
        name = HEADLINE_PREFIX + row.name.removesuffix(" forward").removesuffix(" backward")
        seen.setdefault(name, Workload(name, lambda recorder, call=row.call: call()))
    return list(seen.values())


# ----------------------------------------------------------------------------------------------
# geometry: how many CTAs, code tiles per CTA and D steps per tile a launch runs
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    ctas: int
    tiles_per_cta: int
    steps_per_tile: int
    warps: int
    registers: int
    shared_bytes: int


def triton_geometry(launch: KernelLaunch, variant: Variant, row: Headline) -> Geometry:
    """A Triton launch's grid, and its tile loop (``BLOCK_K`` codes) and step loop (``BLOCK_D`` of D), when the
    kernel has them."""
    constexprs = variant.constexprs
    tiles = math.ceil(row.codes / constexprs["BLOCK_K"]) if "BLOCK_K" in constexprs and row.codes else 1
    steps = math.ceil(row.dim / constexprs["BLOCK_D"]) if "BLOCK_D" in constexprs and row.dim else 1
    report = variant.report
    return Geometry(ctas=launch.ctas, tiles_per_cta=tiles, steps_per_tile=steps, warps=variant.num_warps,
                    registers=report.resources.registers,
                    shared_bytes=variant.shared_dynamic + report.resources.shared_static)


def ranking_tile_constants(header: Path = RANKING_TILES_HEADER) -> dict[str, int]:
    """The ``constexpr int kName = expression;`` constants of ``csrc/ranking_tiles.h`` (one source of truth);
    an expression may use integers, ``+ - * / ( )`` and the constants defined before it."""
    constants: dict[str, int] = {}
    for name, expression in re.findall(r"constexpr int (k\w+) = ([^;]+);", header.read_text()):
        constants[name] = _evaluate(ast.parse(expression.split("//")[0].strip(), mode="eval").body, constants)
    return constants


def _evaluate(node: ast.AST, names: dict[str, int]) -> int:
    operators = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                 ast.Div: lambda a, b: a // b}
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in operators:
        return operators[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names))
    raise ValueError(f"csrc/ranking_tiles.h: cannot evaluate {ast.dump(node)}")


def cuda_ranking_geometry(row: Headline, kp: int, registers: int, shared_static: int, tiles: dict[str, int],
                          wgmma: bool) -> Geometry:
    """A ``pacofr._C`` ranking kernel's launch (csrc/ranking_tiles.h, csrc/code_ranking.cu) with the query tile
    resident: mma.sync, 2 m-tiles of 16 rows per warp for KP <= 4, else 1, row pitch 16 bytes over the
    64-byte chunks, kStages stages of kStagePitch-byte code rows; wgmma (csrc/code_ranking_sm90.h), kWgmmaRows
    rows, kWgmmaChunkBytes chunks without padding, kWgmmaStages stages. Both: kCodes codes per tile, each stage
    with the tile's terms."""
    dim_bytes = row.dim * BF16_BYTES
    if wgmma:
        chunk = tiles["kWgmmaChunkBytes"]
        chunks = math.ceil(dim_bytes / chunk)
        rows, pitch, code_pitch, stages = tiles["kWgmmaRows"], chunks * chunk, chunk, tiles["kWgmmaStages"]
    else:
        chunks = math.ceil(dim_bytes / tiles["kChunkBytes"])
        rows = tiles["kWarpsM"] * 16 * (2 if kp <= 4 else 1)
        pitch, code_pitch = chunks * tiles["kChunkBytes"] + 16, tiles["kStagePitch"]
        stages = tiles["kStages"]
    ring = stages * (tiles["kCodes"] * code_pitch + tiles["kTermBytes"])
    return Geometry(ctas=math.ceil(row.rows / rows), tiles_per_cta=math.ceil(row.codes / tiles["kCodes"]),
                    steps_per_tile=chunks, warps=tiles["kWarpsM"] * tiles["kWarpsN"], registers=registers,
                    shared_bytes=shared_static + rows * pitch + ring)


# ----------------------------------------------------------------------------------------------
# one budget row
# ----------------------------------------------------------------------------------------------

def _group(counts: Counter, prefixes: tuple[str, ...]) -> float:
    return sum(n for op, n in counts.items() if op.split(".", 1)[0] in prefixes)


def moving_loads(flow: FlowCounts, geometry: Geometry) -> Counter:
    """Global loads per warp and CTA that move bytes: the step loop's loads times its trips, the plain ``LDG``
    of the tile part, and the once-per-CTA ones; cp.async (``LDGSTS``) outside the step loop is the pipeline's
    prologue, which replaces in-loop loads that the last iterations predicate off (:class:`cost_model.Launch`),
    except in a flat step loop, whose tile part lies inside the loop."""
    def loads(counts: Counter, opcodes: tuple[str, ...]) -> Counter:
        return Counter({op: n for op, n in counts.items() if op.split(".", 1)[0] in opcodes})

    if not flow.has_step_loop:
        return Counter({op: n * geometry.tiles_per_cta for op, n in loads(flow.tile, ("LDG", "LDGSTS")).items()})
    tile = Counter({op: n * geometry.steps_per_tile for op, n in loads(flow.step, ("LDG", "LDGSTS")).items()})
    tile.update(loads(flow.tile, ("LDG", "LDGSTS") if flow.flat else ("LDG",)))
    total = Counter({op: n * geometry.tiles_per_cta for op, n in tile.items()})
    total.update(loads(flow.once, ("LDG",)))
    return total


def budget_row(row: Headline, kernel: str, backend: str, arch: str, flow: FlowCounts, geometry: Geometry,
               warp_specialised: bool = False) -> dict[str, Any]:
    """The JSON record of one (row, kernel, arch): per-tile counts, occupancy, bounds, estimate, floor."""
    machine = cost_model.MACHINES[arch]
    per_tile = flow.per_tile(geometry.steps_per_tile)
    per_cta = flow.per_cta(geometry.tiles_per_cta, geometry.steps_per_tile)
    epilogue = Counter({op: n * geometry.tiles_per_cta for op, n in flow.tile.items()})
    launch = cost_model.Launch(ctas=geometry.ctas, warps=geometry.warps, registers=geometry.registers,
                               shared_bytes=geometry.shared_bytes, opcodes=per_cta, loads=moving_loads(flow, geometry),
                               epilogue=epilogue, warp_specialised=warp_specialised)
    result = cost_model.budget(launch, row.work, machine)
    mma_per_tile = _group(per_tile, ("HMMA", "HGMMA"))
    instructions_per_tile = sum(per_tile.values())
    mma_cycles_per_tile = result.tensor_us[0] / max(1, math.ceil(geometry.ctas / machine.sms.nominal)) \
        / geometry.tiles_per_cta * machine.clock_ghz.nominal * 1e3
    return {
        "row": row.name, "kernel": kernel, "backend": backend, "arch": arch, "machine": machine.name,
        "ctas": geometry.ctas, "tiles_per_cta": geometry.tiles_per_cta, "steps_per_tile": geometry.steps_per_tile,
        "warps": geometry.warps, "registers": geometry.registers, "shared_bytes": geometry.shared_bytes,
        "ctas_per_sm": result.ctas_per_sm,
        "per_tile_per_warp": {"mma": mma_per_tile, "mma_opcodes": sorted({op for op in per_tile
                                                                          if op.split(".")[0] in ("HMMA", "HGMMA")}),
                              "instructions": instructions_per_tile,
                              "other_instructions": instructions_per_tile - mma_per_tile,
                              "epilogue_instructions": sum(flow.tile.values()),
                              "barriers": _group(per_tile, ("BAR",)),
                              "global_loads": _group(per_tile, cost_model.GLOBAL_LOAD_OPCODES)},
        "mma_cycles_per_tile": round(mma_cycles_per_tile, 1),
        "issue_slots_per_scheduler_per_tile": round(instructions_per_tile * geometry.warps
                                                    / machine.schedulers.nominal, 1),
        "mma_flops": result.mma_flops, "useful_flops": row.work.flops,
        "l2_bytes": result.l2_bytes, "hbm_bytes": row.work.hbm_bytes,
        "bounds_us": {k: round(v, 1) for k, v in result.bounds(0).items()},
        "exposed_epilogue_us": round(result.exposed_epilogue_us[0], 1),
        "dominant": result.dominant,
        "estimate_us": round(result.estimate_us, 1),
        "estimate_range_us": [round(v, 1) for v in result.estimate_range_us],
        "floor_us": round(result.floor_us, 1),
        "estimate_over_floor": round(result.estimate_us / result.floor_us, 2) if result.floor_us else None,
        "flat_step_loop": flow.flat, "label": "estimate (static, from SASS; not measured)",
    }


def triton_budget_rows(launches: list[KernelLaunch], variants: dict[tuple, Variant]) -> list[dict[str, Any]]:
    """A budget row per (headline row, Triton kernel, architecture) that was recorded and compiled."""
    out = []
    for row in headlines():
        origin = HEADLINE_PREFIX + row.name.removesuffix(" forward").removesuffix(" backward")
        for launch in launches:
            if launch.origin != origin or launch.name not in row.kernels:
                continue
            variant = variants.get(describe(launch).key)
            arch = f"sm_{launch.arch}"
            if variant is None or variant.flow is None or variant.report is None or arch not in cost_model.MACHINES:
                continue
            out.append(budget_row(row, launch.name, "triton", arch, variant.flow,
                                  triton_geometry(launch, variant, row)))
    return out


def cuda_budget_rows(kernels: list, listings: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """A budget row per nearest_token headline row and architecture for the ``pacofr._C`` bf16 ranking kernel
    (``kernels``: :class:`~benchmarks.static.cuda_sass.CudaKernel`; ``listings``: SASS by (arch, mangled name))."""
    tiles = ranking_tile_constants()
    out = []
    for row in headlines():
        if not row.k:
            continue
        kp = 1 << (row.k - 1).bit_length()
        for kernel in kernels:
            arch = kernel.report.arch.removesuffix("a")  # sm_90a runs on the sm_90 machine
            wgmma = _bf16_ranking_kind(kernel.name, kp)
            # the wgmma kernel from the sm_90a image (elsewhere it is a stub), mma.sync from the plain images
            if wgmma is None or arch not in cost_model.MACHINES or wgmma != (kernel.report.arch == "sm_90a"):
                continue
            listing = listings.get((kernel.report.arch, kernel.report.name))
            if listing is None:
                continue
            geometry = cuda_ranking_geometry(row, kp, kernel.report.resources.registers,
                                             kernel.report.resources.shared_static, tiles, wgmma)
            out.append(budget_row(row, kernel.name, "cuda", arch, flow_counts(listing), geometry))
    return out


def _bf16_ranking_kind(name: str, kp: int) -> bool | None:
    """True for the bf16 wgmma ranking kernel of list length ``kp``, False for the bf16 mma.sync one (its
    resident-query variant), None for any other kernel."""
    if (found := re.match(r"rank_codes_wgmma_kernel<true, (\d+)>", name)) is not None:
        return True if int(found.group(1)) == kp else None
    found = re.match(r"rank_codes_kernel<pacofr::ranking::Mma16Bit<true>, (\d+)(?:, (true|false))?>", name)
    return False if found is not None and int(found.group(1)) == kp and found.group(2) in (None, "true") else None


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------

def machine_table() -> list[str]:
    """The assumed machine constants, with their sources (one place)."""
    lines = ["| machine | constant | nominal | range | source |", "|---|---|---|---|---|"]
    for machine in cost_model.MACHINES.values():
        for name, value in machine.constants().items():
            lines.append(f"| {machine.name} ({machine.arch}) | {name} | {value.nominal:g} | "
                         f"{value.low:g}-{value.high:g} | {value.source} |")
    return lines


def budget_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one line per budget row (estimates labelled as such)."""
    lines = ["| row | backend: kernel | arch | CTAs/SM (regs, smem KiB) | per tile per warp: MMA / other instr. / "
             "epilogue / barriers | bounds µs (tensor, issue, L2, HBM) | dominant | **estimate µs** (range) | "
             "floor µs | est./floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, b = r["per_tile_per_warp"], r["bounds_us"]
        lines.append(
            f"| {r['row']} | {r['backend']}: `{r['kernel'].split('<')[0]}` | {r['arch']} | {r['ctas_per_sm']} "
            f"({r['registers']}, {r['shared_bytes'] / 1024:.0f}) | {t['mma']:g} / {t['other_instructions']:g} / "
            f"{t['epilogue_instructions']:g} / {t['barriers']:g} | {b['tensor']:g}, {b['issue']:g}, {b['l2']:g}, "
            f"{b['hbm']:g} | {r['dominant']} | **{r['estimate_us']:g}** ({r['estimate_range_us'][0]:g}-"
            f"{r['estimate_range_us'][1]:g}) | {r['floor_us']:g} | {r['estimate_over_floor']} |")
    return lines
