"""Progressive Distillation's gradient per student step at the start of a round, on the digits teacher.

PD's loss (``core.progressive_loss``) is an x-space MSE weighted max(SNR_t, 1). The digits student, like SD, is an
ε-model read as x̂0 = (z_t − σ_t ε̂) / α_t, so an error δ in ε̂ is an x-space error (σ_t/α_t)·δ and the loss weighs
it max(SNR_t, 1) / SNR_t = max(1, 1/SNR_t): on SD's schedule 214 at t = 999 and 1 at t = 249. Does the t = 999 step
then dominate the round's updates? This runs the trainer's own PD loop (``fewstep train --method progressive``) for
one 4-step round, round 0 (teacher: the base UNet with CFG; student: the base plus a zero LoRA, no CFG), at a
learning rate of 1e-12 so the weights stay where the round starts, and records for every iteration the student step
it drew, its loss and the generator's gradient norm (before clipping at ``max_grad_norm``)::

    python -m fewstep.benchmarks.pd_gradients --out pd-gradients --iterations 200 --seeds 0 1 2

Rows: each student timestep t, its ε-space weight max(1, 1/SNR_t), the mean ± sd of the gradient norm and of the
loss over that step's iterations (all seeds), and its share of the summed squared gradient norm (what Adam's second
moment, and clipping, see).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from . import script_main

HELP = "Progressive Distillation: gradient norm per student step at the start of a 4-step round (digits teacher)"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="fewstep-pd-gradients", help="output folder (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=200, help="iterations per seed (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--num-steps", type=int, default=4, help="the round's student steps (default: %(default)s)")
    parser.add_argument(
        "--start-steps", type=int, default=None,
        help="the run's first round (default: --num-steps, i.e. round 0, whose teacher is the base with CFG; twice "
        "--num-steps: the measured round's teacher is the previous round's student, here equal to the student)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: the demo's, %(default)s)")
    parser.add_argument("--num-pairs", type=int, default=256, help="teacher samples noised as inputs (default: 256)")
    parser.add_argument("--teacher", help="a built digits teacher folder (default: the cached one)")


def _record_seed(args, seed: int, teacher, prompts: Path, out: Path) -> list[dict]:
    """The ``--num-steps`` round's iterations at ``seed``: [{"step_index", "grad_norm", "loss"}] per iteration."""
    from ..digits.demo_settings import DigitsDemoSettings
    from ..training.loop.trainer import train
    from ..training.methods import get_method
    from ..training.methods.progressive import ProgressiveTrainConfig, round_step_counts

    settings = DigitsDemoSettings()
    start_steps = args.start_steps or args.num_steps
    rounds = len(round_step_counts(start_steps, args.num_steps))
    config = ProgressiveTrainConfig(
        output=str(out / f"run-seed{seed}"), teacher=str(teacher), prompts=str(prompts), seed=seed,
        start_steps=start_steps, end_steps=args.num_steps, max_steps=args.iterations * rounds, lr=1e-12,
        warmup_steps=0,
        batch_size=args.batch_size, guidance_scale=settings.guidance_scale, gen_rank=settings.rank,
        gen_alpha=float(settings.rank), num_pairs=args.num_pairs, pair_steps=settings.pair_steps, checkpoint_every=0,
        validate_every=0, mixed_precision="no",
    )  # fmt: skip
    records = []

    def on_step(step, metrics):
        if metrics["round_steps"] == args.num_steps:
            records.append({"step_index": int(metrics["student_step"]), "grad_norm": metrics["grad_norm_gen"],
                            "loss": metrics["loss_pd"]})  # fmt: skip

    train(get_method("progressive"), config, on_step=on_step, overwrite=True)
    return records


def summarise(records: list[dict], num_steps: int, schedule) -> list[dict]:
    """Per student step: t, ε-space weight, gradient norm and loss (mean ± sd), share of the squared gradient."""
    from ..training.methods.progressive import pd_timesteps

    total_squared = sum(r["grad_norm"] ** 2 for r in records)
    rows = []
    for index, t in enumerate(pd_timesteps(num_steps)[0]):
        mine = [r for r in records if r["step_index"] == index]
        if not mine:
            continue
        alpha_bar = float(schedule.alphas_cumprod[t])
        snr = alpha_bar / (1 - alpha_bar)
        sd = lambda values: statistics.stdev(values) if len(values) > 1 else 0.0
        norms, losses = [r["grad_norm"] for r in mine], [r["loss"] for r in mine]
        rows.append({
            "t": t, "eps_weight": max(1.0, 1.0 / snr), "iterations": len(mine),
            "grad_norm": statistics.mean(norms), "grad_norm_sd": sd(norms),
            "loss": statistics.mean(losses), "loss_sd": sd(losses),
            "squared_grad_share": sum(n**2 for n in norms) / total_squared,
        })  # fmt: skip
    return rows


def run(args) -> dict:
    from ..core.schedule import NoiseSchedule
    from ..digits.teacher import digits_teacher, write_digit_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher) if args.teacher else digits_teacher()
    prompts = write_digit_prompts(out / "prompts.txt")
    per_seed = {seed: _record_seed(args, seed, teacher, prompts, out) for seed in args.seeds}
    records = [r for seed_records in per_seed.values() for r in seed_records]
    schedule = NoiseSchedule.from_config(json.loads((teacher / "scheduler" / "scheduler_config.json").read_text()))
    result = {"rows": summarise(records, args.num_steps, schedule), "per_seed": per_seed, "seeds": list(args.seeds),
              "iterations": args.iterations, "batch_size": args.batch_size, "num_steps": args.num_steps,
              "start_steps": args.start_steps or args.num_steps}  # fmt: skip
    (out / "pd_gradients.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict) -> str:
    header = f"{'t':>5}{'ε weight':>10}{'iters':>7}{'grad norm':>20}{'loss':>22}{'share of Σ|g|²':>16}"
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        norm = f"{r['grad_norm']:.4g} ± {r['grad_norm_sd']:.2g}"
        loss = f"{r['loss']:.4g} ± {r['loss_sd']:.2g}"
        share = r["squared_grad_share"]
        lines.append(f"{r['t']:>5}{r['eps_weight']:>10.1f}{r['iterations']:>7}{norm:>20}{loss:>22}{share:>16.3f}")
    teacher = "the base with CFG" if result["start_steps"] == result["num_steps"] else "the previous round's student"
    lines.append(
        f"(the {result['num_steps']}-step round of a PD run from {result['start_steps']} steps, teacher {teacher}, at "
        f"lr 1e-12: the weights of the round's start; batch "
        f"{result['batch_size']}, {result['iterations']} iterations × seeds {', '.join(map(str, result['seeds']))})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return script_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
