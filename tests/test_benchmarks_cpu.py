"""The benchmark suite without a GPU: the cpu-smoke tier, the no-GPU refusal, the report and plots.

The cpu-smoke tier runs every family on tiny CPU shapes (triton through the interpreter that
conftest.py switches on) and must write JSON that says it holds no performance numbers; a wrong
implementation must fail its family's correctness gate; ``python -m benchmarks.run`` must refuse
the GPU tiers without a GPU; the report must tabulate GPU-tier JSON (fabricated here, in a temporary
folder) and never cpu-smoke JSON, and must refuse a README without its markers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import (bench_nearest_token, bench_patches, bench_soft_assign, bench_train_step, peers,  # noqa: E402
                        plots, report, result_files, row_log, run)
from benchmarks.harness import SMOKE_TIER, Bench  # noqa: E402
from pacofr.ops._dispatch import backend_status  # noqa: E402

README = "# project\n\nintro\n\n## Performance\n\n{start}\nstale text\n{end}\n\nafter\n"
ENV_KEYS = ("device", "driver", "torch", "cuda", "triton", "pacofr", "python", "date", "git_commit")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cpu-smoke run of every family (about half a minute)."""
    out = tmp_path_factory.mktemp("smoke")
    assert run.main(["--cpu-smoke", "--out", str(out)]) == 0
    return out


def _load(folder: Path, family: str) -> dict[str, Any]:
    return json.loads((folder / f"{family}.json").read_text())


@pytest.mark.parametrize("family", run.FAMILIES)
def test_cpu_smoke_writes_marked_json_with_metadata(smoke_dir: Path, family: str) -> None:
    data = _load(smoke_dir, family)
    assert data["family"] == family and data["tier"] == SMOKE_TIER and data["status"] == "ok"
    assert data["performance"] is False and "NOT performance numbers" in data["note"]
    assert data["ceilings"] is None
    env = data["environment"]
    assert set(ENV_KEYS) <= set(env)
    assert env["device"].startswith("cpu") and env["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*", env["date"])
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    assert data["shapes"] and all(isinstance(shape, dict) for shape in data["shapes"])
    assert data["rows"]
    for row in data["rows"]:
        assert row["checked"] is True and row["shape"] in data["shapes"]
        assert row["median_ms"] is None and row["pct_of_floor"] is None  # no numbers from a CPU
    impls = {row["impl"] for row in data["rows"]}
    assert impls & {"reference", "torch"}
    if backend_status("triton", torch.device("cpu"))[0]:
        assert "triton" in impls, "the triton interpreter is on, so the triton path must have run"
    if family != "train_step":  # the kernel families try the cuda backend and say why it cannot run
        assert any(entry["impl"] == "cuda" and entry["reason"] for entry in data["skipped"])


def test_cpu_smoke_runs_the_compiled_and_eager_baselines(smoke_dir: Path) -> None:
    impls = {(row["family"], row["impl"]) for family in run.FAMILIES for row in _load(smoke_dir, family)["rows"]}
    assert {("nearest_token", "dense_compiled"), ("soft_assign", "reference_compiled"), ("soft_assign", "dense"),
            ("soft_assign", "onehot"), ("patches", "mae_compiled")} <= impls
    steps = {row["shape"]["step"] for row in _load(smoke_dir, "train_step")["rows"]}
    assert steps == {"paco_incubation", "paco_end_to_end", "mae", "mcf", "fra"}


def test_a_wrong_implementation_fails_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = bench_nearest_token.dense_lookup

    def off_by_one(x: torch.Tensor, codebook: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        dist, index = original(x, codebook, k)
        return dist, (index + 1) % codebook.shape[0]

    monkeypatch.setattr(bench_nearest_token, "dense_lookup", off_by_one)
    assert run.main(["--cpu-smoke", "--only", "nearest_token", "--no-compile", "--out", str(tmp_path)]) == 1
    data = _load(tmp_path, "nearest_token")
    assert data["status"] == "failed" and "dense disagrees with the reference" in data["error"]
    assert not any(row["impl"] == "dense" for row in data["rows"])


def test_a_wrong_soft_token_fails_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = bench_soft_assign.dense_soft_assign

    def scaled(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        token, indices, weights = original(*args)
        return token * 1.1, indices, weights

    monkeypatch.setattr(bench_soft_assign, "dense_soft_assign", scaled)
    monkeypatch.setattr(bench_soft_assign, "shapes", lambda tier: iter([bench_soft_assign.Shape(40, 9, 8, 2, "fp32")]))
    monkeypatch.setattr(bench_soft_assign, "stats_shapes", lambda tier: iter([]))
    assert run.main(["--cpu-smoke", "--only", "soft_assign", "--no-compile", "--out", str(tmp_path)]) == 1
    data = _load(tmp_path, "soft_assign")
    assert data["status"] == "failed" and "dense: token differs from the reference math" in data["error"]
    assert data["rows"] == []


def test_select_puts_the_headline_first_and_compiles_it_only() -> None:
    shapes = ["head", "b", "c"]
    picked = {selection: list(Bench(torch.device("cpu"), None, smoke=True, selection=selection).select(shapes))
              for selection in ("all", "headline", "rest")}
    assert picked == {"all": [("head", True), ("b", False), ("c", False)], "headline": [("head", True)],
                      "rest": [("b", False), ("c", False)]}
    policies = {policy: [Bench(torch.device("cpu"), None, compile_policy=policy).should_compile(headline)
                         for headline in (True, False)] for policy in ("headline", "all", "none")}
    assert policies == {"headline": [True, False], "all": [True, True], "none": [False, False]}
    with pytest.raises(ValueError, match="selection"):
        Bench(torch.device("cpu"), None, selection="first")
    for family in (bench_nearest_token, bench_soft_assign, bench_patches, bench_train_step):  # headline first
        for tier in ("quick", "full"):
            listed = list(family.shapes(tier))
            assert listed[0] == family.HEADLINE and listed.count(family.HEADLINE) == 1


def test_rows_reach_the_row_log_as_they_are_measured(tmp_path: Path) -> None:
    """A run killed after two rows (no end record) still leaves them in its JSON, marked incomplete."""
    bench = Bench(torch.device("cpu"), None, smoke=True)
    log = bench.open(tmp_path, "nearest_token", SMOKE_TIER)
    for impl in ("reference", "triton"):
        bench.record(family="nearest_token", impl=impl, shape={"n": 3}, fn=lambda: None, floor_ms=None, checked=True)
        assert [r["impl"] for r in row_log.read_records(log) if r["record"] == "row"][-1] == impl
    bench.skip("nearest_token", "cuda", "no GPU")
    with open(log, "a") as out:  # the kill came in the middle of writing a third row
        out.write('{"record": "row", "impl": "cu')
    data = json.loads(row_log.write_payload(log).read_text())
    assert data["status"] == "incomplete" and "2 finished rows kept" in data["error"]
    assert [row["impl"] for row in data["rows"]] == ["reference", "triton"]
    assert data["skipped"] == [{"family": "nearest_token", "impl": "cuda", "reason": "no GPU"}]
    log.with_suffix(".json").unlink()  # the report reads the JSONL when no JSON was written
    assert [data["family"] for _, data in result_files.load_payloads(tmp_path)] == ["nearest_token"]


def test_headline_then_rest_runs_share_the_family_files(tmp_path: Path) -> None:
    base = ["--cpu-smoke", "--only", "nearest_token", "--out", str(tmp_path)]
    assert run.main([*base, "--shapes", "headline"]) == 0
    assert run.main([*base, "--shapes", "rest", "--append"]) == 0
    data = _load(tmp_path, "nearest_token")
    smoke_shapes = [asdict(shape) for shape in bench_nearest_token.shapes(SMOKE_TIER)]
    assert data["status"] == "ok" and [r["selection"] for r in data["runs"]] == ["headline", "rest"]
    assert data["shapes"] == smoke_shapes  # the headline first, each shape once
    compiled = {json.dumps(row["shape"]) for row in data["rows"] if row["impl"] == "dense_compiled"}
    assert compiled == {json.dumps(smoke_shapes[0])}  # torch.compile for the headline shape only
    assert sum(1 for row in data["rows"] if row["impl"] == "reference") == len(smoke_shapes)


def test_an_interrupted_family_keeps_its_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = bench_nearest_token.bench_shape
    calls = []

    def interrupted_second(*args: Any) -> None:
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(*args)

    monkeypatch.setattr(bench_nearest_token, "bench_shape", interrupted_second)
    assert run.main(["--cpu-smoke", "--only", "nearest_token", "--no-compile", "--out", str(tmp_path)]) == 130
    data = _load(tmp_path, "nearest_token")
    assert data["status"] == "interrupted" and data["rows"]
    assert {json.dumps(row["shape"]) for row in data["rows"]} == {json.dumps(asdict(calls[0]))}


def test_a_peer_that_fails_to_run_is_a_skipped_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str) -> Any:
        raise RuntimeError("JIT failed")

    monkeypatch.setattr(bench_nearest_token, "NEAREST_TOKEN_PEERS", (peers.Peer("broken", "torch", broken),))
    base = ["--cpu-smoke", "--only", "nearest_token", "--shapes", "headline", "--no-compile"]
    assert run.main([*base, "--out", str(tmp_path / "with")]) == 0
    data = _load(tmp_path / "with", "nearest_token")
    assert data["status"] == "ok" and {"reference", "dense"} <= {row["impl"] for row in data["rows"]}
    assert {"family": "nearest_token", "impl": "broken", "reason": "failed to run here: RuntimeError: JIT failed"} \
        in data["skipped"]
    assert run.main([*base, "--no-peers", "--out", str(tmp_path / "without")]) == 0
    assert not any(entry["impl"] == "broken" for entry in _load(tmp_path / "without", "nearest_token")["skipped"])


def test_train_step_gate_rejects_a_different_loss() -> None:
    shape = bench_train_step.Shape("tiny", 32, 2, "mae")
    want = {"loss": 1.0, "rec": 1.0}
    assert bench_train_step.check_losses("auto", shape, {"loss": 1.001, "rec": 1.0}, want) == pytest.approx(1e-3)
    for got in ({"loss": 1.2, "rec": 1.0}, {"loss": float("nan"), "rec": 1.0}, {"loss": 1.0}):
        with pytest.raises(AssertionError, match="auto"):
            bench_train_step.check_losses("auto", shape, got, want)


def test_train_step_gate_rejects_a_different_gradient() -> None:
    shape = bench_train_step.Shape("tiny", 32, 2, "mae")
    want = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert bench_train_step.check_gradients("auto", shape, want * 1.01, want) == pytest.approx(1.0)
    wrong = want.clone()
    wrong[:500] = 0  # half of the model without gradient
    for got in (wrong, want * 1.2, want.flip(0), torch.full_like(want, float("nan"))):
        with pytest.raises(AssertionError, match="auto backend: gradient"):
            bench_train_step.check_gradients("auto", shape, got, want)


def test_gpu_tiers_refuse_to_run_without_a_gpu(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
                            check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device is visible" in result.stderr and "--cpu-smoke" in result.stderr
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# report and plots on GPU-tier JSON fabricated in a temporary folder
# ----------------------------------------------------------------------------------------------

def _fabricate_gpu_run(folder: Path) -> None:
    """Two families of a made-up GPU run, written by the real writer (a test fixture, not results)."""
    bench = Bench(device=torch.device("cpu"), ceilings={"bf16_gemm_tflops": 700.0, "copy_tb_s": 3.0})
    shape = {"n": 50176, "codes": 8192, "dim": 256, "k": 1, "dtype": "bf16", "metric": "l2", "tf32": False}
    for impl, ms in (("reference", 6.0), ("dense", 3.0), ("triton", 0.6)):
        bench.add_row({"family": "nearest_token", "impl": impl, "shape": shape, "checked": True, "median_ms": ms,
                       "p20_ms": ms, "p80_ms": ms, "peak_extra_mib": 1.0, "floor_ms": 0.3,
                       "pct_of_floor": 100 * 0.3 / ms})
    bench.write(folder, "nearest_token", "quick")
    bench.reset()  # rows were held in memory and written at the end (no open family log)
    step = {"preset": "vit_base", "img_size": 224, "batch": 256, "step": "mae", "precision": "bf16"}
    for impl, ms in (("torch", 200.0), ("auto", 160.0)):
        bench.add_row({"family": "train_step", "impl": impl, "shape": step, "checked": True, "median_ms": ms,
                       "images_per_s": 256 / ms * 1e3, "peak_mib": 20480.0, "mfu_pct": 40.0})
    bench.write(folder, "train_step", "quick")


def _readme(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "README.md"
    path.write_text(text)
    return path


def test_report_tabulates_gpu_json_and_checks_the_readme(tmp_path: Path, smoke_dir: Path) -> None:
    results = tmp_path / "results"
    _fabricate_gpu_run(results / "gpu-run")
    for path in smoke_dir.glob("*.json"):  # cpu-smoke files next to it must be ignored
        (results / "smoke").mkdir(parents=True, exist_ok=True)
        (results / "smoke" / path.name).write_text(path.read_text())
    readme = _readme(tmp_path, README.format(start=report.START, end=report.END))
    args = ["--results", str(results), "--readme", str(readme)]
    assert report.main([*args, "--check"]) == 1  # stale text between the markers
    assert report.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# project\n") and text.endswith("\nafter\n") and "stale text" not in text
    assert "| N=50176 K=8192 D=256 k=1 bf16 l2 | 6.000 (0.50x) | 3.000 | 0.600 (5.00x) | 50% |" in text
    assert "| vit_base | mae | 256 | 1280 | 1600 | 1.25x | 20.0 / 20.0 | 40% / 40% |" in text
    assert "bf16 GEMM 700 TFLOP/s, copy 3.00 TB/s" in text
    assert "cpu-smoke" not in text and "No GPU results" not in text
    assert report.main([*args, "--check"]) == 0


def test_report_says_no_gpu_results_for_cpu_smoke_only(tmp_path: Path, smoke_dir: Path) -> None:
    readme = _readme(tmp_path, README.format(start=report.START, end=report.END))
    assert report.main(["--results", str(smoke_dir), "--readme", str(readme)]) == 0
    section = readme.read_text().split(report.START)[1].split(report.END)[0]
    assert "No GPU results committed yet" in section
    assert "|" not in section  # no table of any kind
    assert f"{len(run.FAMILIES)} cpu-smoke file(s) found" in section


@pytest.mark.parametrize("text", [README.format(start="", end=""), README.format(start=report.START, end=""),
                                  README.format(start=report.END, end=report.START)])
def test_report_refuses_a_readme_without_markers(tmp_path: Path, text: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    readme = _readme(tmp_path, text)
    assert report.main(["--results", str(tmp_path / "none"), "--readme", str(readme)]) == 2
    assert "<!-- benchmarks:start -->" in capsys.readouterr().err
    assert readme.read_text() == text


def test_plots_draw_gpu_json_and_skip_cpu_smoke(tmp_path: Path, smoke_dir: Path) -> None:
    _fabricate_gpu_run(tmp_path / "gpu-run")
    written = plots.plot_run(tmp_path / "gpu-run", tmp_path / "png")
    assert sorted(path.name for path in written) == ["nearest_token_floor.png", "nearest_token_speedup.png",
                                                     "train_step_speedup.png"]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)
    assert plots.main([str(smoke_dir), "--out", str(tmp_path / "smoke_png")]) == 1
    assert not list((tmp_path / "smoke_png").iterdir())
