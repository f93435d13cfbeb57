"""``fewstep teacher digits``: the embedded digits teacher: reuse the cached one, unpack the shipped one, or train it."""

from __future__ import annotations

import argparse

ORDER = 10


def cmd_teacher_digits(args: argparse.Namespace) -> None:
    import shutil
    import time

    from ..cli import out_dir
    from ..digits.teacher import digits_teacher, teacher_config_from_file

    # Check --out before a build of several minutes, not after.
    out = out_dir(args.out) if args.out else None
    config = teacher_config_from_file(args.config, seed=args.seed)
    started = time.perf_counter()
    entry = digits_teacher(config, force=args.force)
    print(f"fewstep: digits teacher ready in {time.perf_counter() - started:.0f} s: {entry}")
    if out is not None:
        shutil.copytree(entry, out, dirs_exist_ok=True)
        print(f"fewstep: copied it to {out} (load it with StableDiffusionPipeline.from_pretrained({str(out)!r}))")


def register(sub) -> None:
    teacher = sub.add_parser(
        "teacher",
        help="build an embedded teacher model",
        description="Build an embedded teacher (a small Stable Diffusion model trained here, no download).",
    )
    kinds = teacher.add_subparsers(dest="kind", metavar="KIND", required=True)
    digits = kinds.add_parser(
        "digits",
        help="the digits teacher (scikit-learn's handwritten digits, 32×32, SD format)",
        description=(
            "Make the digits teacher in Stable Diffusion format and cache it under $FEWSTEP_CACHE (default "
            "~/.cache/fewstep) for later calls. The default build ships with fewstep (fp16) and is unpacked in "
            "seconds; another --seed or --config, or --force, trains one (about 15 minutes on 2 CPU cores). The "
            "build config is recorded in fewstep_teacher.json next to the weights; `--config` of the shipped "
            "teacher's record with --force rebuilds an equivalent teacher."
        ),
    )
    digits.add_argument("--out", help="also copy the teacher folder here (created if missing)")
    digits.add_argument(
        "--force", action="store_true", help="train it from its config even if a cached or shipped teacher exists"
    )
    digits.add_argument("--seed", type=int, default=None, help="random seed of the build (default: 0)")
    digits.add_argument(
        "--config",
        help="build settings: a YAML file of DigitsTeacherConfig fields, or a built teacher's fewstep_teacher.json",
    )
    digits.set_defaults(func=cmd_teacher_digits)
