"""Experiment tracking for a run: ``--report-to {none,tensorboard,wandb}`` through accelerate's tracker classes.

The trainer logs through a :class:`RunLogger` (``add_scalar``/``add_images``/``close``, the calls it always made):
losses and metrics per iteration, the optimizers' learning rates with the first value of each iteration, and the
validation grids. TensorBoard writes to ``RUN_DIR/logs/``; wandb is used only when installed, and logs offline
(into ``RUN_DIR/logs/``, for a later ``wandb sync``) unless the user has logged in or set ``WANDB_MODE``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb")
RUN_NAME = "fewstep"


class TrackerError(ValueError):
    """The requested tracker cannot be used: the message says how to fix it."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_report_to(report_to: str | None) -> str:
    """``None`` (unset) means TensorBoard when it is installed, else nothing; an explicit choice must be usable."""
    if report_to is None:
        return "tensorboard" if _installed("tensorboard") else "none"
    if report_to not in TRACKERS:
        raise TrackerError(f"--report-to {report_to!r} is not one of {', '.join(TRACKERS)}")
    if report_to == "tensorboard" and not _installed("tensorboard"):
        raise TrackerError("--report-to tensorboard needs TensorBoard: pip install tensorboard (or --report-to none)")
    if report_to == "wandb" and not _installed("wandb"):
        raise TrackerError("--report-to wandb needs wandb: pip install wandb (or --report-to tensorboard)")
    return report_to


def _hparams(config) -> dict:
    """The config as tracker hyper-parameters: plain scalars only (lists and None become text)."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _wandb_logged_in() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())


def _make_tracker(kind: str, run_dir: Path):
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        return TensorBoardTracker(RUN_NAME, logs)
    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
    if mode == "offline":
        print(f"fewstep: wandb logs offline to {logs} (run `wandb sync` to upload, or `wandb login` first)")
    return WandBTracker(RUN_NAME, dir=str(logs), mode=mode, name=run_dir.name)


class RunLogger:
    """One accelerate tracker behind the calls the trainer makes; learning rates are logged with the first value
    of each iteration, read from the optimizers."""

    def __init__(self, tracker, optimizers: dict):
        self.tracker, self.optimizers = tracker, optimizers
        self._last_step = None

    def add_scalar(self, tag: str, value, step: int) -> None:
        values = {tag: float(value)}
        if step != self._last_step:
            self._last_step = step
            values.update({f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()})
        self.tracker.log(values, step=step)

    def add_images(self, tag: str, images, step: int) -> None:
        """``images``: (B, 3, H, W) in [0, 1]."""
        self.tracker.log_images({tag: images if self.tracker.name == "tensorboard" else list(images)}, step=step)

    def close(self) -> None:
        self.tracker.finish()


def open_run_logger(report_to: str | None, run_dir: Path, config, optimizers: dict) -> RunLogger | None:
    """The run's logger, or None for ``--report-to none`` (call on the main process only)."""
    kind = resolve_report_to(report_to)
    if kind == "none":
        return None
    tracker = _make_tracker(kind, Path(run_dir))
    tracker.start()
    tracker.store_init_configuration(_hparams(config))
    return RunLogger(tracker, optimizers)
