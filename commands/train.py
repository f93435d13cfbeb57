"""``fewstep train``: distil a teacher into a few-step student with DMD2, DMD or Progressive Distillation."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

ORDER = 10

DESCRIPTION = """\
Distil a Stable Diffusion teacher into a LoRA student on one shared base UNet (the frozen base is the teacher).
Methods:
  dmd2         DMD2: distribution matching, fake score (adapter 'fake_score') on two time scales, GAN on --images.
  dmd          DMD: distribution matching + regression on teacher ODE pairs cached in RUN_DIR/pairs; one step,
               no GAN, both networks updated every iteration.
  progressive  Progressive Distillation: rounds that halve the DDIM steps (--start-steps → --end-steps); the
               previous round's student is a frozen adapter; every round's LoRA goes to RUN_DIR/lora/steps-N/.
Every option can also be set in --config FILE.yaml; the command line wins. An option of another method is refused.
A run directory holds one run: continue it with --resume (SIGINT and SIGTERM stop after a checkpoint and print that
command), or replace it with --overwrite.
"""


def _method_fields() -> dict[str, set[str]]:
    from ..training.methods import METHOD_NAMES, get_method

    return {name: {f.name for f in dataclasses.fields(get_method(name).config_class)} for name in METHOD_NAMES}


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


def cmd_train(args: argparse.Namespace) -> None:
    from ..cli import UserError, write_failures
    from ..training.loop.config import build_config, load_yaml
    from ..training.methods import get_method
    from ..training.loop.run_dir import checkpoints_of
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
        checkpoints = checkpoints_of(Path(output))
        saved = (checkpoints[-1] if checkpoints else Path(output)) / "config.yaml"
        if saved.is_file():
            layers, sources = [load_yaml(saved), *layers], [str(saved), *sources]
    config = build_config(method.config_class, *layers, cli, sources=(*sources, None))
    run_dir = Path(config.output or ".")

    def resume_hint() -> str:
        if not checkpoints_of(run_dir):
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
    from ..training.methods.dmd import DMDTrainConfig
    from ..training.methods.dmd2 import DMD2TrainConfig
    from ..training.methods.progressive import ProgressiveTrainConfig

    train = sub.add_parser(
        "train",
        help="distil a Stable Diffusion teacher into a few-step LoRA student (dmd2, dmd, progressive)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--method", choices=["dmd2", "dmd", "progressive"], default=None,
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
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}
    common = names(DMD2TrainConfig) & names(DMDTrainConfig) & names(ProgressiveTrainConfig)
    distribution_matching = (names(DMD2TrainConfig) & names(DMDTrainConfig)) - common
    groups = [
        ("options of every method", DMD2TrainConfig, common),
        ("dmd2 and dmd (DMD defaults: --gan-weight 0, --dfake-gen-update-ratio 1)", DMD2TrainConfig,
         distribution_matching),
        ("dmd only", DMDTrainConfig, names(DMDTrainConfig) - common - distribution_matching),
        ("progressive only", ProgressiveTrainConfig, names(ProgressiveTrainConfig) - common),
    ]  # fmt: skip
    for title, cls, fields in groups:
        group = train.add_argument_group(title)
        add_dataclass_arguments(group, cls, skip=tuple(names(cls) - fields) + ("teacher_lora",))
        if "teacher_lora" in fields:
            group.add_argument(
                "--teacher-lora", action="append", default=argparse.SUPPRESS, metavar="FILE[:SCALE]",
                dest="teacher_lora", help=DMD2TrainConfig.__dataclass_fields__["teacher_lora"].metadata["help"],
            )  # fmt: skip
    train.set_defaults(func=cmd_train)
