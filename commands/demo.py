"""``fewstep demo``: the main job on the embedded default.

Default: the digits teacher (a tiny Stable Diffusion built from scikit-learn's digits, cached) → DMD2 on one shared
base UNet with the GAN loss on the real training digits → the yardstick (FD, accuracy, precision/recall,
density/coverage) → a sample grid, the metrics and the LoRA files. ``--exact``: DMD2 on an exact 2-D
Gaussian-mixture teacher (a few minutes on one core; fidelity and variety against the data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from ..cli import UserError, out_dir, resolve_device
from ..digits.demo_settings import QUICK, DigitsDemoSettings

ORDER = 0


# --------------------------------------------------------------------------- the digits demo
class _Stages:
    """Prints what the demo is doing, how long each stage took and roughly how long is left."""

    def __init__(self, estimates: dict[str, float]):
        self.estimates, self.start, self.done = estimates, time.perf_counter(), []

    def begin(self, name: str, what: str) -> None:
        left = sum(v for k, v in self.estimates.items() if k not in self.done)
        print(f"\n[{len(self.done) + 1}/{len(self.estimates)}] {what} (about {left / 60:.0f} min left in the demo)")
        self._stage, self._t = name, time.perf_counter()

    def end(self) -> None:
        self.done.append(self._stage)
        print(f"    done in {time.perf_counter() - self._t:.0f} s")


def _demo_digits(args: argparse.Namespace) -> None:
    from ..digits.teacher import DigitsTeacherConfig, cached_train_images, digits_teacher, write_digit_prompts
    from ..training.methods import get_method
    from ..training.loop.trainer import train
    from ..digits.yardstick import (
        default_rows, digit_classifier, evaluate, format_table, load_digits_model, save_digits_grid,
    )  # fmt: skip

    out = out_dir(args.out)
    method = get_method(args.method)
    settings = DigitsDemoSettings(**(QUICK if args.quick else {}))
    if args.max_steps is not None:
        settings.max_steps = args.max_steps
    if args.no_gan:
        settings.gan_weight = 0.0
    teacher_config = (
        DigitsTeacherConfig(seed=args.seed, vae_iterations=2, unet_iterations=2, batch_size=8)
        if args.quick
        else DigitsTeacherConfig(seed=args.seed)
    )
    # The default teacher ships with fewstep (unpacked in seconds on the first run); a --seed other than 0 builds
    # one (~15 min, announced by the build itself). The estimate covers the rest.
    stages = _Stages({"teacher": 0, "distill": 30 if args.quick else 240, "eval": 60})
    print(
        f"fewstep demo: distil the digits teacher (a tiny Stable Diffusion) into a {args.num_steps}-step student "
        f"with {method.title} on one shared UNet{' + GAN on the real digits' if method.demo_gan(settings) else ''}; "
        f"outputs in {out}"
    )

    stages.begin("teacher", "digits teacher: the cached one, else the shipped one (seed 0) or a new build (other seeds)")
    teacher_dir = digits_teacher(teacher_config, device=args.device)
    classifier = digit_classifier()
    real_dir = cached_train_images()
    prompts = write_digit_prompts(out / "prompts.txt")
    stages.end()

    stages.begin("distill", f"{method.title} distillation: {settings.max_steps} iterations")
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo always starts fresh; real runs use `fewstep train --resume`
    config = settings.train_config(teacher_dir, run_dir, prompts, real_dir, args.num_steps, args.seed, args.method)
    train(method, config)
    stages.end()

    stages.begin("eval", f"the yardstick: FD, accuracy and variety of {settings.eval_n} images per row")
    metrics = evaluate(
        teacher_dir, lora=run_dir, n=settings.eval_n, guidance_scale=settings.guidance_scale, seed=args.seed,
        classifier=classifier, device=args.device, rows=method.demo_rows,
    )  # fmt: skip
    metrics["settings"] = {**settings.__dict__, "num_steps": args.num_steps}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    model = load_digits_model(teacher_dir, run_dir)
    grid_rows = method.demo_grid_rows or [  # None: the teacher at comparable steps, then the student's own rows
        "teacher_50", "teacher_4" if args.num_steps > 1 else "teacher_1",
        *(row for row in default_rows(model.student) if row.startswith("student")),
    ]  # fmt: skip
    save_digits_grid(model, grid_rows, out / "samples.png", seed=args.seed)
    lora_out = out / "lora"
    if lora_out.exists():
        shutil.rmtree(lora_out)
    shutil.copytree(run_dir / "lora", lora_out)
    stages.end()

    print()
    print(format_table(metrics))
    print(f"\nwrote {out / 'samples.png'}, {out / 'metrics.json'} and {lora_out}/ (LoRA for diffusers and ComfyUI)")


# --------------------------------------------------------------------------- the exact-teacher demo
def _demo_exact(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from ..toy.exact_teacher import ExactTeacherConfig, format_table, train_exact_teacher
    from ..toy.plot import scatter_png

    out = out_dir(args.out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    iterations = args.max_steps or (200 if args.quick else ExactTeacherConfig.iterations)
    config = ExactTeacherConfig(num_steps=args.num_steps, iterations=iterations, seed=args.seed)
    print(
        f"fewstep demo --exact: DMD2 distils a {config.num_steps}-step MLP student from an exact 8-mode "
        f"Gaussian-mixture teacher ({config.iterations} iterations at batch {config.batch_size}, fake:generator "
        f"updates {config.dfake_gen_update_ratio}:1)."
    )
    with tqdm(total=config.iterations, desc="DMD2", unit="it") as bar:

        def progress(metrics: dict) -> None:
            bar.update(1)
            if "loss_dm" in metrics:
                bar.set_postfix(loss_dm=f"{metrics['loss_dm']:.4f}", loss_fake=f"{metrics['loss_fake']:.4f}")

        result = train_exact_teacher(config, progress=progress)
    metrics = result.metrics()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    scatter_png(
        out / "samples.png",
        [
            ("data", result.data_samples),
            ("teacher, 50-step DDIM", result.teacher_samples),
            (f"DMD2 student, {config.num_steps} step(s)", result.student_samples),
        ],
    )
    print()
    print(format_table(result))
    print(f"wrote {out / 'samples.png'} and {out / 'metrics.json'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from ..training.methods import get_method

    if args.num_steps < 1:
        raise UserError(f"--num-steps must be ≥ 1, got {args.num_steps}")
    if args.exact and args.method != "dmd2":
        raise UserError(f"--exact runs DMD2 on the Gaussian-mixture teacher; drop --method {args.method}")
    steps_error = get_method(args.method).demo_steps_error(args.num_steps)
    if steps_error:
        raise UserError(steps_error)
    args.device = resolve_device(args.device)
    (_demo_exact if args.exact else _demo_digits)(args)


def register(sub) -> None:
    from ..training.methods import registered_methods

    demo = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded default (the digits teacher)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", default="fewstep-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--exact", action="store_true", help="the exact Gaussian-mixture teacher instead of the digits")
    methods = registered_methods()
    steps = "".join(f"; {name}: {method.demo_steps}" for name, method in methods.items() if method.demo_steps)
    demo.add_argument(
        "--method", choices=list(methods), default="dmd2",
        help=f"distillation method (default: %(default)s{steps})",
    )  # fmt: skip
    demo.add_argument("--num-steps", type=int, default=1, help="student sampling steps (default: %(default)s)")
    demo.add_argument("--no-gan", action="store_true", help="distil without the GAN loss on real digits")
    demo.add_argument("--max-steps", type=int, default=None, help="distillation iterations (default: the demo's)")
    demo.add_argument("--quick", action="store_true", help="a tiny budget to check the whole path (CI); no quality")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the run (default: %(default)s)")
    demo.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="where the teacher build and the yardstick run; training uses the GPU whenever one is visible "
        "(default: %(default)s = cuda if available)",
    )  # fmt: skip
    demo.set_defaults(func=cmd_demo)
