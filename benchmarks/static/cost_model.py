"""An ESTIMATE of a kernel's time from its compiled code: the bound each resource implies, and the floor.

Input: the executed opcodes of one CTA (per warp, :class:`~benchmarks.static.sass_flow.FlowCounts`
at the launch geometry), the CTA's registers, shared memory and warps, and the workload's
compulsory FLOPs and HBM bytes. Output (:class:`Budget`), for the busiest SM:

* ``tensor``: tensor-core work of the MMA instructions (padding included) at the measured dense rate
  (``HGMMA``) or the fraction of it ``mma.sync`` reaches (``HMMA``);
* ``issue``: every instruction takes an issue slot of one of the SM's schedulers (1 per cycle);
* ``l2``: bytes the global loads of all CTAs request (32 lanes x the access width; see
  :class:`Launch` for the loads counted), at the assumed L2 -> SM bandwidth;
* ``hbm``: the workload's compulsory bytes at the measured copy bandwidth;
* ``exposed epilogue``: with one CTA per SM and no warp specialisation every warp reaches the
  epilogue at the same moment, so its issue time adds to the tensor time instead of hiding under it.

``estimate = max(tensor + exposed epilogue, issue, l2, hbm)`` and ``floor = max(FLOPs / dense rate,
compulsory bytes / HBM bandwidth)``. Ranges come from the ranges of the assumed constants
(:data:`MACHINES`). It is a design tool, not a measurement: every number it gives is labelled an
estimate, and the GPU run says how far off it is.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

#: bits a tensor-core opcode's shape modifier gives: HMMA.16816 -> (16, 8, 16), HGMMA.64x128x16 -> (64, 128, 16)
_HMMA_SHAPE_RE = re.compile(r"^HMMA\.(\d{2})(\d)(\d{1,2})\b")
_HGMMA_SHAPE_RE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\b")
_WIDTH_RE = re.compile(r"\.(128|64|U16|S16|U8|S8)\b")
GLOBAL_LOAD_OPCODES: tuple[str, ...] = ("LDG", "LDGSTS")
WARP_LANES = 32
WARPGROUP_WARPS = 4


@dataclass(frozen=True)
class Constant:
    """An assumed machine constant: nominal value, low..high range, and where it comes from."""

    nominal: float
    low: float
    high: float
    source: str


@dataclass(frozen=True)
class Machine:
    """The constants of one GPU the estimate assumes (one place for all of them, with sources)."""

    name: str
    arch: str
    sms: Constant
    dense_tflops: Constant  #: 16-bit dense tensor-core rate, TFLOP/s
    mma_sync_fraction: Constant  #: fraction of ``dense_tflops`` that mma.sync (HMMA) reaches
    hbm_tbps: Constant
    l2_tbps: Constant
    clock_ghz: Constant
    schedulers: Constant  #: warp schedulers per SM, each issuing 1 instruction per cycle
    registers_per_sm: int = 65536
    shared_per_sm: int = 233472
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32

    def constants(self) -> dict[str, Constant]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Constant)}


_H100_SOURCE = "H100 SXM 80GB HBM3, docs/kernels/cost-budget.md (Machine constants)"
H100 = Machine(
    name="H100 SXM", arch="sm_90",
    sms=Constant(132, 132, 132, "torch device properties on the lent H100 (kernels.md section 1)"),
    dense_tflops=Constant(790, 790, 800, "measured: cuBLAS bf16 GEMM 8192^3 on the lent H100 (kernels.md section 1)"),
    mma_sync_fraction=Constant(0.625, 0.60, 0.65, "assumed, not measured: mma.sync reaches 60-65 % of the wgmma rate on "
                               "Hopper (issue 27's figure)"),
    hbm_tbps=Constant(3.0, 3.0, 3.0, "measured: device-to-device copy, read + write counted (kernels.md section 1)"),
    l2_tbps=Constant(6.25, 5.5, 7.0, "assumed, not measured: L2 -> SM bandwidth 5.5-7 TB/s (issue 27)"),
    clock_ghz=Constant(1.83, 1.7, 1.98, "NVIDIA H100 SXM boost clock 1.98 GHz; about 1.7-1.75 GHz sustained under "
                       "tensor-core load (assumed)"),
    schedulers=Constant(4, 4, 4, "Hopper SM: 4 sub-partitions, one warp scheduler each, 1 instruction per cycle "
                        "(NVIDIA H100 architecture whitepaper)"),
    shared_per_sm=233472,
)
A100 = Machine(
    name="A100 SXM", arch="sm_80",
    sms=Constant(108, 108, 108, "NVIDIA A100 datasheet"),
    dense_tflops=Constant(312, 280, 312, "NVIDIA A100 datasheet 312 TFLOP/s dense bf16; about 280 reached by "
                          "cuBLAS (assumed, not measured here)"),
    mma_sync_fraction=Constant(1.0, 0.9, 1.0, "assumed: mma.sync is Ampere's native tensor-core path"),
    hbm_tbps=Constant(1.8, 1.6, 2.0, "NVIDIA A100 80GB datasheet 2.0 TB/s; about 1.6-1.8 TB/s copy (assumed)"),
    l2_tbps=Constant(4.0, 3.5, 4.5, "assumed, not measured: L2 -> SM bandwidth"),
    clock_ghz=Constant(1.41, 1.3, 1.41, "NVIDIA A100 boost clock 1.41 GHz"),
    schedulers=Constant(4, 4, 4, "Ampere SM: 4 sub-partitions, one scheduler each (NVIDIA A100 whitepaper)"),
    shared_per_sm=167936,
)
MACHINES: dict[str, Machine] = {"sm_90": H100, "sm_80": A100}


def mma_flops(opcode: str) -> tuple[int, bool]:
    """(FLOPs of one MMA instruction's tile, whether it is a warpgroup instruction), from its shape modifier.

    ``HMMA.16816.F32.BF16``: 2*16*8*16 per warp; ``HMMA.1688.F32.TF32``: 2*16*8*8;
    ``HGMMA.64x64x16.F32.BF16``: 2*64*64*16 per warpgroup (each of its four warps issues it)."""
    if (found := _HGMMA_SHAPE_RE.match(opcode)) is not None:
        m, n, k = (int(g) for g in found.groups())
        return 2 * m * n * k, True
    if (found := _HMMA_SHAPE_RE.match(opcode)) is not None:
        m, n, k = (int(g) for g in found.groups())
        return 2 * m * n * k, False
    raise ValueError(f"not a tensor-core opcode with a shape: {opcode!r}")


def load_bytes_per_lane(opcode: str) -> int:
    """Bytes one lane reads with a global load: ``.128`` 16, ``.64`` 8, ``.U16`` 2, ``.U8`` 1, else 4."""
    found = _WIDTH_RE.search(opcode)
    if found is None:
        return 4
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[found.group(1)]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its grid, its CTA's resources, and its per-warp executed opcodes per CTA.

    ``loads``: the per-warp global loads per CTA that move bytes. In a software-pipelined loop the
    cp.async loads before the loop (its prologue) stand in for the loads its last iterations
    predicate off, so the bytes are those of the loop's loads times its trip count (plus any plain
    ``LDG`` outside it); the caller passes that count."""

    ctas: int
    warps: int
    registers: int
    shared_bytes: int  #: static + dynamic per CTA
    opcodes: Counter  #: per warp, per CTA
    loads: Counter  #: per warp, per CTA: global loads that move bytes
    epilogue: Counter = field(default_factory=Counter)  #: per warp, per CTA: the part that cannot overlap MMAs
    warp_specialised: bool = False


@dataclass(frozen=True)
class Workload:
    """What the op must do at least: tensor-core FLOPs and compulsory HBM bytes."""

    flops: float
    hbm_bytes: float


def ctas_per_sm(launch: Launch, machine: Machine) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory (1 KiB reserved per
    CTA), warps and the CTA limit."""
    per_warp = math.ceil(launch.registers * WARP_LANES / 256) * 256
    by_registers = machine.registers_per_sm // max(1, per_warp * launch.warps)
    by_shared = machine.shared_per_sm // (launch.shared_bytes + 1024)
    by_warps = machine.max_warps_per_sm // launch.warps
    return max(0, min(by_registers, by_shared, by_warps, machine.max_ctas_per_sm))


@dataclass(frozen=True)
class Budget:
    """The estimate of one launch on one machine (microseconds; ranges low..high over the constants)."""

    tensor_us: tuple[float, float, float]  #: nominal, low, high
    exposed_epilogue_us: tuple[float, float, float]
    issue_us: tuple[float, float, float]
    l2_us: tuple[float, float, float]
    hbm_us: tuple[float, float, float]
    floor_us: float
    ctas_per_sm: int
    mma_flops: float  #: what the MMA instructions compute, padding included
    l2_bytes: float
    issue_slots_per_scheduler: float  #: busiest SM

    def bounds(self, which: int = 0) -> dict[str, float]:
        return {"tensor": self.tensor_us[which] + self.exposed_epilogue_us[which], "issue": self.issue_us[which],
                "l2": self.l2_us[which], "hbm": self.hbm_us[which]}

    @property
    def estimate_us(self) -> float:
        return max(self.bounds(0).values())

    @property
    def estimate_range_us(self) -> tuple[float, float]:
        return max(self.bounds(1).values()), max(self.bounds(2).values())

    @property
    def dominant(self) -> str:
        bounds = self.bounds(0)
        return max(bounds, key=bounds.__getitem__)


def _three(value) -> tuple[float, float, float]:
    """(nominal, optimistic, pessimistic) of ``value(pick)`` where pick chooses each constant's end."""
    return value("nominal"), value("fast"), value("slow")


def _pick(constant: Constant, pick: str, larger_is_faster: bool = True) -> float:
    if pick == "nominal":
        return constant.nominal
    fast = constant.high if larger_is_faster else constant.low
    slow = constant.low if larger_is_faster else constant.high
    return fast if pick == "fast" else slow


def budget(launch: Launch, workload: Workload, machine: Machine) -> Budget:
    """The bounds of ``launch`` for ``workload`` on ``machine`` (module docstring)."""
    warpgroups = max(1, launch.warps // WARPGROUP_WARPS)
    flops_wgmma = flops_sync = 0.0
    for opcode, count in launch.opcodes.items():
        if opcode.split(".", 1)[0] in ("HMMA", "HGMMA"):
            flops, warpgroup = mma_flops(opcode)
            if warpgroup:
                flops_wgmma += count * flops * warpgroups
            else:
                flops_sync += count * flops * launch.warps
    l2_bytes_cta = sum(count * load_bytes_per_lane(op) * WARP_LANES * launch.warps
                       for op, count in launch.loads.items() if op.split(".", 1)[0] in GLOBAL_LOAD_OPCODES)
    resident = ctas_per_sm(launch, machine)
    if resident == 0:
        raise ValueError(f"a CTA of {launch.warps} warps, {launch.registers} registers and {launch.shared_bytes} B "
                         f"of shared memory does not fit an SM of {machine.name}")
    sms = int(machine.sms.nominal)
    busiest = math.ceil(launch.ctas / sms)  # CTAs the busiest SM runs
    instructions = sum(launch.opcodes.values()) * launch.warps
    epilogue = sum(launch.epilogue.values()) * launch.warps
    schedulers = machine.schedulers.nominal
    exposed = resident == 1 and not launch.warp_specialised and (flops_wgmma + flops_sync) > 0

    def tensor(pick: str) -> float:
        rate = _pick(machine.dense_tflops, pick) * 1e12 / sms
        sync_rate = rate * _pick(machine.mma_sync_fraction, pick)
        return busiest * (flops_wgmma / rate + (flops_sync / sync_rate if flops_sync else 0.0)) * 1e6

    def cycles_us(slots: float, pick: str) -> float:
        return busiest * slots / schedulers / (_pick(machine.clock_ghz, pick) * 1e3)

    return Budget(
        tensor_us=_three(tensor),
        exposed_epilogue_us=_three(lambda p: cycles_us(epilogue, p) if exposed else 0.0),
        issue_us=_three(lambda p: cycles_us(instructions, p)),
        l2_us=_three(lambda p: launch.ctas * l2_bytes_cta / (_pick(machine.l2_tbps, p) * 1e12) * 1e6),
        hbm_us=_three(lambda p: workload.hbm_bytes / (_pick(machine.hbm_tbps, p) * 1e12) * 1e6),
        floor_us=max(workload.flops / (machine.dense_tflops.nominal * 1e12),
                     workload.hbm_bytes / (machine.hbm_tbps.nominal * 1e12)) * 1e6,
        ctas_per_sm=resident, mma_flops=launch.ctas * (flops_wgmma + flops_sync), l2_bytes=launch.ctas * l2_bytes_cta,
        issue_slots_per_scheduler=busiest * instructions / schedulers,
    )
