"""Build the wheel, install it alone in a fresh virtualenv and run what the README promises from there.

    python .ci/wheel_check.py --python .venv/bin/python --out build/wheel-check [--with-cuda]

What it checks, in order (each step timed; the first failure stops the check, since every later step
uses what the earlier ones made):

1. ``pip wheel`` builds the pure-Python wheel (``PACOFR_BUILD_CUDA=0``);
2. the wheel holds every module of the source tree (``pacofr/**/*.py``, ``kernels/*.py`` as
   ``pacofr/kernels``), the packaged configs and every demo-face asset, and nothing else of the tree;
3. a fresh virtualenv gets the wheel with its ``test`` extra, resolved by pip like a user's install;
4. from an empty folder, with nothing of the source tree on ``sys.path``: ``pacofr`` imports from the
   virtualenv, ``pacofr info`` says ``_C`` is not built, a few steps of ``pacofr pretrain --config
   demo`` write a checkpoint, a loss curve and a reconstruction picture, ``pacofr export`` writes a
   folder that ``timm.create_model("local-dir:...", pretrained=True)`` loads with the exported
   weights, ``pacofr eval linear-probe --checkpoint random:demo`` scores the offline proxy set, and
   the op tests (a copy of ``tests/``) pass against the installed package;
5. with ``--with-cuda``: the wheel with ``pacofr._C`` is built, holds the extension, replaces the pure
   one in the virtualenv, and ``pacofr info`` reports it built for the expected architectures.

Exit status 0 when every step passed, 1 otherwise; the log of every command is under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the op tests run against the installed wheel (under Triton's interpreter, as in CI)
INSTALLED_OP_TESTS = ("test_dispatch.py", "test_nearest_token.py", "test_soft_assign.py", "test_patches.py",
                      "test_codebook.py", "test_info.py")
DEMO_STEPS = 6


class CheckFailed(Exception):
    """A step of the check failed; the message says which and why."""


def run(command: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``command``, append its output to ``log``, return its stdout; CheckFailed when it fails."""
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=sink, text=True)
        sink.write(done.stdout)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise CheckFailed(f"`{' '.join(command)}` exited {done.returncode}; the end of {log}:\n{tail}")
    return done.stdout


def build_wheel(python: str, out: Path, cuda: bool, log: Path) -> Path:
    """Build one wheel of the source tree into ``out``; its path."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PACOFR_BUILD_CUDA": "1" if cuda else "0"}
    run([python, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps", "-w", str(out)], log, ROOT, env)
    wheels = sorted(out.glob("pacofr-*.whl"))
    if len(wheels) != 1:
        raise CheckFailed(f"expected one pacofr wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def expected_wheel_files() -> set[str]:
    """Paths inside the wheel that the source tree says it must hold."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    expected = set()
    for path in tracked:
        if path.startswith("pacofr/") and (path.endswith(".py") or path.startswith(("pacofr/configs/",
                                                                                     "pacofr/assets/"))):
            expected.add(path)
        elif path.startswith("kernels/") and path.endswith(".py"):
            expected.add("pacofr/" + path)
    return expected


def check_wheel_contents(wheel: Path, cuda: bool) -> str:
    """CheckFailed unless ``wheel`` holds exactly the package files of the tree (plus ``_C`` with cuda)."""
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("pacofr-") or "/" not in n}
    package_files = {n for n in names if n.startswith("pacofr/")}
    extension = {n for n in package_files if re.fullmatch(r"pacofr/_C\..*\.so", n)}
    expected = expected_wheel_files()
    missing = sorted(expected - package_files)
    stray = sorted(package_files - expected - extension)
    problems = []
    if missing:
        problems.append(f"{len(missing)} files of the source tree are not in the wheel: {missing[:20]}")
    if stray:
        problems.append(f"{len(stray)} files in the wheel are not package files of the tree: {stray[:20]}")
    if cuda and not extension:
        problems.append("the wheel built with PACOFR_BUILD_CUDA=1 holds no pacofr/_C*.so")
    if not cuda and extension:
        problems.append(f"the pure-Python wheel holds {sorted(extension)}")
    if problems:
        raise CheckFailed(f"{wheel.name}: " + "; ".join(problems))
    return f"{len(package_files)} package files, as the tree has" + (" (+ _C)" if extension else "")


def user_env(venv: Path) -> dict[str, str]:
    """The environment of a user of ``venv``: its bin first, no PYTHONPATH, Triton interpreted on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["TRITON_INTERPRET"] = "1"
    env["PACOFR_TESTS_INSTALLED"] = str(venv)  # tests/conftest.py refuses a pacofr imported from elsewhere
    return env


def installed_run(venv: Path, work: Path, log: Path, torch_pins: list[str], wheel: Path) -> list[str]:
    """Steps 3-4: the fresh virtualenv and what a user runs from it. Returns one line per step."""
    bin_ = venv / "bin"
    done = []
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], log, ROOT)
    run([str(bin_ / "python"), "-m", "pip", "install", "-q", *torch_pins, f"{wheel}[test]", "triton"], log, ROOT)
    done.append(f"installed {wheel.name}[test] with {' '.join(torch_pins)} into a fresh {venv}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = user_env(venv)
    where = run([str(bin_ / "python"), "-c", "import pacofr, pacofr.kernels, pacofr.train; print(pacofr.__file__)"],
                log, work, env).strip()
    if not Path(where).resolve().is_relative_to(venv.resolve()):
        raise CheckFailed(f"pacofr was imported from {where}, not from the wheel installed in {venv}")
    done.append(f"pacofr imports from {where}")
    info = run([str(bin_ / "pacofr"), "info"], log, work, env)
    if "not built" not in info:
        raise CheckFailed(f"`pacofr info` of the pure-Python wheel should say `_C` is not built:\n{info}")
    done.append("pacofr info: _C not built")
    run([str(bin_ / "pacofr"), "pretrain", "--config", "demo", "--out", "run", "--set", f"train.max_steps={DEMO_STEPS}",
         "--set", "train.ckpt_every=3", "--set", "train.viz_every=3", "--set", "train.log_every=1"], log, work, env)
    checkpoints = sorted(str(p.parent.name) for p in (work / "run").rglob("model.safetensors"))
    pictures = [name for name in ("loss_curve.png", "reconstructions.png") if (work / "run" / name).is_file()]
    if not checkpoints or len(pictures) != 2:
        raise CheckFailed(f"the demo run wrote checkpoints {checkpoints} and pictures {pictures}: expected a "
                          "checkpoint, loss_curve.png and reconstructions.png")
    done.append(f"pretrain --config demo, {DEMO_STEPS} steps: checkpoints {checkpoints}, {', '.join(pictures)}")
    run([str(bin_ / "pacofr"), "export", "--checkpoint", "run", "--out", "export"], log, work, env)
    loaded = run([str(bin_ / "python"), "-c", (
        "import timm, torch, safetensors.torch as st\n"
        "m = timm.create_model('local-dir:export', pretrained=True)\n"
        "w = st.load_file('export/model.safetensors')\n"
        "s = m.state_dict()\n"
        "assert all(torch.equal(s[k], w[k]) for k in w), 'timm did not load the exported weights'\n"
        "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")], log, work, env).strip()
    done.append(f"export + timm.create_model('local-dir:export', pretrained=True): {loaded}")
    run([str(bin_ / "pacofr"), "eval", "linear-probe", "--checkpoint", "random:demo", "--data",
         "proxy:lfw-face-vs-nonface", "--seeds", "1", "--epochs", "20", "--out", "probe"], log, work, env)
    scores = sorted(p.name for p in (work / "probe").glob("*.json"))
    if not scores:
        raise CheckFailed("`pacofr eval linear-probe` wrote no JSON under probe/")
    done.append(f"eval linear-probe random:demo on proxy:lfw-face-vs-nonface: {scores}")
    tests = work / "tests"
    shutil.copytree(ROOT / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n    slow: long-running\n")
    run([str(bin_ / "pytest"), "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
         *(f"tests/{name}" for name in INSTALLED_OP_TESTS)],
        log, work, env)
    done.append(f"op tests against the installed wheel: {', '.join(INSTALLED_OP_TESTS)} passed")
    return done


def cuda_run(python: str, venv: Path, work: Path, out: Path, log: Path, arches: str) -> list[str]:
    """Step 5: the wheel with ``pacofr._C`` replaces the pure one and loads."""
    wheel = build_wheel(python, out / "dist-cuda", cuda=True, log=log)
    lines = [f"built {wheel.name}: {check_wheel_contents(wheel, cuda=True)}"]
    bin_ = venv / "bin"
    run([str(bin_ / "python"), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], log, ROOT)
    report = json.loads(run([str(bin_ / "pacofr"), "info", "--json"], log, work, user_env(venv)))
    ext = report["cuda_extension"]
    expected = sorted(f"sm_{a.replace('.', '').rstrip('a')}" for a in arches.split(";"))
    if not ext["loaded"] or sorted(set(ext["compiled_arches"])) != sorted(set(expected)):
        raise CheckFailed(f"the installed _C wheel: {ext} (expected loaded, built for {expected})")
    lines.append(f"_C wheel installed: pacofr info says built for {', '.join(ext['compiled_arches'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the build environment's python (torch installed)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "wheel-check")
    parser.add_argument("--torch", default="torch==2.14.1 torchvision==0.29.1",
                        help="what the fresh virtualenv installs beside the wheel (space-separated pins)")
    parser.add_argument("--with-cuda", action="store_true", help="also build, install and load the wheel with _C")
    parser.add_argument("--arches", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0;9.0a"))
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "wheel-check.log"
    log.write_text("")
    venv, work = out / "venv", out / "work"
    steps = [
        ("build the pure-Python wheel", lambda: [f"built {build_wheel(args.python, out / 'dist', False, log).name}"]),
        ("check its contents", lambda: [check_wheel_contents(next((out / "dist").glob("*.whl")), cuda=False)]),
        ("install it alone and run the README", lambda: installed_run(venv, work, log, args.torch.split(),
                                                                       next((out / "dist").glob("*.whl")))),
    ]
    if args.with_cuda:
        steps.append(("the wheel with _C", lambda: cuda_run(args.python, venv, work, out, log, args.arches)))
    for name, step in steps:
        start = time.monotonic()
        try:
            lines = step()
        except CheckFailed as err:
            print(f"wheel check FAILED at '{name}' after {time.monotonic() - start:.0f} s: {err}", flush=True)
            return 1
        print(f"[{time.monotonic() - start:5.0f} s] {name}", flush=True)
        for line in lines:
            print(f"          {line}", flush=True)
    print("wheel check passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
