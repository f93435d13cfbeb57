"""``fewstep bench methods``: DMD2, DMD and Progressive Distillation on the digits teacher, one yardstick.

Each method distils the cached digits teacher at the same wall-clock training budget (``--budget`` seconds per
run, teacher-pair generation included; PD gets as many iterations as DMD2 1-step made in its budget, split over
its rounds). Every student is then sampled at the steps, timesteps and sampler it was trained for (its LoRA's
``fewstep_recipe.json``) and measured with the yardstick (FD, accuracy, precision/recall, density/coverage) at
``--n`` images. Writes
``OUT/methods.json`` and ``OUT/fd_vs_steps.png`` (FD against sampling steps, one line per method).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = "DMD2, DMD and progressive distillation of the digits teacher at a matched budget (FD, accuracy, recall, time)"
TEACHER_ROWS = {"teacher_50": 50, "teacher_4": 4, "teacher_1": 1}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="fewstep-bench-methods", help="output folder (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per run (default: %(default)s)")
    parser.add_argument("--n", type=int, default=500, help="images per yardstick row (default: %(default)s)")
    parser.add_argument("--pd-start-steps", type=int, default=8, help="PD's first round (default: %(default)s)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0],
        help="seeds: every method is trained and measured once per seed; rows give mean ± sd (default: 0)",
    )  # fmt: skip
    parser.add_argument("--device", help="yardstick device (default: cuda when available, else cpu)")
    parser.add_argument("--teacher", help="a built digits teacher folder (default: the cached one)")
    parser.add_argument("--quick", action="store_true", help="tiny budget and teacher: checks the path, no quality")


def _common(settings, teacher_dir, prompts, seed: int) -> dict:
    """The options every method shares: the digits demo's tuned values (digits/demo_settings.py)."""
    return dict(
        teacher=str(teacher_dir), prompts=str(prompts), batch_size=settings.batch_size, lr=settings.lr,
        warmup_steps=settings.warmup_steps, guidance_scale=settings.guidance_scale, gen_rank=settings.rank,
        gen_alpha=float(settings.rank), checkpoint_every=0, validate_every=0, seed=seed,
        mixed_precision=settings.mixed_precision, max_steps=1_000_000,
    )  # fmt: skip


def _train(method_name: str, config, budget: float) -> tuple[Path, float, int]:
    """Train until the budget is spent (pairs included); → (run dir, training seconds, iterations)."""
    from ..training.methods import get_method
    from ..training.loop.trainer import train

    started = time.perf_counter()
    seen = []

    def on_step(step, metrics):
        seen.append(step)
        return time.perf_counter() - started >= budget

    run_dir = train(get_method(method_name), config, on_step=on_step)
    return run_dir, round(time.perf_counter() - started, 1), len(seen)


def run(args) -> dict:
    import dataclasses
    import shutil

    from ..cli import resolve_device
    from ..digits.demo_settings import QUICK, DigitsDemoSettings
    from ..digits.teacher import DigitsTeacherConfig, cached_train_images, digits_teacher, write_digit_prompts
    from ..digits.yardstick import digit_classifier

    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = DigitsDemoSettings(**(QUICK if args.quick else {}))
    budget, n = (5.0, 20) if args.quick else (args.budget, args.n)
    teacher_config = (
        DigitsTeacherConfig(vae_iterations=2, unet_iterations=2, batch_size=8) if args.quick else DigitsTeacherConfig()
    )
    teacher_dir = Path(args.teacher) if args.teacher else digits_teacher(teacher_config, device=device)
    context = dict(
        settings=settings, teacher_dir=teacher_dir, classifier=digit_classifier(), real_dir=cached_train_images(),
        prompts=write_digit_prompts(out / "prompts.txt"), budget=budget, n=n, device=device, quick=args.quick,
        pd_start_steps=args.pd_start_steps,
    )  # fmt: skip
    shutil.rmtree(out / "runs", ignore_errors=True)
    per_seed = {seed: _run_seed(seed, out / "runs" / f"seed{seed}", **context) for seed in args.seeds}
    result = {"rows": aggregate(list(per_seed.values())), "n": n, "budget_seconds": budget, "seeds": list(args.seeds),
              "settings": dataclasses.asdict(settings), "teacher": str(teacher_dir)}  # fmt: skip
    (out / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_fd_vs_steps(result["rows"], out / "fd_vs_steps.png")
    print(f"wrote {out / 'methods.json'} and {out / 'fd_vs_steps.png'}")
    return result


def _run_seed(
    seed: int, runs: Path, settings, teacher_dir, classifier, real_dir, prompts, budget, n, device, quick,
    pd_start_steps,
) -> list[dict]:  # fmt: skip
    """Every method trained and measured at one seed: the rows of the table."""
    from ..digits.yardstick import evaluate
    from ..training.publish.lora_files import RECIPE_FILE
    from ..training.methods.dmd import DMDTrainConfig
    from ..training.methods.dmd2 import DMD2TrainConfig
    from ..training.methods.progressive import ProgressiveTrainConfig, round_step_counts

    common = _common(settings, teacher_dir, prompts, seed)
    pairs = dict(num_pairs=20 if quick else 500, pair_steps=4 if quick else 25)
    fake = dict(settings.fake_score_options(), dfake_gen_update_ratio=settings.dfake_gen_update_ratio)  # the demo's
    measure = dict(n=n, seed=seed, classifier=classifier, progress=False, guidance_scale=settings.guidance_scale,
                   device=device)  # fmt: skip

    rows = []
    teacher = evaluate(teacher_dir, rows=list(TEACHER_ROWS), **measure)["rows"]
    for row, steps in TEACHER_ROWS.items():
        rows.append(dict(method="teacher (DDIM, CFG)", steps=steps, **_scores(teacher[row]), train_seconds=0.0))

    def measured(label: str, lora: Path, train_seconds: float, iterations: int) -> dict:
        result = evaluate(teacher_dir, lora=lora, rows=["student"], **measure)["rows"]["student"]
        recipe = json.loads((lora / RECIPE_FILE).read_text())
        return dict(method=label, steps=len(recipe["timesteps"]), **_scores(result), train_seconds=train_seconds,
                    iterations=iterations, timesteps=recipe["timesteps"])  # fmt: skip

    dmd2_iterations = 0
    for label, num_steps in (("DMD2", 1), ("DMD2 (backward simulation)", 4)):
        config = DMD2TrainConfig(
            output=str(runs / f"dmd2-{num_steps}"), num_steps=num_steps, images=str(real_dir),
            gan_weight=settings.gan_weight, disc_weight=settings.disc_weight, **fake, **pairs, **common,
        )  # fmt: skip
        run_dir, seconds, iterations = _train("dmd2", config, budget)
        dmd2_iterations = dmd2_iterations or iterations
        rows.append(measured(label, run_dir / "lora", seconds, iterations))
    config = DMDTrainConfig(
        output=str(runs / "dmd"), regression_weight=settings.dmd_regression_weight,
        **{**fake, "dfake_gen_update_ratio": 1}, **pairs, **common,
    )  # fmt: skip
    run_dir, seconds, iterations = _train("dmd", config, budget)
    rows.append(measured("DMD", run_dir / "lora", seconds, iterations))
    rounds = round_step_counts(pd_start_steps, 1)
    pd_common = {**common, "max_steps": max(len(rounds), dmd2_iterations)}
    config = ProgressiveTrainConfig(
        output=str(runs / "progressive"), start_steps=pd_start_steps, end_steps=1, **pairs, **pd_common
    )
    run_dir, seconds, iterations = _train("progressive", config, float("inf"))
    for steps in rounds:
        rows.append(measured("PD", run_dir / "lora" / f"steps-{steps}", seconds, iterations))
    return rows


SCORES = {"fd": 2, "acc": 3, "precision": 3, "recall": 3, "density": 3, "coverage": 3}  # key → decimals kept


def aggregate(rows_per_seed: list[list[dict]]) -> list[dict]:
    """One row per (method, steps): each score as mean ± sd over seeds (``fd``, ``fd_sd``, …), seconds as means, the
    seeds' rows kept. Scores a row does not have (results from before the yardstick measured variety) are left out."""
    from ..digits.yardstick import mean_sd

    table = []
    for rows in zip(*rows_per_seed):
        mean = lambda key: round(mean_sd(r[key] for r in rows)[0], 2)
        row = {**rows[0], "train_seconds": mean("train_seconds"), "sample_seconds": mean("sample_seconds")}
        for key, decimals in SCORES.items():
            if all(key in r for r in rows):
                value, sd = mean_sd(r[key] for r in rows)
                row[key], row[f"{key}_sd"] = round(value, decimals + 1), round(sd, decimals + 1)
        table.append({**row, "per_seed": list(rows)})
    return table


def _scores(row: dict) -> dict:
    return {**{key: round(row[key], decimals) for key, decimals in SCORES.items()}, "sample_seconds": row["seconds"]}


def _mean_sd_cell(row: dict, key: str, decimals: int) -> str:
    """"12.34 ± 0.56", the mean alone for one seed's row, "—" where the row has no such score (older results)."""
    if key not in row:
        return "—"
    return f"{row[key]:.{decimals}f}" + (f" ± {row[key + '_sd']:.{decimals}f}" if f"{key}_sd" in row else "")


def format_table(result: dict) -> str:
    columns = (("FD", "fd", 2, 15), ("acc", "acc", 3, 15), ("recall", "recall", 2, 13), ("coverage", "coverage", 2, 13))
    header = f"{'method':28}{'steps':>6}" + "".join(f"{title:>{width}}" for title, _, _, width in columns)
    header += f"{'train s':>9}{'sample s':>10}"
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        cells = "".join(f"{_mean_sd_cell(r, key, decimals):>{width}}" for _, key, decimals, width in columns)
        lines.append(f"{r['method']:28}{r['steps']:>6}{cells}{r['train_seconds']:>9.0f}{r['sample_seconds']:>10.1f}")
    seeds = result.get("seeds") or [result.get("seed", 0)]
    lines.append(
        f"({result['n']} images per row and seed; seeds {', '.join(map(str, seeds))} (mean ± sd); training budget "
        f"{result['budget_seconds']:.0f} s per run)"
    )
    return "\n".join(lines)


def plot_fd_vs_steps(rows: list[dict], path: Path, size: tuple[int, int] = (640, 420)) -> None:
    """FD against sampling steps (log2 axis), one line per method."""
    from .plots import line_plot

    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        key = "DMD2" if r["method"].startswith("DMD2") else r["method"]
        lines.setdefault(key, []).append((r["steps"], r["fd"]))
    line_plot(lines, path, "sampling steps (log scale)", "FD (lower is better)", size)
