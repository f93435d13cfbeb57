"""Never lose a run, part two: one process trains into a run directory at a time (a lock a killed process left
behind is taken over), and a damaged checkpoint never stops a resume or an export while an older one is intact."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.cli import main
from fewstep.training.loop import run_dir as rd
from fewstep.training.loop.run_dir import (
    LOCK_FILE,
    RunDirError,
    RunLock,
    claim_run_dir,
    clear_run_dir,
    latest_complete_checkpoint,
    write_checkpoint_manifest,
)
from test_run_safety import new_run

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fewstep.training.loop.run_dir import RunLock

    RunLock(Path(sys.argv[1])).acquire()
    Path(sys.argv[2]).write_text("locked")
    time.sleep(600)
    """
)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of ``tmp_path/run``: (process, run directory)."""
    run, ready = tmp_path / "run", tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(ready)])
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.05)
    yield process, run
    process.kill()
    process.wait()


def write_lock(run: Path, minutes_ago: float = 0, **holder) -> Path:
    """A lock file as another process would have left it, its heartbeat ``minutes_ago``."""
    run.mkdir(parents=True, exist_ok=True)
    info = {"host": "other-node", "pid": 4242, "started": "2026-12-04 12:00:01", "boot": None, "flock": True}
    path = run / LOCK_FILE
    path.write_text(json.dumps({**info, **holder}))
    beat = time.time() - minutes_ago * 60
    os.utime(path, (beat, beat))
    return path


# ------------------------------------------------------------------------------------------ one writer per run
def test_a_live_trainer_refuses_a_second_one_by_pid_and_a_killed_ones_lock_is_taken_over(holder, capsys):
    process, run = holder
    with pytest.raises(RunDirError) as refused:
        RunLock(run).acquire()
    message = one_line_error(refused)
    assert message.startswith(f"--output {run} is being trained by process {process.pid} on host ")
    assert socket.gethostname() in message and "(started 20" in message and message.endswith("stop it first")
    process.kill()  # SIGKILL: no cleanup, the lock file stays
    process.wait()
    assert (run / LOCK_FILE).is_file()
    capsys.readouterr()
    with RunLock(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {process.pid}" in capsys.readouterr().out
    assert not (run / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_taken_over_only_once_its_heartbeat_is_old(tmp_path):
    run = tmp_path / "run"
    write_lock(run, minutes_ago=1)
    with pytest.raises(RunDirError) as refused:
        RunLock(run).acquire()
    message = one_line_error(refused)
    assert "by process 4242 on host other-node (started 2026-12-04 12:00:01, last heartbeat 1 min ago)" in message
    write_lock(run, minutes_ago=rd.HEARTBEAT_TIMEOUT_S / 60 + 1)
    logged = []
    with RunLock(run, log=logged.append):
        assert json.loads((run / LOCK_FILE).read_text())["host"] == socket.gethostname()
    assert logged == [f"fewstep: taking over the lock of process 4242 on host other-node on {run} (no heartbeat for 11 "
                      "minutes)"]  # fmt: skip


def test_a_lock_naming_a_live_pid_on_this_host_is_stale_only_if_its_flock_is_free(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # alive, holds no flock
    try:
        run = tmp_path / "run"
        write_lock(run, host=socket.gethostname(), pid=sleeper.pid, flock=False)  # no flock to tell: trust the pid
        with pytest.raises(RunDirError, match=f"process {sleeper.pid}"):
            RunLock(run).acquire()
        write_lock(run, host=socket.gethostname(), pid=sleeper.pid, flock=True)  # its pid was reused
        logged = []
        RunLock(run, log=logged.append).acquire()
        assert f"pid {sleeper.pid} is now another process" in logged[0]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_file_never_filled_in_is_refused_while_new_and_taken_over_when_old(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("")
    with pytest.raises(RunDirError, match="being claimed by a process that is starting"):
        RunLock(run).acquire()
    os.utime(run / LOCK_FILE, (time.time() - 60, time.time() - 60))
    with RunLock(run, log=lambda line: None):
        pass


def test_the_lock_is_released_on_an_exception_and_held_in_this_process_until_then(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyError):
        with RunLock(run):
            with pytest.raises(RunDirError, match=f"process {os.getpid()}"):
                RunLock(run).acquire()  # the same process, a second time: still one writer
            raise KeyError("boom")
    assert not run.exists()  # the lock made the folder; nothing was written into it, so it is gone too
    with RunLock(run):
        pass


def test_heartbeat_refreshes_the_lock_and_stops_a_run_whose_lock_was_taken_over(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run)
    lock.acquire()
    old = time.time() - 300
    os.utime(run / LOCK_FILE, (old, old))
    lock.heartbeat()
    assert time.time() - (run / LOCK_FILE).stat().st_mtime < 60
    (run / LOCK_FILE).unlink()  # another host judged it stale (this one was suspended) and took it over
    write_lock(run)
    with pytest.raises(RunDirError) as lost:
        lock.heartbeat()
    assert "was taken over by process 4242 on host other-node" in one_line_error(lost)
    lock.release()
    assert json.loads((run / LOCK_FILE).read_text())["host"] == "other-node"  # the new holder's lock stays


def test_a_busy_holder_still_beats_from_its_own_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(rd, "HEARTBEAT_EVERY_S", 0.05)
    run = tmp_path / "run"
    with RunLock(run):
        old = time.time() - 300
        os.utime(run / LOCK_FILE, (old, old))
        deadline = time.monotonic() + 30
        while time.time() - (run / LOCK_FILE).stat().st_mtime > 60:  # the trainer is loading: no heartbeat() call
            assert time.monotonic() < deadline, "the heartbeat thread did not refresh the lock"
            time.sleep(0.05)


def test_a_stale_lock_replaced_by_a_fresh_one_meanwhile_is_not_removed(tmp_path):
    """Two processes judge the same lock stale; the first takes over; the second must not remove the new lock."""
    run = tmp_path / "run"
    path = write_lock(run, minutes_ago=60)
    judged = path.stat()
    path.unlink()
    write_lock(run)  # the first process's new lock
    rd._set_aside(path, judged)  # the second process, acting on what it judged
    assert json.loads(path.read_text())["pid"] == 4242 and list(run.iterdir()) == [path]


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    RunLock(tmp_path, enabled=False).acquire()
    monkeypatch.setenv("RANK", "1")  # torchrun / accelerate launch
    RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_makes_no_run_a_fresh_start_or_overwrite_would_refuse_or_delete(tmp_path):
    run = tmp_path / "run"
    write_lock(run, minutes_ago=60)  # left by a killed start
    (run / f"{LOCK_FILE}.stale-0123").write_text("{}")  # left by a take-over cut short
    assert claim_run_dir(run, resume=False, overwrite=False) is None
    with RunLock(run, log=lambda line: None):
        assert claim_run_dir(run, resume=False, overwrite=False) is None
        (run / "config.yaml").write_text("teacher: t\n")
        clear_run_dir(run)
        assert (run / LOCK_FILE).is_file() and not (run / "config.yaml").exists()


# ------------------------------------------------------------------------------------------ complete checkpoints
def make_checkpoint(run: Path, step: int, manifest: bool = True) -> Path:
    """A small checkpoint laid out as the trainer writes it."""
    path = run / "checkpoints" / f"step-{step:07d}"
    path.mkdir(parents=True)
    save_file({"w": torch.full((64, 8), float(step))}, path / "generator.safetensors")
    save_file({"w": torch.zeros(16, 8)}, path / "fake_score.safetensors")
    torch.save({"loop": {"step": step}, "adam": torch.randn(256)}, path / "training_state.pt")
    (path / "config.yaml").write_text("teacher: t\n")
    (path / "family").write_text("sd15")
    if manifest:
        write_checkpoint_manifest(path)
    return path


def truncate(path: Path, keep: float = 0.0) -> int:
    """Cut ``path`` to ``keep`` of its size, as a kill or power cut mid-write does; return its full size."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return len(data)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "older-fewstep"])
@pytest.mark.parametrize("damaged, keep", [("generator.safetensors", 0.0), ("fake_score.safetensors", 0.5),
                                           ("training_state.pt", 0.5)])  # fmt: skip
def test_a_damaged_newest_checkpoint_is_skipped_by_name(tmp_path, manifest, damaged, keep):
    run = tmp_path / "run"
    older, newest = make_checkpoint(run, 2, manifest), make_checkpoint(run, 4, manifest)
    size = truncate(newest / damaged, keep)
    logged = []
    assert latest_complete_checkpoint(run, log=logged.append) == older
    assert len(logged) == 1 and logged[0].startswith(f"fewstep: checkpoint step-0000004 is incomplete ({damaged} is ")
    assert logged[0].endswith("; using step-0000002")
    if manifest:
        assert f"({damaged} is {int(size * keep)} bytes, expected {size})" in logged[0]
    else:
        assert f"({damaged} is unreadable: " in logged[0] and "and it has no manifest" in logged[0]
    assert claim_run_dir(run, resume=True, overwrite=False) == older


def test_altered_missing_or_unmanifested_files_make_a_checkpoint_incomplete(tmp_path):
    run = tmp_path / "run"
    path = make_checkpoint(run, 2)
    assert rd.checkpoint_problem(path) is None
    data = bytearray((path / "training_state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "training_state.pt").write_bytes(bytes(data))
    assert rd.checkpoint_problem(path) == "training_state.pt differs from what was written (SHA-256)"
    (path / "training_state.pt").unlink()
    assert rd.checkpoint_problem(path) == "training_state.pt is missing"
    (path / rd.MANIFEST).write_text("")  # a power cut while it was written
    assert "manifest" in rd.checkpoint_problem(path) and "unreadable" in rd.checkpoint_problem(path)
    old = make_checkpoint(run, 4, manifest=False)
    assert rd.checkpoint_problem(old) is None  # written before checkpoints had manifests: read, and intact
    (old / "family").unlink()
    assert rd.checkpoint_problem(old) == "family is missing, and it has no manifest (an interrupted write?)"


def test_when_every_checkpoint_is_damaged_resume_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        truncate(make_checkpoint(run, step) / "generator.safetensors")
    with pytest.raises(RunDirError) as refused:
        claim_run_dir(run, resume=True, overwrite=False)
    message = one_line_error(refused)
    assert message.startswith(f"--resume: no checkpoint in {run / 'checkpoints'} is complete (the newest, step-0000004")
    assert "generator.safetensors is 0 bytes" in message and message.endswith("start the run again with --overwrite")
    assert latest_complete_checkpoint(tmp_path / "empty") is None


def test_export_falls_back_past_a_damaged_checkpoint_and_names_a_damaged_one_asked_for(capsys, teacher, prompts,
                                                                                        tmp_path):  # fmt: skip
    run = tmp_path / "run"
    new_run(capsys, teacher, prompts, run, max_steps=4)  # checkpoints at steps 2 and 4
    assert main(["export", str(run), "--checkpoint", "2", "--out", str(tmp_path / "at2")]) == 0
    size = truncate(run / "checkpoints" / "step-0000004" / "generator.safetensors", 0.5)
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "latest")]) == 0
    out = capsys.readouterr().out
    assert "fewstep: checkpoint step-0000004 is incomplete (" in out and "generator.safetensors" in out
    assert out.splitlines()[0].endswith("; using step-0000002")
    at2, latest = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("at2", "latest"))
    assert set(at2) == set(latest) and all(torch.equal(at2[k], latest[k]) for k in at2)
    assert main(["export", str(run), "--checkpoint", "4", "--out", str(tmp_path / "at4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"fewstep export: error: checkpoint {run / 'checkpoints' / 'step-0000004'} is incomplete")
    assert "generator.safetensors" in err and size > 0
