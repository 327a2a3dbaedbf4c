"""Run make targets one after another, every one even when an earlier one fails, and report them all.

    python .ci/stages.py venv unit-tests static-check ...

Each target runs as ``make --no-print-directory TARGET`` with its output streamed as it comes. At the
end a table gives each stage's outcome and wall time, ``build/stages.json`` keeps the same, and the
exit status is 1 when any stage failed (0 otherwise), so ``make test`` shows every failure at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(target: str) -> tuple[int, float]:
    """``(exit status, seconds)`` of ``make TARGET``."""
    print(f"\n=== stage {target} ===", flush=True)
    start = time.monotonic()
    status = subprocess.call([os.environ.get("MAKE", "make"), "--no-print-directory", target], cwd=ROOT)
    return status, time.monotonic() - start


def main(targets: list[str]) -> int:
    if not targets:
        print("error: name at least one make target", file=sys.stderr)
        return 2
    results = []
    for target in targets:
        status, seconds = run_stage(target)
        results.append({"stage": target, "status": status, "passed": status == 0, "seconds": round(seconds, 1)})
    total = sum(r["seconds"] for r in results)
    print("\n=== stages ===", flush=True)
    for r in results:
        outcome = "passed" if r["passed"] else f"FAILED (exit {r['status']})"
        print(f"  {r['stage']:<20} {outcome:<18} {r['seconds'] / 60:6.1f} min", flush=True)
    print(f"  {'total':<20} {'':<18} {total / 60:6.1f} min", flush=True)
    out = ROOT / "build" / "stages.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stages": results, "total_seconds": round(total, 1)}, indent=2) + "\n")
    failed = [r["stage"] for r in results if not r["passed"]]
    if failed:
        print(f"failed stages: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
