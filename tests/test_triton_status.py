"""The triton backend is unavailable, with the reason, when the package ``pacofr.kernels`` does not import.

``pacofr.kernels`` exists only through the installed package (setup.py maps ``kernels/`` to it). A
failed install, or the source tree on ``sys.path`` without the editable install's import finder,
leaves ``triton`` importable but no kernels: ``backend_status("triton")`` must then say so instead
of sending every triton call into a ModuleNotFoundError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
if sys.argv[1] == "source-tree":  # the issue's reproduction: the source tree without the install's finder
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, sys.argv[2])
import torch
import pacofr
from pacofr.ops._dispatch import backend_status
print(json.dumps({"pacofr": pacofr.__file__, "status": backend_status("triton", torch.device("cpu"))}))
"""


def _probe(mode: str, tmp_path: Path) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(ROOT)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_installed_package_has_its_kernels(tmp_path: Path) -> None:
    """Control: the install this suite runs in imports pacofr.kernels, so triton is available."""
    result = _probe("installed", tmp_path)
    assert result["status"][0] is True, result


def test_a_source_tree_without_kernels_reports_triton_unavailable(tmp_path: Path) -> None:
    result = _probe("source-tree", tmp_path)
    assert Path(result["pacofr"]).resolve().parent == ROOT / "pacofr"  # the scenario really ran from the tree
    ok, why = result["status"]
    assert ok is False
    assert "pacofr.kernels does not import" in why and "pip install -e ." in why
