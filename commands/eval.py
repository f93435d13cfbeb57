"""``fewstep eval``: measure a student against its teacher.

- With ``--prompts FILE``: any SD1.5/SDXL teacher and student LoRA (``training/evaluation``): the teacher at N DDIM
  steps, the student at its recorded recipe and with Distillation++ (each beside its noise-only control), scored by
  FD_DINOv2, FD_CLIP, CLIP score, precision/recall/density/coverage and seconds per image; ``report.html``,
  ``report.png`` and ``metrics.json`` in ``--out``.
- Without: the digits yardstick (FD of a digit classifier's features, prompt accuracy, variety) on the digits teacher.
"""

from __future__ import annotations

import argparse

ORDER = 40
DEFAULT_TEACHER_STEPS = 50
# Options of one mode only: given in the other, they are refused rather than ignored.
DIGITS_ONLY = ("n", "distillpp_lambda", "distillpp_steps", "distillpp_rule", "distillpp_teacher_cfg",
               "distillpp_guide", "distillpp_teacher_steps")  # fmt: skip
PROMPTS_ONLY = ("images", "metric_model", "clip_model", "teacher_steps", "images_per_prompt", "distillpp",
                "teacher_config", "teacher_lora", "resolution", "device", "dtype", "batch_size", "out")  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..cli import UserError

    mode, other = ("prompts", DIGITS_ONLY) if args.prompts is not None else ("digits", PROMPTS_ONLY)
    given = [_flag(name) for name in other if getattr(args, name) is not None]
    if given:
        what = "the digits yardstick (no --prompts)" if mode == "prompts" else "--prompts FILE"
        raise UserError(f"{', '.join(given)} is for {what}; see fewstep eval --help")
    json_path = _json_path(args.json)
    eval_prompts(args, json_path) if mode == "prompts" else eval_digits(args, json_path)


def _json_path(json_flag: str | None):
    from pathlib import Path

    from ..cli import UserError

    json_path = Path(json_flag) if json_flag else None
    if json_path is not None and json_path.is_dir():
        raise UserError(f"--json {json_path} is a directory; give a file name")
    return json_path


def _write_json(json_path, result: dict) -> None:
    import json

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")


# ------------------------------------------------------------------------------------------ the digits yardstick
def eval_digits(args: argparse.Namespace, json_path) -> None:
    from ..digits.teacher import digits_teacher
    from ..digits.yardstick import DistillppSettings, balanced_labels, evaluate, format_table

    n = 500 if args.n is None else args.n
    balanced_labels(n)  # validate before loading anything
    flags = {"lam": args.distillpp_lambda, "guided_steps": args.distillpp_steps, "rule": args.distillpp_rule,
             "teacher_guidance_scale": args.distillpp_teacher_cfg, "guide": args.distillpp_guide,
             "teacher_steps": args.distillpp_teacher_steps}  # fmt: skip
    distillpp = DistillppSettings(**{key: value for key, value in flags.items() if value is not None})
    if args.teacher is None:
        args.teacher = str(digits_teacher())
    result = evaluate(
        args.teacher, lora=args.lora, n=n, guidance_scale=args.guidance_scale, seed=args.seed, distillpp=distillpp
    )
    print(format_table(result))
    _write_json(json_path, result)


# ------------------------------------------------------------------------------------------ any SD1.5/SDXL teacher
def _teacher_steps(text: str | None) -> list[int]:
    from ..cli import UserError

    if text is None:
        return [DEFAULT_TEACHER_STEPS]
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise UserError(f"--teacher-steps must be step counts ≥ 1 separated by commas, e.g. 50 or 50,4; got {text!r}")
    return list(dict.fromkeys(steps))


def _check_prompt_options(args: argparse.Namespace):
    """Everything that can be refused before a model is loaded; returns (prompts, teacher steps, Distillation++)."""
    from ..cli import UserError
    from ..pipelines.common import looks_like_path, lora_file_of
    from ..training.data.prompts import read_prompts
    from ..training.evaluation.rows import parse_distillpp
    from ..training.evaluation.scoring import real_image_paths

    prompts = read_prompts(args.prompts)
    steps = _teacher_steps(args.teacher_steps)
    specs = [parse_distillpp(spec, f"distillpp{index + 1 if index else ''}")
             for index, spec in enumerate(args.distillpp or [])]  # fmt: skip
    for name, value in (("--images-per-prompt", args.images_per_prompt), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be ≥ 1, got {value}")
    if args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise UserError(f"--teacher-cfg must be ≥ 0, got {args.guidance_scale}")
    if len(prompts) * (args.images_per_prompt or 1) < 2:
        raise UserError(f"{args.prompts} holds 1 prompt: the metrics need at least 2 images; add --images-per-prompt 2")
    if specs and not args.lora:
        raise UserError("--distillpp needs a student to guide: pass --lora RUN_DIR_OR_FILE")
    if args.lora and looks_like_path(args.lora):
        lora_file_of(args.lora)  # a missing or empty LoRA source fails before anything loads
    if args.images is not None:
        real_image_paths(args.images)
    return prompts, steps, specs


def _load_student(pipe, lora: str, config: dict):
    """The student LoRA on the teacher's UNet, and its row at the recipe it records (``fewstep_recipe.json``, else
    its run's config, else one step)."""
    from ..core.sampling import resolve_sampling
    from ..training.evaluation.rows import STUDENT_ADAPTER, StudentRow
    from .sample import run_recipe

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": expected, the LoRA is UNet-only
    try:
        pipe.load_lora_weights(lora, adapter_name=STUDENT_ADAPTER)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    recipe = getattr(pipe, "fewstep_recipe", None) or run_recipe(config, num_train_timesteps)
    settings = resolve_sampling(recipe=recipe, num_train_timesteps=num_train_timesteps)
    return StudentRow(tuple(settings.timesteps), settings.sampler)


def eval_prompts(args: argparse.Namespace, json_path) -> None:
    from dataclasses import asdict
    from pathlib import Path

    from ..cli import out_dir, resolve_device, write_failures
    from ..training.evaluation.metric_models import DEFAULT_CLIP_MODEL, DEFAULT_METRIC_MODEL
    from ..training.evaluation.report import format_table, write_report
    from ..training.evaluation.rows import SDModels, TeacherRow, distillpp_rows
    from ..training.evaluation.scoring import evaluate, load_scorer
    from ..training.loop.trainer import FAMILY_DEFAULTS
    from ..training.teacher.loading import check_resolution, default_resolution
    from .sample import load_pipeline, run_config, run_teacher

    device = resolve_device(args.device)
    prompts, steps, specs = _check_prompt_options(args)
    config = run_config(args.lora) if args.lora else {}
    teacher, style_loras, teacher_config = run_teacher(args.teacher, args.teacher_lora, config, args.lora,
                                                       args.teacher_config)  # fmt: skip
    out_path = Path(args.out or "fewstep-eval")
    with write_failures(out_path):
        out = out_dir(str(out_path))
    scorer = load_scorer(args.metric_model or DEFAULT_METRIC_MODEL, args.clip_model or DEFAULT_CLIP_MODEL, device)

    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    pipe = load_pipeline(teacher, device, dtype, style_loras, teacher_config)
    pipe.set_progress_bar_config(disable=True)
    student = _load_student(pipe, args.lora, config) if args.lora else None
    resolution = args.resolution or config.get("resolution") or default_resolution(pipe)
    check_resolution(pipe, resolution)
    guidance_scale = args.guidance_scale
    if guidance_scale is None:
        guidance_scale = config.get("guidance_scale") or FAMILY_DEFAULTS[pipe.family]["guidance_scale"]
    rows = [TeacherRow(n, float(guidance_scale)) for n in steps]
    rows += [student, *distillpp_rows(specs, student)] if student is not None else []
    record = {"teacher": teacher, "teacher_lora": style_loras, "lora": args.lora, "teacher_steps": steps,
              "teacher_cfg": float(guidance_scale), "distillpp": [asdict(spec) for spec in specs],
              "device": device, "dtype": dtype}  # fmt: skip
    evaluation = evaluate(
        SDModels(pipe, pipe.family, resolution), rows, prompts, scorer, args.images_per_prompt or 1, args.seed,
        args.batch_size or 8, args.images, record,
    )  # fmt: skip
    with write_failures(out):
        files = write_report(out, evaluation.result, evaluation.thumbnails)
    print(format_table(evaluation.result))
    print(f"wrote {', '.join(str(path) for path in files)}")
    _write_json(json_path, evaluation.result)


def register(sub) -> None:
    from ..core.distillpp import RULES
    from ..digits.yardstick import GUIDES, DistillppSettings
    from ..training.evaluation.metric_models import DEFAULT_CLIP_MODEL, DEFAULT_METRIC_MODEL

    parser = sub.add_parser(
        "eval",
        help="measure a student against its teacher: FD_DINOv2, CLIP score, variety, speed (or the digits yardstick)",
        description=(
            "With --prompts FILE: sample the teacher (--teacher-steps DDIM steps, CFG --teacher-cfg) and the student "
            "LoRA (at its recorded recipe; with each --distillpp setting beside its noise-only control) on the same "
            "prompts and seeds, and report per row the Fréchet distance to the teacher's images (and to --images) in "
            "DINOv2 and CLIP features, the CLIP score, precision/recall/density/coverage and seconds per image, as "
            "report.html, report.png and metrics.json in --out (docs/eval.md). "
            "Without --prompts: the digits yardstick — N digits per row scored with a digit classifier (FD to the "
            "held-out real digits, accuracy, precision/recall and density/coverage: low recall at high precision = "
            "mode-seeking); rows: real (the best a generator can expect), teacher 50/4/1-step DDIM and, with --lora, "
            "the student and student + Distillation++ beside its noise-only control."
        ),
    )
    parser.add_argument("--teacher", help="teacher Hub id, diffusers folder or single-file .safetensors (default: the "
                        "student run's; without --prompts: the digits teacher)")  # fmt: skip
    parser.add_argument("--lora", help="student: a run directory, its lora/ directory or a .safetensors file")
    parser.add_argument(
        "--guidance-scale", "--teacher-cfg", type=float, default=None,
        help="teacher CFG scale (default: the student run's, else the family's: SD1.5 1.75, SDXL 8; digits 2.0)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")

    group = parser.add_argument_group("any SD1.5/SDXL teacher (with --prompts)")
    group.add_argument("--prompts", help="prompts file: .txt (one per line), .jsonl, .json, .csv or .tsv")
    group.add_argument("--images-per-prompt", type=int, help="images per prompt and row, each from its own noise, "
                       "the same in every row (default 1)")  # fmt: skip
    group.add_argument("--images", help="folder of real images: adds FD and precision/recall against them")
    group.add_argument("--teacher-steps", help=f"teacher DDIM steps, a comma list for several rows; the first is the "
                       f"reference (default {DEFAULT_TEACHER_STEPS})")  # fmt: skip
    group.add_argument(
        "--distillpp", action="append", metavar="NAME:lam=L,steps=K,rule=R,cfg=W,teacher_steps=M",
        help="a student + Distillation++ row (repeatable; every part optional, defaults: the authors' DMD2 setting, "
        "eps_mix, λ 0.01, 2 steps, teacher CFG 7.5), with its noise-only control row NAME_control",
    )  # fmt: skip
    group.add_argument("--metric-model", help=f"DINOv2 (or CLIP) Hub id or folder whose features the Fréchet distance "
                       f"and precision/recall use (default {DEFAULT_METRIC_MODEL})")  # fmt: skip
    group.add_argument("--clip-model", help=f"CLIP Hub id or folder for the CLIP score and FD_CLIP (default "
                       f"{DEFAULT_CLIP_MODEL})")  # fmt: skip
    group.add_argument("--teacher-config", help="with a single-file --teacher: a diffusers folder or Hub id of the "
                       "same architecture (default: the run's)")  # fmt: skip
    group.add_argument("--teacher-lora", action="append", metavar="FILE[:SCALE]",
                       help="style LoRA fused into the teacher (default: the run's; 'none' for the plain base)")
    group.add_argument("--resolution", type=int, help="image size (default: the run's, else the model's)")
    group.add_argument("--batch-size", type=int, help="images per UNet batch (default 8)")
    group.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on cuda, else "
                       "float32; the metric models run in float32")  # fmt: skip
    group.add_argument("--out", help="report folder (default fewstep-eval)")

    digits = parser.add_argument_group("the digits yardstick (without --prompts)")
    defaults = DistillppSettings()
    digits.add_argument("--n", type=int, help="images per row, a multiple of 10 (default 500)")
    digits.add_argument("--distillpp-lambda", type=float,
                        help=f"student_distillpp row: the rule's step size λ in [0, 1] (default {defaults.lam})")
    digits.add_argument("--distillpp-steps", type=int,
                        help=f"student_distillpp row: teacher-guided steps (default {defaults.guided_steps})")
    digits.add_argument(
        "--distillpp-rule", choices=RULES,
        help="student_distillpp row: x0_lerp (the paper: x̂0 ← lerp(x̂0_student, x̂0_teacher, λ)) or eps_mix (the "
        f"authors' code: noise predictions mixed with weight λ) (default {defaults.rule})",
    )  # fmt: skip
    digits.add_argument("--distillpp-teacher-cfg", type=float,
                        help="student_distillpp row: the guiding teacher's CFG scale (default: --guidance-scale)")
    digits.add_argument(
        "--distillpp-guide", choices=list(GUIDES),
        help="student_distillpp row: what guides the student: the teacher at the re-noised x̂0 (Distillation++), "
        "the student itself, noise (the control: the rule's injected noise, no teacher call) or the teacher at the "
        f"student's own input (default {defaults.guide}). The student_distillpp_control row always uses noise",
    )  # fmt: skip
    digits.add_argument(
        "--distillpp-teacher-steps", type=int,
        help="student_distillpp row: DDIM steps the teacher takes from its input to its x̂0 (1: the paper's single "
        f"call) (default {defaults.teacher_steps})",
    )  # fmt: skip
    parser.set_defaults(func=cmd_eval)
