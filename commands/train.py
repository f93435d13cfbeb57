"""``fewstep train``: distil a teacher into a few-step student."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

ORDER = 10


def cmd_train(args: argparse.Namespace) -> None:
    from ..cli import UserError, write_failures
    from ..training.config import build_config, load_yaml
    from ..training.dmd2 import DMD2TrainConfig, TrainingError, train_dmd2
    from ..training.run_dir import checkpoints_of

    cli = {k: v for k, v in vars(args).items() if k in DMD2TrainConfig.__dataclass_fields__}
    layers, sources = [load_yaml(args.config)] if args.config else [], [args.config] if args.config else []
    output = cli.get("output") or next((layer["output"] for layer in layers if layer.get("output")), None)
    if args.resume:
        # A resumed run keeps its saved options; the config file and command line may change some (--max-steps).
        if not output:
            raise UserError("--resume needs --output RUN_DIR, the run to continue")
        checkpoints = checkpoints_of(Path(output))
        saved = (checkpoints[-1] if checkpoints else Path(output)) / "config.yaml"
        if saved.is_file():
            layers, sources = [load_yaml(saved), *layers], [str(saved), *sources]
    config = build_config(DMD2TrainConfig, *layers, cli, sources=(*sources, None))
    run_dir = Path(config.output or ".")

    def resume_hint() -> str:
        if not checkpoints_of(run_dir):
            return ""
        return f"the last complete checkpoint is kept: fewstep train --output {shlex.quote(str(run_dir))} --resume"

    try:
        with write_failures(run_dir, then=resume_hint):
            run_dir = train_dmd2(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingError as error:
        raise UserError(str(error)) from None
    print(f"fewstep: run finished: {run_dir}")


def register(sub) -> None:
    from ..training.config import add_dataclass_arguments
    from ..training.dmd2 import DMD2TrainConfig

    train = sub.add_parser(
        "train",
        help="distil a Stable Diffusion teacher into a few-step LoRA student",
        description=(
            "DMD2 on one shared base UNet: the frozen base is the teacher, LoRA adapter 'generator' the student, "
            "adapter 'fake_score' (+ a GAN head) the fake score. Every option can also be set in --config FILE.yaml; "
            "the command line wins. A run directory holds one run: continue it with --resume (SIGINT and SIGTERM "
            "stop after a checkpoint and print that command), or replace it with --overwrite."
        ),
    )
    train.add_argument("--method", choices=["dmd2"], default="dmd2", help="distillation method (default: dmd2)")
    train.add_argument("--config", default=None, help="YAML file of options (keys as below, - or _)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint, with its saved options (--max-steps, --lr and "
        "the other options that may change can be given again)",
    )
    train.add_argument(
        "--overwrite", action="store_true", help="start a new run in an --output that holds one (deletes the old run)"
    )
    add_dataclass_arguments(train, DMD2TrainConfig, skip=("teacher_lora",))
    train.add_argument(
        "--teacher-lora", action="append", default=argparse.SUPPRESS, metavar="FILE[:SCALE]", dest="teacher_lora",
        help=DMD2TrainConfig.__dataclass_fields__["teacher_lora"].metadata["help"],
    )
    train.set_defaults(func=cmd_train)
