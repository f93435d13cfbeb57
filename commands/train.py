"""``fewstep train``: distil a teacher into a few-step student with a registered method (DMD2, DMD, Progressive
Distillation, ...). The method list, ``--method`` choices and option groups are read from the registry
(:mod:`fewstep.training.methods`), so a new method appears here without a change to this file."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import textwrap
from pathlib import Path

ORDER = 10

DESCRIPTION = """\
Distil a Stable Diffusion teacher into a LoRA student on one shared base UNet (the frozen base is the teacher).
Methods:
{methods}
Every option can also be set in --config FILE.yaml; the command line wins. An option of another method is refused.
A run directory holds one run: continue it with --resume (SIGINT and SIGTERM stop after a checkpoint and print that
command), or replace it with --overwrite.
"""
HELP_WIDTH = 114  # DESCRIPTION is preformatted (RawDescriptionHelpFormatter): wrap the summaries to its width


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _method_fields() -> dict[str, set[str]]:
    from ..training.methods import registered_methods

    return {name: _field_names(method.config_class) for name, method in registered_methods().items()}


def _description(methods: dict[str, type]) -> str:
    """DESCRIPTION with each method's one-line summary, wrapped beside its --method name."""
    indent = max(map(len, methods)) + 4
    summaries = [
        textwrap.fill(method.summary, HELP_WIDTH, initial_indent=f"  {name:<{indent - 2}}",
                      subsequent_indent=" " * indent)
        for name, method in methods.items()
    ]  # fmt: skip
    return DESCRIPTION.format(methods="\n".join(summaries))


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _group_title(owners: tuple[str, ...], options: set[str], methods: dict[str, type]) -> str:
    """"options of every method", "dmd only" or "dmd2 and dmd", plus the defaults where the other owners differ from
    the first (whose defaults the group's help shows)."""
    if len(owners) == len(methods):
        title = "options of every method"
    elif len(owners) == 1:
        title = f"{owners[0]} only"
    else:
        title = f"{', '.join(owners[:-1])} and {owners[-1]}"
    shown = {f.name: f.default for f in dataclasses.fields(methods[owners[0]].config_class)}
    notes = []
    for owner in owners[1:]:
        fields = dataclasses.fields(methods[owner].config_class)
        differ = [f"--{f.name.replace('_', '-')} {_shown(f.default)}" for f in fields
                  if f.name in options and f.default != shown[f.name]]  # fmt: skip
        notes += [f"{methods[owner].title} defaults: {', '.join(differ)}"] if differ else []
    return f"{title} ({'; '.join(notes)})" if notes else title


def _option_groups(methods: dict[str, type]) -> list[tuple[str, type, set[str]]]:
    """(title, the config class whose help and defaults it shows, its options): each option once, in the group of
    the methods that have it; the options of every method first, then those of several, then each method's own."""
    owners: dict[str, tuple[str, ...]] = {}
    for name, method in methods.items():
        for option in _field_names(method.config_class):
            owners[option] = owners.get(option, ()) + (name,)
    groups: dict[tuple[str, ...], set[str]] = {}
    for option, its_owners in owners.items():
        groups.setdefault(its_owners, set()).add(option)
    order = list(methods)
    ranked = sorted(groups, key=lambda its_owners: (-len(its_owners), [order.index(m) for m in its_owners]))
    return [(_group_title(o, groups[o], methods), methods[o[0]].config_class, groups[o]) for o in ranked]


def refuse_other_methods_options(method: str, given: set[str]) -> None:
    """One line naming an option that ``method`` does not have, and the method(s) that do."""
    from ..cli import UserError

    fields = _method_fields()
    for name in sorted(given - fields[method]):
        owners = [m for m, names in fields.items() if name in names]
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{flag} is an option of --method {' / '.join(owners)}, not of --method {method}; drop it")


def _method_name(args: argparse.Namespace, output: str | None) -> str:
    """--method as given; on --resume without it, the method the run was started with (RUN_DIR/method)."""
    from ..training.loop.trainer import METHOD_FILE

    if args.method is not None:
        return args.method
    saved = Path(output) / METHOD_FILE if output else None
    if args.resume and saved is not None and saved.is_file():
        return saved.read_text().strip()
    return "dmd2"


def _complete_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from (the newest complete one), or None; the trainer names bad ones."""
    from ..training.loop.run_dir import RunDirError, latest_complete_checkpoint

    try:
        return latest_complete_checkpoint(run_dir, log=lambda _: None)
    except RunDirError:
        return None


def cmd_train(args: argparse.Namespace) -> None:
    from ..cli import UserError, write_failures
    from ..training.loop.config import build_config, load_yaml
    from ..training.loop.resume import with_older_run_values
    from ..training.methods import get_method
    from ..training.loop.trainer import TrainingError, check_method, train

    all_fields = set().union(*_method_fields().values())
    cli = {k: v for k, v in vars(args).items() if k in all_fields}
    layers, sources = [load_yaml(args.config)] if args.config else [], [args.config] if args.config else []
    output = cli.get("output") or next((layer["output"] for layer in layers if layer.get("output")), None)
    method = get_method(_method_name(args, output))
    refuse_other_methods_options(method.key, set(cli))
    if args.resume:
        # A resumed run keeps its saved options; the config file and command line may change some (--max-steps).
        if not output:
            raise UserError("--resume needs --output RUN_DIR, the run to continue")
        try:
            check_method(Path(output), method)  # before its saved options are read as this method's
        except TrainingError as error:
            raise UserError(str(error)) from None
        saved = (_complete_checkpoint(Path(output)) or Path(output)) / "config.yaml"
        if saved.is_file():
            saved_options = with_older_run_values(method.config_class, load_yaml(saved))
            layers, sources = [saved_options, *layers], [str(saved), *sources]
    config = build_config(method.config_class, *layers, cli, sources=(*sources, None))
    run_dir = Path(config.output or ".")

    def resume_hint() -> str:
        if _complete_checkpoint(run_dir) is None:
            return ""
        return f"the last complete checkpoint is kept: fewstep train --output {shlex.quote(str(run_dir))} --resume"

    try:
        with write_failures(run_dir, then=resume_hint):
            run_dir = train(method, config, resume=args.resume, overwrite=args.overwrite)
    except TrainingError as error:
        raise UserError(str(error)) from None
    print(f"fewstep: run finished: {run_dir}")


def register(sub) -> None:
    from ..training.loop.config import add_dataclass_arguments
    from ..training.methods import registered_methods

    methods = registered_methods()
    train = sub.add_parser(
        "train",
        help=f"distil a Stable Diffusion teacher into a few-step LoRA student ({', '.join(methods)})",
        description=_description(methods),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--method", choices=list(methods), default=None,
        help="distillation method (default: dmd2; with --resume: the run's own)",
    )
    train.add_argument("--config", default=None, help="YAML file of options (keys as below, - or _)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint, with its saved options and method (--max-steps, "
        "--lr and the other options that may change can be given again)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="start a new run in an --output that holds one (deletes the old run)"
    )
    for title, cls, fields in _option_groups(methods):
        group = train.add_argument_group(title)
        add_dataclass_arguments(group, cls, skip=tuple(_field_names(cls) - fields) + ("teacher_lora",))
        if "teacher_lora" in fields:
            group.add_argument(
                "--teacher-lora", action="append", default=argparse.SUPPRESS, metavar="FILE[:SCALE]",
                dest="teacher_lora", help=cls.__dataclass_fields__["teacher_lora"].metadata["help"],
            )  # fmt: skip
    train.set_defaults(func=cmd_train)
