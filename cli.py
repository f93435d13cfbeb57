"""The ``fewstep`` command line.

Each subcommand lives in ``commands/<name>.py`` with ``register(subparsers)`` (and an ``ORDER`` for ``--help``);
they are discovered here and import their heavy dependencies only when they run.

Every error a user can cause reaches them as one line on stderr and a non-zero exit status, never a traceback:
argparse errors included (:class:`OneLineParser`), and failed writes (:func:`write_failures`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import pkgutil
import re
import shutil
import sys
from pathlib import Path

from . import __version__
from .training.loop.interrupts import RunInterrupted


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one ``--help`` away) with exit status 2, and the help
    of a required option says so."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("required") and "required" not in kwargs.get("help", ""):
            kwargs["help"] = f"{kwargs.get('help', '')} (required)".strip()
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def out_dir(path: str) -> Path:
    """An output directory, created if missing; a file there is a user error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_device(requested: str | None) -> str:
    """``--device``: None or ``auto`` → cuda when torch sees a GPU, else cpu; a device torch cannot use is one line.

    Every command that takes ``--device`` calls this before loading anything, so ``--device cuda`` on a CPU-only
    torch is refused up front instead of failing deep inside a model load.
    """
    import torch

    if requested in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {requested!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: no CUDA GPU is visible to this torch; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {requested}: torch sees {torch.cuda.device_count()} GPU(s); use cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"--device {requested}: fewstep runs on cpu or cuda; use one of those")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {requested}: this torch has no MPS support; use --device cpu")
    return requested


# ------------------------------------------------------------------------------------------ failed writes
_FIXES = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "choose a writable location or fix its permissions",
    errno.EPERM: "choose a writable location or fix its permissions",
    errno.ENOTDIR: "a file is in the way of a folder; choose another location",
    errno.EEXIST: "a file is in the way of a folder; choose another location",
}


def _errno_of(error: BaseException, location: Path) -> int | None:
    """The errno of a failed write: OSError's own, the one safetensors quotes, or ENOSPC when the disk is full.

    torch.save reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] ...`` without one.
    """
    if isinstance(error, OSError):
        return error.errno
    quoted = re.search(r"os error (\d+)", str(error))
    if quoted:
        return int(quoted.group(1))
    existing = next((p for p in (location, *location.parents) if p.exists()), None)
    if existing is not None and shutil.disk_usage(existing).free == 0:
        return errno.ENOSPC
    return None


def _is_write_failure(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return True
    text = str(error)
    if type(error).__name__ == "SafetensorError":
        return "I/O error" in text
    return isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


@contextlib.contextmanager
def write_failures(location: Path, then=lambda: ""):
    """Turn a failed write under ``location`` (disk full, read-only, no permission) into a one-line UserError.

    ``then()`` is appended when not empty, e.g. how to continue a run whose last complete checkpoint is kept.
    """
    try:
        yield
    except (UserError, RunInterrupted):
        raise
    except Exception as error:
        if not _is_write_failure(error):
            raise
        code = _errno_of(error, Path(location))
        reason = os.strerror(code).lower() if code else one_line(error)
        path = getattr(error, "filename", None) or location
        fix = _FIXES.get(code, "check that it is writable and has space")
        after = then()
        raise UserError(f"cannot write {path}: {reason}; {fix}{'; ' + after if after else ''}") from None


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its class name if it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def describe_os_error(error: OSError) -> str:
    """One line for an OSError nobody caught closer to its cause: the file, the reason, a fix where known."""
    reason = one_line(error) if error.strerror is None else error.strerror
    where = f"{error.filename}: " if error.filename else ""
    fix = _FIXES.get(error.errno)
    return f"{where}{reason}{'; ' + fix if fix else ''}"


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = OneLineParser(
        prog="fewstep",
        description="Distil Stable Diffusion models into one-step and few-step generators (DMD2 on one shared base).",
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.register(sub)
    return parser


def _close_progress_bars() -> None:
    """A progress bar left open by the loop an error came from would put the error on the bar's line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


class _NoTorchvisionHint(logging.Filter):
    """Drops transformers' "requires torchvision (not installed)" hint, printed when diffusers imports its image
    processors: fewstep uses none of them, and PyPI's torchvision breaks beside the CPU torch build (README), so
    the advice to install it only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_torchvision_hint() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionHint) for f in logger.filters):
        logger.addFilter(_NoTorchvisionHint())


def _leave_process_group() -> None:
    """Destroy torch.distributed's default group once a command has succeeded: left to the interpreter's exit, a gloo
    group's teardown can abort a process ("terminate called without an active exception") after a finished run."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    quiet_torchvision_hint()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        try:
            args.func(args)
            _leave_process_group()
        finally:
            _close_progress_bars()
    except (UserError, ValueError) as error:
        print(f"fewstep {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"fewstep {args.command}: error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except RunInterrupted as interrupted:
        print(f"fewstep {args.command}: {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except KeyboardInterrupt:
        print(f"fewstep {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
