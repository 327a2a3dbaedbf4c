"""Build script: the pure-Python `pacofr` package plus, where CUDA allows, the `pacofr._C` extension.

Environment switches
--------------------
PACOFR_BUILD_CUDA   "auto" (default): build `_C` when torch is a CUDA build and a CUDA toolkit is
                    found; a failed build then warns and installs without `_C`.
                    "1": `_C` is required; anything missing or a failed build is an error.
                    "0": never build `_C`.
TORCH_CUDA_ARCH_LIST  respected as given; defaults to "8.0;9.0;9.0a" (sm_80, sm_90, and sm_90a for the
                    Hopper wgmma ranking kernel).
CUDA_HOME           the toolkit root; found from nvcc (following wrapper scripts) when unset.
MAX_JOBS            parallel compile jobs for ninja (torch's own switch).

torch is imported from the *build* environment, so build with `--no-build-isolation` to compile
against the torch you will run with (see README, "Building wheels").
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0;9.0a"
BUILD_MODES = ("auto", "0", "1")


def _log(msg: str) -> None:
    print(f"[pacofr setup] {msg}", file=sys.stderr)


def _build_mode() -> str:
    mode = os.environ.get("PACOFR_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in BUILD_MODES:
        raise SystemExit(f"PACOFR_BUILD_CUDA must be one of {BUILD_MODES}, got {mode!r}")
    return mode


def _toolkit_root_from_nvcc(nvcc: str) -> Path | None:
    """Resolve the toolkit root of an nvcc on PATH, looking through `exec .../nvcc` wrappers."""
    path = Path(nvcc).resolve()
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if match is None:
            return None
        path = Path(match.group(1).decode()).resolve()
    return path.parent.parent


def _find_cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    candidates = [_toolkit_root_from_nvcc(nvcc)] if nvcc else []
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for root in candidates:
        if root is not None and (root / "bin" / "nvcc").exists() and (root / "include" / "cuda.h").exists():
            return root
    return None


def _pip_cuda_include_dirs() -> list[str]:
    """Header folders of pip's `nvidia-*` wheels (torch's CUDA headers include e.g. cusparse.h,
    which a minimal system toolkit may lack)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    found = []
    for root in sorted(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if glob.glob(os.path.join(inc, "*.h")):
                found.append(inc)
    return found


def _tolerant_build_ext(base: type, required: bool) -> type:
    """torch's BuildExtension, which in "auto" mode warns on a failed build instead of failing."""

    class PacofrBuildExt(base):
        def run(self) -> None:
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - re-raised unless the extension is optional
                if required:
                    raise
                _log(f"WARNING: building pacofr._C failed ({err}); installing without the CUDA "
                     "backend. Set PACOFR_BUILD_CUDA=1 to make this an error.")

    return PacofrBuildExt


def _extension_setup_kwargs() -> dict:
    mode = _build_mode()
    if mode == "0":
        _log("PACOFR_BUILD_CUDA=0: installing without pacofr._C")
        return {}
    required = mode == "1"

    def skip(reason: str) -> dict:
        if required:
            raise SystemExit(f"PACOFR_BUILD_CUDA=1 but {reason}")
        _log(f"not building pacofr._C: {reason} (the torch and triton backends still install)")
        return {}

    try:
        import torch
    except ImportError:
        return skip("torch is not importable in the build environment; install torch first and "
                    "build with `pip install . --no-build-isolation`")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit (nvcc and include/cuda.h) was found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = str(cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c[pu]*")
                     if p.suffix in (".cpp", ".cu"))
    if not sources:
        return skip("csrc/ holds no sources")
    _log(f"building pacofr._C from {len(sources)} sources for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']} with CUDA_HOME={cuda_home}")
    extension = CUDAExtension(
        name="pacofr._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), *_pip_cuda_include_dirs()],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    build_ext = _tolerant_build_ext(BuildExtension.with_options(use_ninja=True), required)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext}}


def _packages() -> list[str]:
    """Every package of the wheel: ``pacofr`` and its subpackages, plus ``kernels/`` as ``pacofr.kernels``.

    ``find_packages`` silently skips a folder without ``__init__.py`` (``pacofr.train`` was once
    left out of every wheel so), so a folder of Python modules that it did not find stops the build.
    """
    packages = find_packages(include=["pacofr", "pacofr.*"])
    found = {ROOT.joinpath(*name.split(".")) for name in packages}
    missed = sorted(str(folder.relative_to(ROOT)) for folder in {p.parent for p in (ROOT / "pacofr").rglob("*.py")}
                    if folder not in found and "__pycache__" not in folder.parts)
    if missed:
        raise SystemExit(f"error: these folders hold Python modules but no __init__.py, so no wheel would "
                         f"contain them: {', '.join(missed)}")
    return [*packages, "pacofr.kernels"]


setup(
    packages=_packages(),
    package_dir={"pacofr": "pacofr", "pacofr.kernels": "kernels"},
    include_package_data=True,
    package_data={"pacofr": ["configs/*.yaml", "assets/**/*"]},
    **_extension_setup_kwargs(),
)
