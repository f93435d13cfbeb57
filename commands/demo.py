"""``fewstep demo``: the main job on the embedded default."""

from __future__ import annotations

import argparse
import json

from ..cli import out_dir

ORDER = 0

def _demo_exact(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from ..toy.exact_teacher import ExactTeacherConfig, train_exact_teacher
    from ..toy.plot import scatter_png

    out = out_dir(args.out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = ExactTeacherConfig(num_steps=args.steps, iterations=args.iterations, seed=args.seed)
    print(
        f"fewstep demo --exact: DMD2 distils a {config.num_steps}-step MLP student from an exact 8-mode "
        f"Gaussian-mixture teacher ({config.iterations} iterations, fake:generator updates "
        f"{config.dfake_gen_update_ratio}:1)."
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
    print(f"{'':28}{'sliced W1 to data':>18}")
    print(f"{'data vs data (floor)':28}{result.swd_data_floor:>18.4f}")
    print(f"{'teacher 50-step DDIM':28}{result.swd_teacher_50:>18.4f}")
    print(f"{'student ' + str(config.num_steps) + '-step':28}{result.swd_student:>18.4f}")
    print(f"modes covered (≥5% of samples each): {result.modes_covered}/{config.num_modes}")
    print(f"wrote {out / 'samples.png'} and {out / 'metrics.json'}")


def cmd_demo(args: argparse.Namespace) -> None:
    _demo_exact(args)


def register(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the main job end to end on the embedded default",
        description="DMD2 on an exact 2-D Gaussian-mixture teacher: writes samples.png and metrics.json.",
    )
    demo.add_argument("--exact", action="store_true", help="the exact Gaussian-mixture teacher (the default for now)")
    demo.add_argument("--out", default="fewstep-demo", help="output directory (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=1, help="student sampling steps (default: %(default)s)")
    demo.add_argument("--iterations", type=int, default=6000, help="DMD2 iterations (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
