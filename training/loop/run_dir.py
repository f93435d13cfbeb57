"""A run directory belongs to one run: who may write into it, what a resume continues from, missed grids.

A fresh start goes into a new or empty directory (or, with ``--overwrite``, into an old run's directory whose
run files are deleted first); ``--resume`` continues the run whose latest complete checkpoint is there. Nothing
else may mix two runs' checkpoints, LoRA files and config: while a run trains, its process holds the directory's
:class:`RunLock`, and every other start into the directory is refused. A checkpoint is complete when the files its
manifest lists (:func:`write_checkpoint_manifest`) are all there and intact; a resume or an export skips one that
is not (a kill or a power cut mid-write, a full disk) and uses the newest complete one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable

from ..data.cache import MANIFEST, pid_alive, check_entry, write_manifest

try:
    import fcntl
except ImportError:  # Windows: the lock file alone
    fcntl = None

# What a training run writes into its directory (``--overwrite`` deletes these and nothing else). The teacher ODE
# pairs (``pairs/``, DMD and PD) are a cache keyed by the teacher's settings (training/pair_cache.py): a new run
# with the same settings reuses them, one with other settings is refused and names the folder to delete.
RUN_ENTRIES = ("config.yaml", "method", "data_summary.json", "checkpoints", "lora", "samples", "logs")
# Written by every start before any check that may fail (the images of a --dataset) and rewritten by the next: a
# directory that holds only these is one where a start failed, and is free for a new one.
REWRITTEN_BY_EVERY_START = ("dataset_images",)
# The lock of the process training into the directory (and, briefly, a stale one renamed aside while it is taken
# over): never part of a run, so never a reason to call a directory non-empty.
LOCK_FILE = ".fewstep.lock"
# A lock whose holder is on another host is stale once its heartbeat (the lock file's modification time, refreshed
# by RunLock.heartbeat) is this old. The holder must heartbeat more often than this (at every checkpoint, and at
# least every few minutes).
HEARTBEAT_TIMEOUT_S = 600.0
# How often the holder's own thread refreshes it, whatever the trainer is busy with (loading, making pairs).
HEARTBEAT_EVERY_S = 60.0
# A lock file without its JSON (its writer was cut off between creating and filling it, e.g. by a power cut) is
# stale once it is this old; a live writer fills it within microseconds.
UNFILLED_LOCK_TIMEOUT_S = 10.0


class RunDirError(ValueError):
    """The run directory cannot be used as asked: the message names it and the fix."""


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Checkpoints renamed into place, oldest first (a ``.tmp`` directory is a write that never finished).

    One may still be damaged (see :func:`checkpoint_problem`); a resume or an export reads
    :func:`latest_complete_checkpoint`.
    """
    return sorted((run_dir / "checkpoints").glob("step-*[0-9]"))


def grid_path(run_dir: Path, step: int) -> Path:
    return run_dir / "samples" / f"step-{step:07d}.png"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def checkpoint_step(checkpoint: Path) -> int:
    """The iteration a ``checkpoints/step-NNNNNNN`` directory was written at (:func:`checkpoint_path`'s inverse)."""
    return int(checkpoint.name.removeprefix("step-"))


def _is_run(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file() or (run_dir / "checkpoints").is_dir()


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check ``run_dir`` may take this run, before anything loads; return the checkpoint to resume from."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in --output and --overwrite deletes it; give one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--output {run_dir} is a file; give a directory")
    if resume:
        return _resume_point(run_dir)
    if not run_dir.exists() or all(_left_by_a_start(path.name) for path in run_dir.iterdir()):
        return None
    if not _is_run(run_dir):
        raise RunDirError(f"--output {run_dir} is not empty and holds no fewstep run; give a new or empty directory")
    if overwrite:
        return None
    held = ", ".join(name for name in RUN_ENTRIES if (run_dir / name).exists())
    raise RunDirError(
        f"--output {run_dir} already holds a run ({held}); continue it with --resume, or start over with "
        "--overwrite (deletes its checkpoints, samples and LoRA files)"
    )


def _left_by_a_start(name: str) -> bool:
    """Is this entry one that a start writes before its checks, or a lock, so that it makes no run?"""
    return name in REWRITTEN_BY_EVERY_START or name.startswith(LOCK_FILE)


def _resume_point(run_dir: Path) -> Path | None:
    try:
        checkpoint = latest_complete_checkpoint(run_dir)
    except RunDirError as error:
        raise RunDirError(f"--resume: {error}; start the run again with --overwrite") from None
    if checkpoint is not None:
        for leftover in (run_dir / "checkpoints").glob("*.tmp"):  # a checkpoint write cut short by a kill
            shutil.rmtree(leftover, ignore_errors=True)
        return checkpoint
    if (run_dir / "pairs").is_dir():
        return None  # stopped while making the teacher ODE pairs: start at step 0 and keep the pairs made so far
    if _is_run(run_dir):
        raise RunDirError(
            f"--resume: the run in {run_dir} stopped before its first checkpoint; start it again with --overwrite"
        )
    raise RunDirError(f"--resume: {run_dir} holds no fewstep run; start a new run without --resume")


def clear_run_dir(run_dir: Path) -> None:
    """``--overwrite``: delete the old run's files (called once the new run's inputs have all been checked)."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def validation_missed(run_dir: Path, step: int, validate_every: int) -> bool:
    """Is the grid of ``step`` due but absent (step 0 of a new run, or a kill between checkpoint and grid)?"""
    return bool(validate_every) and step % validate_every == 0 and not grid_path(run_dir, step).is_file()


# ------------------------------------------------------------------------------------------ complete checkpoints
def write_checkpoint_manifest(checkpoint_dir: Path) -> None:
    """Record every file's size and SHA-256 in the checkpoint: the last write, before the directory is renamed.

    The files are flushed to disk first, so that a power cut after the rename cannot leave a checkpoint whose
    manifest is there but whose files are empty.
    """
    write_manifest(Path(checkpoint_dir), durable=True)


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """None if the checkpoint can be resumed and exported from, else a short reason naming the bad file.

    Checkpoints of fewstep versions before the manifest have none: they are read as far as is cheap instead.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if (checkpoint_dir / MANIFEST).is_file():
        return check_entry(checkpoint_dir)
    problem = _structure_problem(checkpoint_dir)
    return f"{problem}, and it has no manifest (an interrupted write?)" if problem else None


def _structure_problem(checkpoint_dir: Path) -> str | None:
    """What is missing or unreadable in a checkpoint without a manifest: every file a resume and an export read, each
    ``.safetensors`` header (which safetensors checks against the file's size) and training_state.pt's zip CRCs."""
    from safetensors import safe_open

    from .networks import GENERATOR

    for name in ("config.yaml", "family", "training_state.pt", f"{GENERATOR}.safetensors"):
        if not (checkpoint_dir / name).is_file():
            return f"{name} is missing"
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # SafetensorError, which safetensors does not export
            return f"{path.name} is unreadable: {' '.join(str(error).split())}"
    try:
        with zipfile.ZipFile(checkpoint_dir / "training_state.pt") as archive:  # torch.save writes a zip
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"training_state.pt is unreadable: {error}"
    return f"training_state.pt is damaged: its {damaged} fails its CRC" if damaged else None


def latest_complete_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint (None if there is none at all), logging each newer one it skips and why.

    A damaged newest checkpoint (a kill or power cut mid-write, a full disk) must not stop a resume or an export
    while an older one is intact; only a run whose every checkpoint is damaged is refused.
    """
    skipped = []
    for checkpoint in reversed(checkpoints_of(Path(run_dir))):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            for name, why in skipped:
                log(f"fewstep: checkpoint {name} is incomplete ({why}); using {checkpoint.name}")
            return checkpoint
        skipped.append((checkpoint.name, problem))
    if skipped:
        newest, why = skipped[0]
        raise RunDirError(
            f"no checkpoint in {Path(run_dir) / 'checkpoints'} is complete (the newest, {newest}: {why})"
        )
    return None


# ------------------------------------------------------------------------------------------ one writer at a time
class RunLock:
    """The lock of the one process training into ``run_dir``: ``with RunLock(run_dir): ...``.

    It is the file ``run_dir/.fewstep.lock``, made with an exclusive create (which NFS and Lustre honour too) and
    holding who made it (JSON: host, pid, started, boot id, whether ``flock`` took). While it is held, the file is
    also ``flock``-ed where the file system allows it: a fast check on one host that also sees through a reused
    pid. The heartbeat is the file's modification time: a thread of the holder refreshes it every
    ``HEARTBEAT_EVERY_S`` while the process lives, and :meth:`heartbeat` (called at every checkpoint) refreshes it
    too and checks that the lock is still this process's.

    A lock left behind by a process that is gone (SIGKILL, a power cut) is taken over. Stale means: on this host,
    the holder's pid is not running, or the machine has rebooted since, or its ``flock`` is free; on another host,
    no ``flock`` is held and the heartbeat is older than ``HEARTBEAT_TIMEOUT_S``. This assumes the hosts' clocks
    (and the file server's, which stamps the time) roughly agree; on one host nothing is assumed. A stale lock is
    renamed aside to a unique name before the new one is created, so two processes taking it over at once cannot
    both win.

    ``enabled=False`` makes every method a no-op: of the processes of one run (torchrun, accelerate launch) only
    the main one takes the lock; the default, None, is "only where the launcher's RANK is 0 or unset".
    """

    def __init__(self, run_dir: Path, enabled: bool | None = None, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.enabled = os.environ.get("RANK", "0") == "0" if enabled is None else enabled
        self.log = log
        self._fd: int | None = None
        self._made_dir = False
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise RunDirError naming the process that holds it."""
        if not self.enabled or self._fd is not None:
            return
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"--output {self.run_dir} is a file; give a directory")
        self._made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # each round either takes the lock, refuses, or clears a stale or vanished one
            if self._create():
                return
            found = _read_lock(self.path)
            if found is None:
                continue  # released between our create and our read
            holder, stat = found
            stale = _stale_reason(self.path, holder, stat)
            if stale is None:
                raise RunDirError(_held_message(self.run_dir, holder, stat))
            self.log(f"fewstep: taking over the lock of {_who(holder)} on {self.run_dir} ({stale})")
            _set_aside(self.path, stat)
        raise RunDirError(f"--output {self.run_dir}: other processes keep taking its lock {self.path}; try again")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        flocked = _flock(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "boot": _boot_id(),
                "flock": flocked}  # fmt: skip
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        _HELD.add(str(self.path.resolve()))
        self._stop.clear()
        self._beater = threading.Thread(target=self._beat_until_released, name="fewstep-run-lock", daemon=True)
        self._beater.start()
        return True

    def _beat_until_released(self) -> None:
        """The heartbeat thread: a process busy for long (loading a teacher, making pairs) still looks alive."""
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            with contextlib.suppress(OSError):  # a passing network error; the next beat retries
                if self._still_ours():
                    self._touch()

    def _touch(self) -> None:
        os.utime(self._fd if os.utime in os.supports_fd else self.path)

    def heartbeat(self) -> None:
        """Tell other hosts the run is alive; raise RunDirError if another process has taken the lock meanwhile.

        That can only happen after this process stalled for longer than ``HEARTBEAT_TIMEOUT_S`` (a suspended
        machine, a cut network): the run must then stop rather than write beside the new holder.
        """
        if self._fd is None:
            return
        if not self._still_ours():
            found = _read_lock(self.path)
            holder = f" by {_who(found[0])}" if found and found[0] else ""
            raise RunDirError(f"the lock on --output {self.run_dir} was taken over{holder}; stopping this run here")
        self._touch()

    def release(self) -> None:
        """Give the lock up (at the end, and on an exception); remove the directory if we made it and it is empty."""
        if self._fd is None:
            return
        self._stop.set()
        self._beater.join()
        if self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        _HELD.discard(str(self.path.resolve()))
        os.close(self._fd)  # also drops the flock
        self._fd = None
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # a start that failed before writing anything leaves no folder behind

    def _still_ours(self) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        ours = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)


# Lock files held by this process: a lock naming our own pid is stale unless it is one of these (after a restart a
# container may give its process the pid its killed predecessor had).
_HELD: set[str] = set()


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _boot_id() -> str | None:
    """This boot of this machine (Linux): a pid from an earlier boot is no process at all."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True if taken, False if another holds it, None where unsupported."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, ENOSYS: a file system without locks
        return None
    return True


def _flock_held(path: Path) -> bool | None:
    """Does a live process hold the lock file's flock? None where we cannot tell."""
    try:
        fd = os.open(path, os.O_RDWR)  # NFS emulates flock with write locks, which need a writable handle
    except OSError:
        return None
    try:
        taken = _flock(fd)
    finally:
        os.close(fd)  # drops the flock if we took it
    return None if taken is None else not taken


def _read_lock(path: Path) -> tuple[dict | None, os.stat_result] | None:
    """The holder's JSON (None if it is not written yet or unreadable) and the file's stat; None if it is gone."""
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            text = handle.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        holder = None
    return (holder if isinstance(holder, dict) else None), stat


def _stale_reason(path: Path, holder: dict | None, stat: os.stat_result) -> str | None:
    """Why the lock file's holder is gone, or None if it may be alive (see :class:`RunLock`)."""
    age = time.time() - stat.st_mtime
    if holder is None:
        fresh = age < UNFILLED_LOCK_TIMEOUT_S or _flock_held(path)
        return None if fresh else "its lock file was never filled in"
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
            return "this machine has restarted since"
        if pid == os.getpid():
            return None if str(path.resolve()) in _HELD else "its pid is now this process's"
        if not isinstance(pid, int) or not 0 < pid < 2**31 or not pid_alive(pid):  # os.kill(0) is our group
            return "that process is not running"
        if holder.get("flock") and _flock_held(path) is False:
            return f"pid {pid} is now another process"
        return None
    if _flock_held(path) or age < HEARTBEAT_TIMEOUT_S:
        return None
    return f"no heartbeat for {age / 60:.0f} minutes"


def _set_aside(path: Path, stale: os.stat_result) -> None:
    """Rename the stale lock file to a unique name, so that only one process can clear it; delete it then.

    If another process took the lock over between our read and our rename, what we renamed is its fresh lock
    (another file, or the same one with a newer heartbeat): put it back, and the next round reads it.
    """
    aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process cleared it first
    moved = os.stat(aside)
    if (moved.st_dev, moved.st_ino, moved.st_mtime_ns) == (stale.st_dev, stale.st_ino, stale.st_mtime_ns):
        aside.unlink()
        return
    try:
        os.link(aside, path)  # never replaces a lock made meanwhile
    except FileExistsError:
        pass  # its holder sees the loss at its next heartbeat
    except OSError:  # no hard links on this file system
        if not path.exists():
            os.rename(aside, path)
    with contextlib.suppress(FileNotFoundError):
        aside.unlink()


def _who(holder: dict | None) -> str:
    if holder is None:
        return "a process that is starting"
    return f"process {holder.get('pid')} on host {holder.get('host')}"


def _held_message(run_dir: Path, holder: dict | None, stat: os.stat_result) -> str:
    """The one-line refusal: who trains into ``run_dir``, since when, and what to do."""
    if holder is None:
        return f"--output {run_dir} is being claimed by a process that is starting; wait for it, or stop it first"
    started = f"started {holder.get('started')}"
    if holder.get("host") != socket.gethostname():
        started += f", last heartbeat {(time.time() - stat.st_mtime) / 60:.0f} min ago"
    return f"--output {run_dir} is being trained by {_who(holder)} ({started}); wait for it, or stop it first"


def read_checkpoint_file(path: Path, reader):
    """``reader(path)`` for a file of a run (a checkpoint's adapters, state, options): a file that cannot be read
    (an I/O error, damage its manifest could not see) is one line naming it, a read error, never reported as a
    failed write of the run. ``ValueError``s of the reader (load_yaml's, which name the file) pass as they are."""
    try:
        return reader(path)
    except ValueError:
        raise
    except Exception as error:  # OSError, safetensors' SafetensorError, torch's RuntimeError / UnpicklingError
        detail = " ".join(str(error).split()) or type(error).__name__
        raise RunDirError(f"cannot read {path}: {detail}; move this checkpoint aside to use an older one") from None
