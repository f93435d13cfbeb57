"""``fewstep train``: distil a teacher into a few-step student."""

from __future__ import annotations

import argparse

ORDER = 10


def cmd_train(args: argparse.Namespace) -> None:
    from ..training.config import load_yaml
    from ..training.dmd2 import DMD2TrainConfig, TrainingError, make_config, train_dmd2
    from ..cli import UserError

    cli = {k: v for k, v in vars(args).items() if k in DMD2TrainConfig.__dataclass_fields__}
    if args.resume and args.config is None and cli.get("output"):
        # A resumed run keeps its saved options; the command line may still change some (e.g. --max-steps).
        from pathlib import Path

        saved = Path(cli["output"]) / "config.yaml"
        if saved.is_file():
            cli = {**load_yaml(saved), **cli}
    try:
        config = make_config(cli, args.config)
        run_dir = train_dmd2(config, resume=args.resume)
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
            "the command line wins."
        ),
    )
    train.add_argument("--method", choices=["dmd2"], default="dmd2", help="distillation method (default: dmd2)")
    train.add_argument("--config", default=None, help="YAML file of options (keys as below, - or _)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    add_dataclass_arguments(train, DMD2TrainConfig, skip=("teacher_lora",))
    train.add_argument(
        "--teacher-lora", action="append", default=argparse.SUPPRESS, metavar="FILE[:SCALE]", dest="teacher_lora",
        help=DMD2TrainConfig.__dataclass_fields__["teacher_lora"].metadata["help"],
    )
    train.set_defaults(func=cmd_train)
