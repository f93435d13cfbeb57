"""``fewstep prepare``: encode a run's prompts and real images into the encoding cache ahead of training.

Optional: ``fewstep train`` encodes what the cache lacks itself. Preparing first lets the encoding run on other
machines or at another time, and several processes share it (``accelerate launch -m fewstep.cli prepare ...`` or
``torchrun --nproc_per_node N -m fewstep.cli prepare ...``: each encodes its share). Interrupted, it continues at
the first missing part. Give the same teacher, data and ``--resolution`` as the training run will.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

ORDER = 15
DATA_OPTIONS = ("teacher", "teacher_config", "teacher_lora", "model_type", "prompts", "images", "dataset",
                "image_column", "caption_column", "dataset_split", "streaming", "max_train_samples", "resolution",
                "cache_dir", "max_bad_fraction", "collective_timeout")  # fmt: skip


def prepare_config_class():
    """``fewstep train``'s own data and teacher options (one definition: the same help, defaults and checks)."""
    from ..training.loop.trainer import TrainConfig

    fields = [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
              for f in dataclasses.fields(TrainConfig) if f.name in DATA_OPTIONS]  # fmt: skip
    return dataclasses.make_dataclass("PrepareConfig", fields)


def cmd_prepare(args: argparse.Namespace) -> None:
    from ..cli import UserError
    from ..training.loop.config import build_config, check_config

    cls = prepare_config_class()
    config = build_config(cls, {k: v for k, v in vars(args).items() if k in DATA_OPTIONS}, sources=(None,))
    check_config(config)
    if not config.teacher:
        raise UserError("--teacher is required (a Hub id, a local diffusers folder or a .safetensors file)")
    reports = prepare(config, gan=not args.no_images)
    if reports:
        print(format_reports(reports))


def prepare(config, gan: bool = True) -> list:
    """Load the teacher, encode what the cache lacks (this process's share), return the entries' reports."""
    from ..training.data.run_data import read_training_data
    from ..training.loop.distributed import make_accelerator
    from ..training.loop.distributed import ProcessGroup
    from ..training.loop.encodings import build_caches
    from ..training.teacher import loading as teachers

    data = read_training_data(config)
    accelerator = make_accelerator(config.collective_timeout)
    pipe, family = teachers.load_teacher(config.teacher, config.model_type, config.teacher_config, config.teacher_lora)
    resolution = config.resolution or teachers.default_resolution(pipe)
    teachers.check_resolution(pipe, resolution)
    config = dataclasses.replace(config, resolution=resolution)
    pipe.to(accelerator.device)
    started = time.perf_counter()
    processes = ProcessGroup(accelerator.num_processes, accelerator.device, accelerator.process_index)
    use_gan = gan and data.images is not None
    _, _, reports = build_caches(pipe, family, data, use_gan, config, processes)
    for report in reports:
        report.seconds = time.perf_counter() - started
    return reports if accelerator.is_main_process else []


def format_reports(reports) -> str:
    header = f"{'entry':<9} {'items':>10} {'usable':>10} {'skipped':>8} {'encoded now':>12} {'size':>10} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for r in reports:
        skipped = sum(r.skipped.values())
        lines.append(f"{r.kind:<9} {r.items:>10,} {r.rows:>10,} {skipped:>8,} {r.encoded_items:>12,} "
                     f"{r.nbytes / 2**20:>7.1f} MB {r.seconds:>8.1f}")  # fmt: skip
    lines += [f"{r.kind}: {r.directory}" for r in reports]
    return "\n".join(lines)


def register(sub) -> None:
    from ..training.loop.config import add_dataclass_arguments

    parser = sub.add_parser(
        "prepare", help="encode prompts and real images into the encoding cache ahead of training (optional)",
        description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    cls = prepare_config_class()
    add_dataclass_arguments(parser, cls, skip=("teacher_lora",))
    parser.add_argument("--teacher-lora", action="append", default=argparse.SUPPRESS, metavar="FILE[:SCALE]",
                        dest="teacher_lora", help=cls.__dataclass_fields__["teacher_lora"].metadata["help"])
    parser.add_argument("--no-images", action="store_true",
                        help="encode the prompts only (a run without the GAN: --gan-weight 0, dmd, progressive)")
    parser.set_defaults(func=cmd_prepare)
