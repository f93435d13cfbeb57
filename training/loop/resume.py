"""What a resumed run may change, and making the changes it may take (a new learning rate) take effect.

A field whose metadata says ``"on_resume": "may change"`` (e.g. ``max_steps``, ``lr``) takes its new value on
``--resume``; every other field shapes the adapters, the optimizer state or the data stream that the checkpoint
holds, so a different value is refused rather than silently mixed into the run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import flag, load_yaml


class ResumeError(ValueError):
    """The resumed run would not be the run in the checkpoint: the message names the options and the fix."""


def may_change_on_resume(field: dataclasses.Field) -> bool:
    return field.metadata.get("on_resume") == "may change"


def saved_options(checkpoint: Path) -> dict:
    """The options the checkpoint's run was made with."""
    return load_yaml(checkpoint / "config.yaml")


def check_resume(config, saved: dict, checkpoint: Path) -> None:
    """Refuse a resume with nothing left to train, or with options that differ from the checkpoint's run and
    cannot change on resume.

    Fields still None (to be filled from the teacher's family) are skipped; calling this again once they are
    filled checks them too.
    """
    changed = []
    for field in dataclasses.fields(config):
        new, old = getattr(config, field.name), saved.get(field.name)
        if may_change_on_resume(field) or new is None or field.name not in saved or _same(new, old):
            continue
        changed.append(f"{flag(field.name)} {_show(new)} (the run has {_show(old)})")
    if changed:
        free = ", ".join(
            flag(f.name) for f in dataclasses.fields(config) if may_change_on_resume(f) and f.name != "output"
        )
        raise ResumeError(
            f"--resume from {checkpoint}: {'; '.join(changed)} cannot change on resume; drop the option to keep the "
            f"run's value, or start a new run in another --output (options that may change: {free})"
        )
    step = int(checkpoint.name.removeprefix("step-"))
    if step >= config.max_steps:
        raise ResumeError(
            f"--resume: the run in {checkpoint.parent.parent} is already at step {step} (--max-steps "
            f"{config.max_steps}); give a larger --max-steps to train on, or write its LoRA files with fewstep export"
        )


def _same(new, old) -> bool:
    """Equal values, or two spellings of one local path (relative and absolute, a trailing slash)."""
    if new == old:
        return True
    if isinstance(new, str) and isinstance(old, str) and os.path.exists(new) and os.path.exists(old):
        return os.path.samefile(new, old)
    return False


def _show(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def set_base_lr(scheduler, lr: float | list[float]) -> None:
    """Make a resumed optimizer and its scheduler use base learning rate ``lr`` from the current step on.

    ``lr`` is one rate for every parameter group, or a list of one per group. A loaded scheduler restores the old
    base rate (``base_lrs``) and its optimizer the old current rate; the schedule's factor at this step
    (current / base) is kept, so warm-up and decay continue where they were.
    """
    groups = scheduler.optimizer.param_groups
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(groups)
    for index, (group, lr) in enumerate(zip(groups, lrs)):
        old = scheduler.base_lrs[index]
        if old == lr:
            continue
        group["lr"] = group["lr"] / old * lr
        group["initial_lr"] = lr
        scheduler.base_lrs[index] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
