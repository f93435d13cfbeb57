"""``fewstep sample``: images from a distilled student (a fewstep run or a LoRA file), optionally with Distillation++."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import UserError, out_dir, resolve_device, write_failures

ORDER = 30


def run_config(lora: str) -> dict:
    """The training config of the fewstep run a LoRA comes from (``RUN_DIR/config.yaml``), or {}.

    ``lora`` may be the run directory, its ``lora/`` folder or a file in it.
    """
    import yaml

    path = Path(lora).expanduser()
    folder = path.parent if path.is_file() else path
    run_dir = folder.parent if folder.name == "lora" else folder
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return config if isinstance(config, dict) else {}


def run_teacher(teacher: str | None, teacher_lora: list[str] | None, config: dict, lora: str | None,
                teacher_config: str | None = None) -> tuple[str, list[str], str | None]:  # fmt: skip
    """(teacher, style LoRAs, single-file teacher's config) to sample a student on: the flags, else its run's."""
    teacher = teacher or config.get("teacher")
    if not teacher:
        raise UserError(f"--teacher is needed: {lora} is not a fewstep run whose config names its teacher")
    # The student was trained on the teacher with its style LoRAs fused: sample on that same base (the model card's
    # snippet does the same), unless --teacher-lora says otherwise ("none": the plain base).
    style_loras = teacher_lora if teacher_lora is not None else config.get("teacher_lora") or []
    style_loras = [spec for spec in style_loras if spec.lower() != "none"]
    if teacher_config is None and teacher == config.get("teacher"):
        teacher_config = config.get("teacher_config")
    return teacher, style_loras, teacher_config


def timesteps_flag(args: argparse.Namespace) -> list[int] | None:
    """``--timesteps`` parsed, or ``--steps`` checked (None): bad flags fail before the teacher is loaded."""
    from ..core.schedule import parse_timesteps

    if args.timesteps is not None:
        return parse_timesteps(args.timesteps)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be ≥ 1, got {args.steps}")
    return None


def run_recipe(config: dict, num_train_timesteps: int) -> dict | None:
    """The sampling a run's training config implies, for a LoRA without its own ``fewstep_recipe.json``."""
    from ..core.schedule import student_timesteps

    if config.get("timesteps"):
        return {"timesteps": [int(t) for t in config["timesteps"]]}
    if config.get("num_steps"):
        return {"timesteps": student_timesteps(int(config["num_steps"]), num_train_timesteps)}
    return None


def load_pipeline(
    teacher: str, device: str, dtype_name: str, style_loras: list[str] | None = None, teacher_config: str | None = None
):
    """The teacher, with ``style_loras`` (``FILE[:SCALE]``) fused as in training, as fewstep's few-step pipeline of
    its family (SD1.5 or SDXL)."""
    import torch

    from ..training.teacher.loading import load_teacher

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    base, family = load_teacher(teacher, teacher_config=teacher_config, style_loras=style_loras)
    if family == "sdxl":
        from ..pipelines.fewstep_sdxl import FewStepSDXLPipeline as pipeline_class
    else:
        from ..pipelines.fewstep_sd import FewStepSDPipeline as pipeline_class
    pipe = pipeline_class.from_pipe(base)
    if dtype != pipe.unet.dtype:
        pipe.to(dtype=dtype)
    return pipe.to(device)


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from ..core.distillpp import check_guide_source, check_teacher_guidance
    from ..core.sampling import resolve_sampling
    from ..pipelines.common import looks_like_path, lora_file_of

    device = resolve_device(args.device)  # before anything is read or loaded
    if looks_like_path(args.lora):
        lora_file_of(args.lora)  # a missing or empty LoRA source fails before the teacher is loaded
    config = run_config(args.lora)
    teacher, style_loras, teacher_config = run_teacher(args.teacher, args.teacher_lora, config, args.lora)
    timesteps = timesteps_flag(args)
    check_teacher_guidance(args.distillpp, args.distillpp_steps, args.distillpp_rule, args.teacher_guidance_scale)
    check_guide_source(args.distillpp_guide, args.distillpp_teacher_steps)
    if args.num_images < 1:
        raise UserError(f"--num-images must be ≥ 1, got {args.num_images}")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    with write_failures(Path(args.out)):
        out = out_dir(args.out)

    if style_loras:
        print(f"fewstep sample: style LoRAs fused into the teacher, as in training: {', '.join(style_loras)}")
    pipe = load_pipeline(teacher, device, dtype, style_loras, teacher_config)
    pipe.load_lora_weights(args.lora)
    # The flags win, then the LoRA's fewstep_recipe.json, then the run's training config, then one step.
    num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    recipe = getattr(pipe, "fewstep_recipe", None) or run_recipe(config, num_train_timesteps)
    settings = resolve_sampling(args.steps, timesteps, args.sampler, recipe, num_train_timesteps)
    resolution = args.resolution or config.get("resolution")
    generator = torch.Generator("cpu").manual_seed(args.seed)
    result = pipe(
        list(args.prompt),
        height=resolution,
        width=resolution,
        timesteps=settings.timesteps,
        negative_prompt=[args.negative_prompt] * len(args.prompt) if args.negative_prompt else None,
        num_images_per_prompt=args.num_images,
        generator=generator,
        teacher_guidance=args.distillpp,
        teacher_guided_steps=args.distillpp_steps,
        teacher_guidance_scale=args.teacher_guidance_scale,
        teacher_guidance_rule=args.distillpp_rule,
        teacher_guidance_source=args.distillpp_guide,
        teacher_refinement_steps=args.distillpp_teacher_steps,
        sampler=settings.sampler,
    )
    described = f"timesteps {settings.timesteps}, sampler {settings.sampler}"
    if args.distillpp > 0:
        described += (
            f", Distillation++ ({args.distillpp_rule}) λ={args.distillpp} on {args.distillpp_steps} step(s), "
            f"teacher CFG {args.teacher_guidance_scale}"
        )
        if args.distillpp_guide != "renoised" or args.distillpp_teacher_steps != 1:
            described += f", guide {args.distillpp_guide}, {args.distillpp_teacher_steps} teacher step(s)"
    print(f"fewstep sample: {len(result.images)} image(s), {described}, seed {args.seed}")
    for index, image in enumerate(result.images):
        prompt_index, image_index = divmod(index, args.num_images)
        path = out / f"sample-s{args.seed}-p{prompt_index:02d}-{image_index:02d}.png"
        with write_failures(path):
            image.save(path)
        print(path)


def register(sub) -> None:
    from ..core.distillpp import (GUIDE_SOURCES, RECOMMENDED_GUIDED_STEPS, RECOMMENDED_LAMBDA, RECOMMENDED_RULE,
                                  RECOMMENDED_TEACHER_CFG, RULES)  # fmt: skip

    parser = sub.add_parser(
        "sample",
        help="generate images with a distilled student (optionally Distillation++)",
        description="Sample a fewstep student: the teacher's pipeline with the run's LoRA at the timesteps and with "
        "the sampler its fewstep_recipe.json records, and optionally Distillation++ (the teacher refines the first "
        "steps).",
    )
    parser.add_argument("--teacher", help="teacher Hub id or diffusers folder (default: the run's config)")
    parser.add_argument("--lora", required=True, help="fewstep run directory, its lora/ folder or a .safetensors file")
    parser.add_argument(
        "--teacher-lora", action="append", metavar="FILE[:SCALE]",
        help="style LoRA fused into the teacher (repeatable; default: the run's own, at the scales it trained with; "
        "'none' for the plain base)",
    )  # fmt: skip
    parser.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    parser.add_argument("--negative-prompt", help="negative prompt (used by the teacher's CFG under --distillpp)")
    parser.add_argument("--steps", type=int, help="student steps 1/2/4/8 (default: the LoRA's recorded ones, else 1)")
    parser.add_argument("--timesteps", help="explicit student timesteps, e.g. 999,499 or 399 (overrides --steps)")
    parser.add_argument(
        "--sampler", choices=["few_step", "ddim"],
        help="few_step: DMD2's re-noising rule (DMD2, DMD); ddim: deterministic DDIM (progressive distillation) "
        "(default: the LoRA's recorded sampler, else few_step)",
    )  # fmt: skip
    parser.add_argument(
        "--distillpp", type=float, default=0.0,
        help=f"Distillation++ λ in [0, 1] (default 0 = off; the authors' DMD2 setting: {RECOMMENDED_LAMBDA})",
    )  # fmt: skip
    parser.add_argument("--distillpp-steps", type=int, default=RECOMMENDED_GUIDED_STEPS,
                        help="teacher-guided steps K (default %(default)s, the authors' DMD2 setting)")
    parser.add_argument(
        "--distillpp-rule", choices=RULES, default=RECOMMENDED_RULE,
        help="Distillation++ rule: eps_mix (the authors' code; it also injects noise of std ≈ 20.7·λ into the first "
        "x0) or x0_lerp (the paper's closed form) (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--teacher-guidance-scale", type=float, default=RECOMMENDED_TEACHER_CFG,
                        help="teacher CFG w (default %(default)s, the authors')")
    parser.add_argument(
        "--distillpp-guide", choices=GUIDE_SOURCES, default="renoised",
        help="where the teacher's x0 comes from: renoised (Distillation++), at_student_input (the teacher at the "
        "student's own latent), noise_only (the control: eps_mix's noise, no teacher) (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--distillpp-teacher-steps", type=int, default=1,
                        help="DDIM steps the teacher takes to its x0 (default %(default)s, the paper's one call)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.add_argument("--resolution", type=int, help="image size (default: the run's, else the model's)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on cuda, float32 on cpu"
    )
    parser.add_argument("--out", default="fewstep-samples", help="output directory (default: %(default)s)")
    parser.set_defaults(func=cmd_sample)
