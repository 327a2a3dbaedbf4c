#!/usr/bin/env bash
# For someone with an NVIDIA GPU: build pacofr._C in place against the torch installed here, run
# the whole test suite (GPU tests included) and the benchmark quick tier, writing everything under
# OUT_DIR (default benchmarks/results/<UTC date>-<GPU name>).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Needs: python3 with torch (CUDA build), triton, pytest, timm; nvcc; ninja.
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
echo "== tests (GPU included)"
set +e
PACOFR_EXPECT_C=1 PACOFR_EXPECT_ARCHES="sm_${TORCH_CUDA_ARCH_LIST//./}" "$PY" -m pytest -q tests \
    --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
TESTS_RC=${PIPESTATUS[0]}
set -e
echo "== benchmarks, quick tier"
"$PY" -m benchmarks.run --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "tests exit code: $TESTS_RC; results in $OUT"
exit "$TESTS_RC"
