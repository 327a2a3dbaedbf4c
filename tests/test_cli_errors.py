"""Bad settings and damaged inputs at the command line: one line ``error: ...``, exit status 2, no traceback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _cli_helpers import error_line
from pacofr.cli import main
from pacofr.train.config import load_config
from pacofr.train.fields import ConfigError
from pacofr.train.run_folder import SCALARS_FILE

QUICK = ["--set", "train.progress=false", "--set", "train.max_steps=1", "--set", "train.num_viz=2"]


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("content, expected", [
    ("model: [1, 2\ntrain: {}\n", r"is not valid YAML: .* at line 2, column 6"),
    ("train: 5\n", "section 'train' must be a mapping of keys, got 5"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not a UTF-8 text file"),
    ("model: !!python/object/apply:os.system ['echo pwned']\n", "only plain YAML values are allowed"),
    ("", "is empty: expected a mapping with model, data and train sections"),
    ("# nothing but a comment\n", "is empty"),
    ("- model\n- train\n", "expected a mapping with model, data and train sections, got"),
    ("train: {base_lr: .nan}\n", r"train.base_lr: expected a finite number, got nan"),
    ("train: {base_lr: 1.0e-3, min_lr: 1.0e-2}\n", r"min_lr=0.01 must not exceed base_lr=0.001"),
    ("model: {preset: demo, r_mask: .inf}\n", r"model.r_mask: expected a finite number, got inf"),
], ids=["malformed", "section-not-mapping", "binary", "python-tag", "empty", "comment-only", "list",
        "nan-lr", "min-above-base", "inf-model-field"])
def test_a_bad_yaml_file_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      content: str | bytes, expected: str) -> None:
    path = _write(tmp_path / "run.yaml", content)
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "run"), *QUICK]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: config {path}"), line
    assert re.search(expected, line), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [
    ("train.base_lr=inf", "--set train.base_lr=inf: train.base_lr: expected a finite number, got 'inf'"),
    ("train.base_lr=nan", "train.base_lr: expected a finite number, got 'nan'"),
    ("train.clip_grad=nan", "train.clip_grad: expected a finite number, got 'nan'"),
    ("train.weight_decay=-inf", "train.weight_decay: expected a finite number"),
    ("train.betas=[0.9, .nan]", r"train.betas[1]: expected a finite number"),
    ("model.pixel_std=[0.2, inf, 0.2]", r"model.pixel_std[1]: expected a finite number"),
    ("train.min_lr=1", "min_lr=1.0 must not exceed base_lr"),
    ("train.out_dir= ", "out_dir must name a folder, got an empty string"),
])
def test_a_bad_override_is_one_line_naming_the_item_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             override: str, expected: str) -> None:
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path / "run"), *QUICK, "--set", override]) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_non_finite_values_are_refused_for_every_float_field() -> None:
    for key in ("train.base_lr", "train.min_lr", "train.warmup_epochs", "train.clip_grad", "model.tau_b",
                "model.r_mask", "model.teacher_momentum", "model.norm_pix_eps"):
        for value in ("inf", "-inf", "nan", ".inf", ".nan"):
            with pytest.raises(ConfigError, match=f"{key}: expected a finite number"):
                load_config("demo", [f"{key}={value}"])


def test_an_empty_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--config", "demo", "--out", "", *QUICK]) == 2
    assert "--out: expected an output folder, got an empty string" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_torn_index_is_one_line_naming_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    faces = tmp_path / "faces"
    _write(faces / "index.jsonl", '{"source": "a.jpg", "face": 0, "file": "images/a.jpg", "landmarks": '
                                  '[[1, 2], [3, 2], [2, 3], [1, 4], [3, 4]]}\n{"source": "b.jp')
    _write(faces / "recipe.json", "{}")
    assert main(["pretrain", "--config", "demo", "--set", f"data.root={faces}", "--out", str(tmp_path / "run"),
                 *QUICK]) == 2
    line = error_line(capsys)
    assert f"{faces / 'index.jsonl'}: line 2 is not a JSON object" in line and "pacofr prepare" in line


def test_a_batch_larger_than_the_data_set_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path / "run"), *QUICK,
                 "--set", "train.batch_size=500"]) == 2
    assert "too few for one optimiser step of train.batch_size=500" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("override, expected", [
    ("train.device=cuda", "train.device='cuda' but no CUDA device is visible"),
    ("model.backend=cuda", "model.backend='cuda' cannot run on cpu"),
])
def test_an_unavailable_device_or_backend_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      override: str, expected: str) -> None:
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path / "run"), *QUICK, "--set", override]) == 2
    assert expected in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_console_command_prints_one_error_line_for_an_unavailable_triton(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # Triton cannot run CPU tensors then
    done = subprocess.run([sys.executable, "-m", "pacofr", "pretrain", "--config", "demo", "--out",
                           str(tmp_path / "run"), *QUICK, "--set", "model.backend=triton"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: model.backend='triton' cannot run on cpu")


def test_a_locked_run_folder_is_one_line_and_verbose_adds_the_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from pacofr.train.lock import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        assert main(["pretrain", "--config", "demo", "--out", str(out), *QUICK]) == 2
        assert f"in use by another pacofr run: pid {os.getpid()}" in error_line(capsys)
        with caplog.at_level("ERROR", logger="pacofr.cli"):
            assert main(["-v", "pretrain", "--config", "demo", "--out", str(out), *QUICK]) == 2
        assert "Traceback" in caplog.text and "RunFolderLockedError" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [".pacofr-run.lock"]


def _with_default_stop_signals() -> None:
    """Child-process set-up: SIGINT and SIGTERM at their default dispositions, as a foreground command has them.

    A shell that runs a script in the background (``make test &``, ``nohup ... &``, a CI runner's job) starts
    it with SIGINT ignored; the ignore is inherited by pytest and its children, and a run that inherits it
    rightly keeps ignoring Ctrl-C, so it could not be tested.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def _start_long_run(out: Path, *extra: str) -> subprocess.Popen:
    """``pacofr pretrain`` of the demo for 1000 epochs in its own process group, once it has logged a step.

    Logged every step, checkpointed only every 10000 steps: a checkpoint of any other step is the stop's.
    """
    scalars = out / SCALARS_FILE
    process = subprocess.Popen([sys.executable, "-m", "pacofr", "pretrain", "--config", "demo", "--set",
                                "model.preset=tiny", "--set", "train.progress=false", "--set", "train.epochs=1000",
                                "--set", "train.log_every=1", "--set", "train.ckpt_every=10000", *extra,
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_with_default_stop_signals, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not (
            scalars.exists() and len(scalars.read_text().splitlines()) >= 2):  # a header and a step's row
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]
    return process


def _stopped_step(stderr: str, name: str) -> int:
    """The step the one-line stop message names, checked for its form."""
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    found = re.match(rf"error: pacofr pretrain stopped by {name} after step (\d+); checkpoint (\S+) holds it; "
                     r"`pacofr pretrain --resume (\S+)` continues the run$", last)
    assert found, last
    return int(found.group(1))


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C as a terminal sends it, to the whole process group (DataLoader workers included): the step in
    flight finishes, is checkpointed, and the run ends with one line and exit status 130."""
    out = tmp_path / "run"
    process = _start_long_run(out, "--set", "data.num_workers=2")
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    step = _stopped_step(stderr, "SIGINT")
    assert step >= 1 and (out / "checkpoints" / f"step_{step:08d}").exists(), sorted((out / "checkpoints").iterdir())


def test_ctrl_c_elsewhere_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Any command interrupted outside pretrain's step loop (or by a second Ctrl-C): one line, status 130."""
    import pacofr.info

    def interrupted() -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(pacofr.info, "collect_info", interrupted)
    assert main(["info"]) == 130
    assert error_line(capsys).startswith("error: pacofr info interrupted (Ctrl-C); what was finished is kept")


def test_sigterm_stops_with_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    """A scheduler's SIGTERM: exit status 143 after checkpointing the step in flight, and --resume continues
    from exactly that step (no finished step lost)."""
    out = tmp_path / "run"
    process = _start_long_run(out)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    step = _stopped_step(stderr, "SIGTERM")
    assert main(["pretrain", "--resume", str(out), "--set", f"train.max_steps={step + 1}", "--set",
                 "train.progress=false", "--set", "train.num_viz=2"]) == 0
    rows = [line.split(",")[0] for line in (out / SCALARS_FILE).read_text().splitlines()[1:]]
    assert rows == [str(n) for n in range(1, step + 2)]  # every step once: none lost, none repeated


def test_a_near_miss_key_is_suggested_at_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path / "run"), *QUICK,
                 "--set", "train.epoch=2"]) == 2
    assert "did you mean train.epochs?" in error_line(capsys)


@pytest.mark.parametrize("command, expected", [
    (["prepare"], "(default: largest)"),
    (["eval", "linear-probe"], "(default: 100)"),
])
def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str], command: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert expected in " ".join(text.split())  # help lines are wrapped
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text


def test_pretrain_print_config_shows_every_field_with_the_overrides(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`pretrain --help` cannot list config defaults (they live in the presets): --print-config does."""
    import yaml

    from pacofr.train.config import load_config

    assert main(["pretrain", "--config", "demo", "--set", "train.epochs=3", "--out", str(tmp_path / "r"),
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config("demo", ["train.epochs=3", f"train.out_dir={tmp_path / 'r'}"]).to_dict()
    assert printed == expected and printed["train"]["epochs"] == 3
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written
