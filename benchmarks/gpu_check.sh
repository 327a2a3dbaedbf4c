#!/usr/bin/env bash
# For someone with an NVIDIA GPU: build pacofr._C in place against the torch installed here, run
# the whole test suite (GPU tests included), the benchmark quick tier of every family (kernels and
# the end-to-end train_step), the pytest-benchmark suites, the plots and the report, writing
# everything under OUT_DIR (default benchmarks/results/<UTC date>-<GPU name>):
#   build.log info.json tests.xml tests.log bench.log <family>.json pytest_benchmark.json
#   pytest_benchmark.log <family>_*.png plots.log report.md
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Needs: python3 with torch (CUDA build), triton, pytest, timm, matplotlib, pytest-benchmark; nvcc; ninja.
# Exit status: the first failing step's (tests, benchmarks, suites, plots, report), else 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
OUT=${1:-benchmarks/results/$(date -u +%Y-%m-%d)-$GPU}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"}
echo "== build pacofr._C for $TORCH_CUDA_ARCH_LIST" | tee "$OUT/build.log"
PACOFR_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee -a "$OUT/build.log"
"$PY" -m pacofr info --json > "$OUT/info.json"
"$PY" -m pacofr info

set +e
echo "== tests (GPU included)"
PACOFR_EXPECT_C=1 PACOFR_EXPECT_ARCHES="sm_${TORCH_CUDA_ARCH_LIST//./}" "$PY" -m pytest -q tests \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
TESTS_RC=${PIPESTATUS[0]}

echo "== benchmarks, quick tier (nearest_token, soft_assign, patches, train_step)"
"$PY" -m benchmarks.run --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}

echo "== pytest-benchmark suites"
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    "$PY" -m pytest -q benchmarks --benchmark-json="$OUT/pytest_benchmark.json" 2>&1 | tee "$OUT/pytest_benchmark.log"
    SUITES_RC=${PIPESTATUS[0]}
else
    echo "pytest-benchmark is not installed (pip install pytest-benchmark): suites not run" | tee "$OUT/pytest_benchmark.log"
    SUITES_RC=1
fi

echo "== plots"
"$PY" -m benchmarks.plots "$OUT" 2>&1 | tee "$OUT/plots.log"
PLOTS_RC=${PIPESTATUS[0]}

echo "== report (this run only; after committing $OUT run python -m benchmarks.report for the README)"
"$PY" -m benchmarks.report --results "$OUT" --markdown "$OUT/report.md" 2>&1
REPORT_RC=$?
set -e

echo "exit codes: tests $TESTS_RC, benchmarks $BENCH_RC, suites $SUITES_RC, plots $PLOTS_RC, report $REPORT_RC"
echo "results in $OUT"
for rc in "$TESTS_RC" "$BENCH_RC" "$SUITES_RC" "$PLOTS_RC" "$REPORT_RC"; do
    if [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
exit 0
