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
from .run_dir import checkpoint_step


class ResumeError(ValueError):
    """The resumed run would not be the run in the checkpoint: the message names the options and the fix."""


def may_change_on_resume(field: dataclasses.Field) -> bool:
    return field.metadata.get("on_resume") == "may change"


def saved_options(checkpoint: Path) -> dict:
    """The options the checkpoint's run was made with."""
    return load_yaml(checkpoint / "config.yaml")


def with_older_run_values(config_class, saved: dict) -> dict:
    """A run's saved options, plus the value its fewstep version used for each option added since (a field whose
    metadata has ``"older_runs"``), so a resumed run goes on as it started rather than with a newer default."""
    added = {f.name: f.metadata["older_runs"] for f in dataclasses.fields(config_class) if "older_runs" in f.metadata}
    return {**{name: value for name, value in added.items() if name not in saved}, **saved}


def check_resume(config, checkpoint: Path) -> None:
    """Before anything loads: refuse a resume with nothing left to train, or with options given for it that differ
    from the checkpoint's run and cannot change on resume.

    Options still None are filled from the teacher's family once the teacher has loaded; :func:`check_resume_defaults`
    checks those then.
    """
    _refuse_changes(config, saved_options(checkpoint), checkpoint, [f.name for f in dataclasses.fields(config)])
    step = checkpoint_step(checkpoint)
    if step >= config.max_steps:
        raise ResumeError(
            f"--resume: the run in {checkpoint.parent.parent} is already at step {step} (--max-steps "
            f"{config.max_steps}); give a larger --max-steps to train on, or write its LoRA files with fewstep export"
        )


def check_resume_defaults(config, given, checkpoint: Path) -> None:
    """Once the teacher's family is known: :func:`check_resume`'s check of the options that ``given`` (the options
    checked before the teacher loaded) left None and ``config`` has filled with the family's defaults."""
    filled = [f.name for f in dataclasses.fields(given) if getattr(given, f.name) is None]
    _refuse_changes(config, saved_options(checkpoint), checkpoint, filled)


def _refuse_changes(config, saved: dict, checkpoint: Path, names: list[str]) -> None:
    """Refuse the options among ``names`` that differ from the checkpoint's run and cannot change on resume
    (those still None are not known yet)."""
    changed = []
    for field in dataclasses.fields(config):
        new, old = getattr(config, field.name), saved.get(field.name)
        if field.name not in names or may_change_on_resume(field) or new is None or field.name not in saved:
            continue
        if not _same(new, old):
            changed.append(f"{flag(field.name)} {_show(new)} (the run has {_show(old)})")
    if changed:
        free = ", ".join(
            flag(f.name) for f in dataclasses.fields(config) if may_change_on_resume(f) and f.name != "output"
        )
        raise ResumeError(
            f"--resume from {checkpoint}: {'; '.join(changed)} cannot change on resume; drop the option to keep the "
            f"run's value, or start a new run in another --output (options that may change: {free})"
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
