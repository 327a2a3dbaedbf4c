# pacofr: the two commands a fresh machine needs (README) and a few helpers.
#   make demo   set up .venv, then pre-train on the embedded real-face demo data (CPU or GPU)
#   make test   set up .venv, then run the test suite (Triton kernels via the interpreter on CPU)
#
# .venv gets the pinned torch below. Where nvcc is on PATH the CUDA extension pacofr._C is built
# too (PACOFR_BUILD_CUDA=1: a failed build is an error) and the tests check that it loads.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
# torch 2.14.1 is the newest torch the registry serves here; its CUDA 13.0 build also runs on a
# CPU-only machine and lets nvcc compile pacofr._C. torchvision is pinned to match (timm needs it).
TORCH_PINS  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS      ?= test,bench,faces
HAVE_NVCC   := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
BUILD_CUDA  ?= $(if $(filter 1,$(HAVE_NVCC)),1,0)
ARCHES      ?= 8.0;9.0
STAMP       := $(VENV)/.pacofr-installed
DEMO_OUT    ?= runs/demo

.PHONY: all demo test venv wheel info clean

all: test

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=69" wheel ninja
	$(PY) -m pip install -q $(TORCH_PINS)
	PACOFR_BUILD_CUDA=$(BUILD_CUDA) TORCH_CUDA_ARCH_LIST="$(ARCHES)" MAX_JOBS=2 \
		$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@touch $@

venv: $(STAMP)

info: $(STAMP)
	$(PY) -m pacofr info

test: $(STAMP)
	PACOFR_EXPECT_C=$(BUILD_CUDA) $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m pacofr info
	$(PY) -m pacofr pretrain --config demo --out $(DEMO_OUT) --overwrite

# A wheel with pacofr._C for the torch installed in .venv (see README, "Building wheels").
wheel: $(STAMP)
	PACOFR_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(ARCHES)" MAX_JOBS=2 \
		$(PY) -m pip wheel . --no-build-isolation --no-deps -w dist

clean:
	rm -rf $(VENV) build dist *.egg-info pacofr/_C*.so
