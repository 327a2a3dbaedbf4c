"""How often each SASS instruction of a kernel runs, read from its control flow: the input of the cost model.

A kernel's SASS listing (``cuobjdump -sass``) is static; a cost per tile needs executed counts. They
are estimated from the listing's structure, with trip counts the caller knows from the launch
geometry:

* a **loop** is the address range from a backward branch's target to the branch;
* the **step loop** is the innermost loop holding tensor-core instructions (one D chunk of one code
  tile), its **tile loop** the enclosing loop that also holds them (one code tile), if any. A kernel
  without tensor-core instructions has no tile loop; its outermost loops are its step loops;
* a **flat** step loop (no tile loop: the CUDA ranking kernel walks (code tile, D chunk) steps in
  one loop) holds its per-tile epilogue as a conditional block: the largest forward-branch region
  of the step loop without tensor-core instructions or barriers runs once per tile, not per step.
  A flat step loop without such a block walks one whole code tile per iteration (the Triton loop
  with a resident query tile: all of D in one step); its epilogue is the code after the last
  tensor-core instruction or warpgroup wait (``WARPGROUP.DEPBAR``), which needs the scores;
* of an if/else (``@P BRA else`` ... ``BRA join``, ``else:`` ...) only the longer arm is counted;
* every other loop (load loops, merges) is counted as one iteration, and every other conditional
  block as taken: an estimate, stated as such wherever it is used;
* a kernel without loops is one tile.

The result is a weighted opcode count per CTA (:class:`FlowCounts`), split into the per-step, the
per-tile and the once-per-CTA parts.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from benchmarks.static.toolchain import MMA_OPCODES

_INSTRUCTION_RE = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_.]+)?)([^;]*);")
_TARGET_RE = re.compile(r"0x([0-9a-f]+)")
BARRIER_OPCODES: tuple[str, ...] = ("BAR",)
MMA_WAIT = "WARPGROUP.DEPBAR"  #: waits for the asynchronous warpgroup MMAs (their results are read after it)


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: byte address, full opcode (with modifiers), guard predicate or '', operands."""

    address: int
    opcode: str
    predicate: str
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def branch_target(self) -> int | None:
        """Target address of a ``BRA`` (None for other instructions or indirect branches)."""
        if self.base != "BRA":
            return None
        found = _TARGET_RE.search(self.operands)
        return int(found.group(1), 16) if found else None

    @property
    def is_mma(self) -> bool:
        return self.base in MMA_OPCODES

    @property
    def is_barrier(self) -> bool:
        return self.base in BARRIER_OPCODES


def parse_instructions(function_text: str) -> list[Instruction]:
    """The instructions of one function's SASS listing, in address order."""
    found = [Instruction(int(a, 16), op, (p or "").strip(), args.strip())
             for a, p, op, args in _INSTRUCTION_RE.findall(function_text)]
    return sorted(found, key=lambda i: i.address)


@dataclass(frozen=True)
class Span:
    """Addresses ``first .. last`` inclusive."""

    first: int
    last: int

    def holds(self, address: int) -> bool:
        return self.first <= address <= self.last

    def inside(self, other: Span) -> bool:
        return other.first <= self.first and self.last <= other.last and self != other


def loops(code: list[Instruction]) -> list[Span]:
    """Every loop: target .. address of each backward branch (merged when two share a range)."""
    return sorted({Span(t, i.address) for i in code if (t := i.branch_target) is not None and t <= i.address},
                  key=lambda s: (s.first, -s.last))


def _count(code: list[Instruction], span: Span, predicate) -> int:
    return sum(1 for i in code if span.holds(i.address) and predicate(i))


def skipped_else_arms(code: list[Instruction]) -> list[Span]:
    """The shorter arm of every if/else: ``@P BRA E`` ... ``BRA J`` (the instruction before E), ``E: ... J``."""
    by_address = {i.address: n for n, i in enumerate(code)}
    arms = []
    for n, branch in enumerate(code):
        target = branch.branch_target
        if not branch.predicate or target is None or target <= branch.address or target not in by_address:
            continue
        last_then = by_address[target] - 1
        jump = code[last_then]
        join = jump.branch_target
        if jump.predicate or join is None or join <= target or join not in by_address:
            continue
        then_arm, else_arm = last_then - n, by_address[join] - by_address[target]
        shorter = Span(code[n + 1].address, jump.address) if then_arm < else_arm else Span(target, code[by_address[join] - 1].address)
        arms.append(shorter)
    return arms


def epilogue_region(code: list[Instruction], step: Span) -> Span | None:
    """The largest forward-branch region of ``step`` without tensor-core instructions or barriers, else the
    code of ``step`` after its last tensor-core instruction or warpgroup wait (None when there is none)."""
    best, best_size = None, 0
    for branch in code:
        target = branch.branch_target
        if not step.holds(branch.address) or target is None or target <= branch.address or not step.holds(target):
            continue
        region = Span(branch.address + 1, target - 1)
        if _count(code, region, lambda i: i.is_mma or i.is_barrier):
            continue
        size = _count(code, region, lambda i: True)
        if size > best_size:
            best, best_size = region, size
    if best is not None:
        return best
    waits = [i.address for i in code if step.holds(i.address) and (i.is_mma or i.opcode.startswith(MMA_WAIT))]
    after = [i.address for i in code if step.holds(i.address) and i.address > max(waits, default=step.last)]
    return Span(after[0], after[-1]) if after else None


@dataclass
class FlowCounts:
    """Estimated executed opcodes of one CTA (per warp), by part: per D step, per code tile, once."""

    step: Counter = field(default_factory=Counter)  #: one iteration of the step loop (epilogue excluded)
    tile: Counter = field(default_factory=Counter)  #: once per tile outside the step loop (the epilogue)
    once: Counter = field(default_factory=Counter)  #: once per CTA (prologue, final merge, stores)
    flat: bool = False  #: the step loop also walks the tiles (no separate tile loop)
    has_step_loop: bool = False

    def per_tile(self, steps_per_tile: int) -> Counter:
        """Opcodes of one code tile: ``steps_per_tile`` steps and the tile part."""
        total = Counter({op: n * steps_per_tile for op, n in self.step.items()})
        total.update(self.tile)
        return total

    def per_cta(self, tiles_per_cta: int, steps_per_tile: int) -> Counter:
        """Opcodes of one CTA: its tiles and the once-per-CTA part."""
        total = Counter({op: n * tiles_per_cta for op, n in self.per_tile(steps_per_tile).items()})
        total.update(self.once)
        return total


def _opcodes(code: list[Instruction], keep) -> Counter:
    counts = Counter()
    for i in code:
        if keep(i):
            counts[i.opcode] += 1
    return counts


def flow_counts(function_text: str) -> FlowCounts:
    """Split one function's instructions into per-step, per-tile and once-per-CTA parts (module docstring)."""
    code = parse_instructions(function_text)
    all_loops = loops(code)
    skipped = skipped_else_arms(code)
    counted = [i for i in code if not any(s.holds(i.address) for s in skipped)]
    mma_loops = [s for s in all_loops if _count(code, s, lambda i: i.is_mma)]
    if mma_loops:
        step = min(mma_loops, key=lambda s: s.last - s.first)
        parents = [s for s in mma_loops if step.inside(s)]
        tile = min(parents, key=lambda s: s.last - s.first) if parents else None
    else:  # no tensor cores: the outermost loops are the steps (one tile per CTA)
        outer = [s for s in all_loops if not any(s.inside(o) for o in all_loops)]
        step = max(outer, key=lambda s: s.last - s.first) if outer else None
        tile = None
    if step is None:  # no loop: the whole kernel is one tile
        return FlowCounts(tile=_opcodes(counted, lambda i: True))
    if tile is None and mma_loops:
        epilogue = epilogue_region(code, step)
        in_epilogue = (lambda i: epilogue is not None and epilogue.holds(i.address))
        return FlowCounts(step=_opcodes(counted, lambda i: step.holds(i.address) and not in_epilogue(i)),
                          tile=_opcodes(counted, in_epilogue),
                          once=_opcodes(counted, lambda i: not step.holds(i.address)), flat=True, has_step_loop=True)
    if tile is None:  # no tensor cores: every outermost loop runs the given step count; the rest is the tile
        outer = [s for s in all_loops if not any(s.inside(o) for o in all_loops)]
        in_outer = (lambda i: any(s.holds(i.address) for s in outer))
        return FlowCounts(step=_opcodes(counted, in_outer), tile=_opcodes(counted, lambda i: not in_outer(i)),
                          has_step_loop=True)
    return FlowCounts(step=_opcodes(counted, lambda i: step.holds(i.address)),
                      tile=_opcodes(counted, lambda i: tile.holds(i.address) and not step.holds(i.address)),
                      once=_opcodes(counted, lambda i: not tile.holds(i.address)), has_step_loop=True)
