"""A run directory has one writer and is self-contained (issue 23), tested with real ``fewstep train`` processes:
a second start or resume while a run trains is refused naming the process, a SIGKILLed run resumes, and a resume
from another directory reads the run's own files (and refuses when they changed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fewstep.cli import main
from fewstep.training.loop.run_dir import LOCK_FILE

TINY = [
    "--gen-rank", "4", "--fake-rank", "4", "--dfake-gen-update-ratio", "2", "--warmup-steps", "1", "--lr", "1e-3",
    "--validate-every", "0",
]  # fmt: skip


def train(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture
def live_run(teacher, prompts, tmp_path):
    """A ``fewstep train`` process training a long run into ``tmp_path/run``, with a checkpoint every iteration."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fewstep.cli", "train", "--teacher", str(teacher), "--prompts", str(prompts),
         "--output", str(run), "--max-steps", "100000", "--checkpoint-every", "1", *TINY],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(lambda: any((run / "checkpoints").glob("step-*[0-9]")) or process.poll() is not None)
    assert process.poll() is None, "the training process ended early"
    yield run, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_start_or_resume_into_a_live_run_is_refused_naming_the_process(capsys, live_run, teacher, prompts):
    run, process = live_run
    for extra in (["--resume"], ["--overwrite", "--teacher", str(teacher), "--prompts", str(prompts)]):
        code, err = train(capsys, "--output", str(run), *extra, *TINY)
        lines = [line for line in err.strip().splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1, err
        assert f"being trained by process {process.pid}" in lines[0]
    assert process.poll() is None and (run / LOCK_FILE).is_file()  # the live run was left alone


def test_a_run_killed_with_sigkill_resumes(capsys, live_run):
    run, process = live_run
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run / LOCK_FILE).is_file()  # left behind by the killed process
    code, err = train(capsys, "--output", str(run), "--resume", "--max-steps", "6")
    assert code == 0, err
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and not (run / LOCK_FILE).exists()


def test_resume_from_another_directory_uses_the_runs_own_files(capsys, teacher, prompts, tmp_path, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    for folder in (start, elsewhere):
        folder.mkdir()
    shutil.copy(prompts, start / "prompts.txt")
    (elsewhere / "prompts.txt").write_text("another user's prompt\n")  # same relative name, other data
    monkeypatch.chdir(start)
    code, err = train(capsys, "--teacher", str(teacher), "--prompts", "prompts.txt", "--output", str(tmp_path / "run"),
                      "--max-steps", "2", "--checkpoint-every", "2", *TINY)  # fmt: skip
    assert code == 0, err
    monkeypatch.chdir(elsewhere)
    code, err = train(capsys, "--output", str(tmp_path / "run"), "--resume", "--max-steps", "4")
    assert code == 0, err
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert str(start / "prompts.txt") in config and str(elsewhere) not in config


def test_resume_refuses_when_the_runs_data_changed(capsys, teacher, prompts, tmp_path):
    data = tmp_path / "prompts.txt"
    shutil.copy(prompts, data)
    run = tmp_path / "run"
    code, err = train(capsys, "--teacher", str(teacher), "--prompts", str(data), "--output", str(run),
                      "--max-steps", "2", "--checkpoint-every", "2", *TINY)  # fmt: skip
    assert code == 0, err
    data.write_text("a different prompt\n")
    code, err = train(capsys, "--output", str(run), "--resume", "--max-steps", "4")
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "the run's data changed since it started" in lines[0], err


@pytest.mark.parametrize("damaged", ["training_state.pt", "generator.safetensors", "fake_score.safetensors"])
def test_resume_falls_back_past_a_truncated_checkpoint_naming_the_file(capsys, teacher, prompts, tmp_path, damaged):
    run = tmp_path / "run"
    code, err = train(capsys, "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run),
                      "--max-steps", "4", "--checkpoint-every", "2", *TINY)  # fmt: skip
    assert code == 0, err
    path = run / "checkpoints" / "step-0000004" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a full disk, a copy cut short
    capsys.readouterr()
    assert main(["train", "--output", str(run), "--resume", "--max-steps", "6"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint step-0000004 is incomplete ({damaged}" in out and "using step-0000002" in out
    assert "resumed from" in out and "step-0000002" in out
