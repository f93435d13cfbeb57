"""``fewstep eval``: the quality yardstick (FD, prompt accuracy, variety) on the digits teacher and a student LoRA."""

from __future__ import annotations

import argparse

ORDER = 40


def cmd_eval(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from ..cli import UserError
    from ..digits.teacher import digits_teacher
    from ..digits.yardstick import DistillppSettings, balanced_labels, evaluate, format_table

    balanced_labels(args.n)  # validate before loading anything
    distillpp = DistillppSettings(
        lam=args.distillpp_lambda, guided_steps=args.distillpp_steps, rule=args.distillpp_rule,
        teacher_guidance_scale=args.distillpp_teacher_cfg, guide=args.distillpp_guide,
        teacher_steps=args.distillpp_teacher_steps,
    )  # fmt: skip
    json_path = Path(args.json) if args.json else None
    if json_path is not None and json_path.is_dir():
        raise UserError(f"--json {json_path} is a directory; give a file name")
    if args.teacher is None:
        args.teacher = str(digits_teacher())
    result = evaluate(
        args.teacher,
        lora=args.lora,
        n=args.n,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        distillpp=distillpp,
    )
    print(format_table(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")


def register(sub) -> None:
    from ..core.distillpp import RULES
    from ..digits.yardstick import GUIDES, DistillppSettings

    parser = sub.add_parser(
        "eval",
        help="the quality yardstick: FD, accuracy and variety of teacher and student on the digits teacher",
        description=(
            "Generate N digits per row (N/10 per digit) and score them with a digit classifier trained on real "
            "digits: FD (Fréchet distance of classifier features to the held-out real digits; lower is better), "
            "accuracy (fraction read as the prompted digit), and precision/recall and density/coverage (k-NN manifolds "
            "of the same features, equal-size sets per digit; low recall at high precision = mode-seeking). Rows: "
            "real (train vs held-out: the best a generator can expect), teacher 50/4/1-step DDIM "
            "and, with --lora, student 1/4-step and student + Distillation++ beside its noise-only control."
        ),
    )
    parser.add_argument("--teacher", help="digits teacher folder (default: the cached one, built if missing)")
    parser.add_argument("--lora", help="student: a run directory, its lora/ directory or a .safetensors file")
    parser.add_argument("--n", type=int, default=500, help="images per row, a multiple of 10 (default: %(default)s)")
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="teacher CFG scale (default: the student run's, else 2.0)"
    )
    distillpp = DistillppSettings()
    parser.add_argument(
        "--distillpp-lambda", type=float, default=distillpp.lam,
        help="student_distillpp row: the rule's step size λ in [0, 1] (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--distillpp-steps", type=int, default=distillpp.guided_steps,
        help="student_distillpp row: teacher-guided steps (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--distillpp-rule", choices=RULES, default=distillpp.rule,
        help="student_distillpp row: x0_lerp (the paper: x̂0 ← lerp(x̂0_student, x̂0_teacher, λ)) or eps_mix (the "
        "authors' code: noise predictions mixed with weight λ) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--distillpp-teacher-cfg", type=float, default=distillpp.teacher_guidance_scale,
        help="student_distillpp row: the guiding teacher's CFG scale (default: the distillation's, --guidance-scale)",
    )  # fmt: skip
    parser.add_argument(
        "--distillpp-guide", choices=list(GUIDES), default=distillpp.guide,
        help="student_distillpp row: what guides the student: the teacher at the re-noised x̂0 (Distillation++), "
        "the student itself, noise (the control: the rule's injected noise, no teacher call) or the teacher at the "
        "student's own input (default: %(default)s). The student_distillpp_control row always uses noise",
    )  # fmt: skip
    parser.add_argument(
        "--distillpp-teacher-steps", type=int, default=distillpp.teacher_steps,
        help="student_distillpp row: DDIM steps the teacher takes from its input to its x̂0 (1: the paper's single "
        "call) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.set_defaults(func=cmd_eval)
