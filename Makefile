# pacofr: the two commands a fresh machine needs (README) and a few helpers.
#   make demo   set up .venv, then pre-train on the embedded real-face demo data (CPU or GPU)
#   make test   set up .venv, then run every stage (all of them even when one fails; a table of
#               outcomes and minutes at the end, build/stages.json): the test suite (Triton kernels
#               via the interpreter on CPU), the static GPU check (every kernel compiled for
#               sm_80/sm_90: spills, shared memory, tensor cores), the same op/model tests and check
#               on the GPU machine's stack, and the wheel check (the wheel installed alone in a fresh
#               virtualenv runs the demo, export, a timm load, a linear probe and the op tests)
#
# .venv gets the pinned torch below, every other package at the version in .ci/constraints-dev.txt
# (what CI last passed with; upgraded on purpose, in a commit of its own). pacofr._C is compiled in
# place (build/temp.*, pacofr/_C*.so) before the editable install, so the wheel check's build of the
# wheel with _C reuses the same objects instead of compiling everything a second time. Where nvcc is on PATH the CUDA extension pacofr._C is built
# too (PACOFR_BUILD_CUDA=1: a failed build is an error) and the tests check that it loads.
# .venv-gpu-stack holds the torch/Triton of the GPU machine (torch 2.11 + Triton 3.6), so an API
# difference fails here rather than in a GPU lease; pacofr._C is not built there.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# torch 2.14.1 is the newest torch the registry serves here; its CUDA 13.0 build also runs on a
# CPU-only machine and lets nvcc compile pacofr._C. torchvision is pinned to match (timm needs it).
TORCH_PINS  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS      ?= test,bench,faces
HAVE_NVCC   := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
BUILD_CUDA  ?= $(if $(filter 1,$(HAVE_NVCC)),1,0)
ARCHES      ?= 8.0;9.0;9.0a
STAMP       := $(VENV)/.pacofr-installed
CONSTRAINTS ?= .ci/constraints-dev.txt
GPU_STACK_CONSTRAINTS ?= .ci/constraints-gpu-stack.txt
WHEEL_OUT   ?= build/wheel-check
# pytest-xdist workers of the test stages (one test file per worker at a time: --dist loadfile)
TEST_WORKERS ?= 2
PYTEST_PAR  := -n $(TEST_WORKERS) --dist loadfile
# the stages of `make test`, in order; each runs even when an earlier one failed
TEST_STAGES ?= venv unit-tests static-check gpu-stack-venv gpu-stack-tests wheel-check
DEMO_OUT    ?= runs/demo
STATIC_OUT  ?= build/static
GPU_STACK_VENV  ?= .venv-gpu-stack
GPU_STACK_PY    := $(GPU_STACK_VENV)/bin/python
# numpy < 2.4: Triton 3.6's interpreter turns 1-element arrays into loop bounds, which numpy 2.4 refuses
# (the GPU machine compiles its kernels and never runs the interpreter)
GPU_STACK_PINS  ?= torch==2.11.0 triton==3.6.0 torchvision==0.26.0 "numpy<2.4"
GPU_STACK_STAMP := $(GPU_STACK_VENV)/.pacofr-installed
# the op and model tests: what the GPU machine's torch and Triton run
GPU_STACK_TESTS ?= tests/test_dispatch.py tests/test_nearest_token.py tests/test_soft_assign.py \
	tests/test_patches.py tests/test_codebook.py tests/test_code_softmax.py tests/test_masking.py \
	tests/test_model_parts.py tests/test_model_paco.py tests/test_model_backends.py tests/test_step_buffers.py \
	tests/test_precision.py

.PHONY: all demo test unit-tests static-check gpu-stack-venv gpu-stack-tests wheel-check venv wheel info clean \
	lease-prepare lease-dry-run

all: test

$(STAMP): setup.py pyproject.toml $(CONSTRAINTS) $(wildcard csrc/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=69" wheel ninja
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(TORCH_PINS)
	$(if $(filter 1,$(BUILD_CUDA)),PACOFR_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(ARCHES)" MAX_JOBS=2 \
		$(PY) setup.py -q build_ext --inplace)
	PACOFR_BUILD_CUDA=0 $(PY) -m pip install -q -c $(CONSTRAINTS) --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $@

venv: $(STAMP)

info: $(STAMP)
	$(PY) -m pacofr info

test:
	@$(PYTHON) .ci/stages.py $(TEST_STAGES)

unit-tests: $(STAMP)
	PACOFR_EXPECT_C=$(BUILD_CUDA) $(PY) -m pytest -q $(PYTEST_PAR) tests

# compiles without a GPU, so Triton's interpreter must be off in this process
static-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m benchmarks.static --check --json $(STATIC_OUT)/static.json \
		--markdown $(STATIC_OUT)/static.md

$(GPU_STACK_STAMP): setup.py pyproject.toml $(GPU_STACK_CONSTRAINTS)
	@test -x $(GPU_STACK_PY) || $(PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_PY) -m pip install -q --upgrade "setuptools>=69" wheel
	$(GPU_STACK_PY) -m pip install -q -c $(GPU_STACK_CONSTRAINTS) $(GPU_STACK_PINS)
	PACOFR_BUILD_CUDA=0 $(GPU_STACK_PY) -m pip install -q -c $(GPU_STACK_CONSTRAINTS) --no-build-isolation \
		-e ".[test]" $(GPU_STACK_PINS)
	@touch $@

gpu-stack-venv: $(GPU_STACK_STAMP)

# the compile check under Triton 3.6 covers what a GPU lease runs: the quick benchmark shapes and
# every preset's training step. Triton 3.6 spills 8-24 B in some exact-fp32 / bf16-cast ranking
# variants off the training path (3.8 spills none): those are warnings there, training-path spills fail
gpu-stack-tests: $(GPU_STACK_STAMP)
	$(GPU_STACK_PY) -m pytest -q -p no:cacheprovider $(PYTEST_PAR) $(GPU_STACK_TESTS)
	env -u TRITON_INTERPRET $(GPU_STACK_PY) -m benchmarks.static --check --no-cuda --tiers quick --spills training \
		--json $(STATIC_OUT)/static-gpu-stack.json --markdown $(STATIC_OUT)/static-gpu-stack.md

# the wheel, installed alone in a fresh virtualenv (under the same constraints), runs what the README
# promises from an empty folder; where nvcc exists the wheel with pacofr._C is built and loaded too
wheel-check: $(STAMP)
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) TORCH_CUDA_ARCH_LIST="$(ARCHES)" MAX_JOBS=2 \
		$(PYTHON) .ci/wheel_check.py --python $(PY) --out $(WHEEL_OUT) --torch "$(TORCH_PINS)" \
		$(if $(filter 1,$(BUILD_CUDA)),--with-cuda)

# before a GPU lease: size check, peer wheels into .whl/, the device run call (docs/gpu-lease.md)
lease-prepare: $(STAMP)
	$(PY) -m benchmarks.lease prepare

# the lease rehearsed here: its exact command with --cpu and a pacofr._C build that fails on purpose
# (tests/test_lease.py runs the same inside unit-tests)
lease-dry-run: $(STAMP)
	$(PY) -m benchmarks.lease dry-run

demo: $(STAMP)
	$(PY) -m pacofr info
	$(PY) -m pacofr pretrain --config demo --out $(DEMO_OUT) --overwrite

# A wheel with pacofr._C for the torch installed in .venv (see README, "Building wheels").
wheel: $(STAMP)
	PACOFR_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(ARCHES)" MAX_JOBS=2 \
		$(PY) -m pip wheel . --no-build-isolation --no-deps -w dist

clean:
	rm -rf $(VENV) $(GPU_STACK_VENV) build dist *.egg-info pacofr/_C*.so
