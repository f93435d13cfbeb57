"""The ``fewstep`` command line.

Each subcommand lives in ``commands/<name>.py`` with ``register(subparsers)`` (and an ``ORDER`` for ``--help``);
they are discovered here and import their heavy dependencies only when they run.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from . import __version__


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def out_dir(path: str) -> Path:
    """An output directory, created if missing; a file there is a user error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = argparse.ArgumentParser(
        prog="fewstep",
        description="Distil Stable Diffusion models into one-step and few-step generators (DMD2 on one shared base).",
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"{commands.__name__}.{m.name}") for m in pkgutil.iter_modules(commands.__path__)]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"fewstep {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fewstep {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
