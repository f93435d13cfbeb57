"""A run directory belongs to one run: who may write into it, what a resume continues from, missed grids.

A fresh start goes into a new or empty directory (or, with ``--overwrite``, into an old run's directory whose
run files are deleted first); ``--resume`` continues the run whose latest checkpoint is there. Nothing else may
mix two runs' checkpoints, LoRA files and config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# What a training run writes into its directory (``--overwrite`` deletes these and nothing else). The teacher ODE
# pairs (``pairs/``, DMD and PD) are a cache keyed by the teacher's settings (training/pair_cache.py): a new run
# with the same settings reuses them, one with other settings is refused and names the folder to delete.
RUN_ENTRIES = ("config.yaml", "method", "checkpoints", "lora", "samples", "logs")
# Written by every start before any check that may fail (the images of a --dataset) and rewritten by the next: a
# directory that holds only these is one where a start failed, and is free for a new one.
REWRITTEN_BY_EVERY_START = ("dataset_images",)


class RunDirError(ValueError):
    """The run directory cannot be used as asked: the message names it and the fix."""


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a ``.tmp`` directory is a write that never finished)."""
    return sorted((run_dir / "checkpoints").glob("step-*[0-9]"))


def grid_path(run_dir: Path, step: int) -> Path:
    return run_dir / "samples" / f"step-{step:07d}.png"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


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
    if not run_dir.exists() or all(path.name in REWRITTEN_BY_EVERY_START for path in run_dir.iterdir()):
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


def _resume_point(run_dir: Path) -> Path:
    checkpoints = checkpoints_of(run_dir)
    if checkpoints:
        for leftover in (run_dir / "checkpoints").glob("*.tmp"):  # a checkpoint write cut short by a kill
            shutil.rmtree(leftover, ignore_errors=True)
        return checkpoints[-1]
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
