"""``fewstep bench curves``: learning curves of the digits demo's students on the yardstick, against iterations.

Each (variant, seed) distils the digits teacher with the demo's settings (``digits/demo_settings.py``) to the largest
of ``--iterations``, keeping a checkpoint at every point; each point's student (its exported LoRA, EMA weights as
the demo ships) is then measured at its own steps (FD, accuracy and, where the yardstick reports them, precision,
recall, density and coverage). The first and last points use ``--n`` images, the middle ones ``--n-middle``. The
lr schedule is the demo's (constant after warm-up), so a point's student is the one a run of that length makes.
Runs go in parallel processes (``--jobs``, one torch thread each). Writes ``OUT/curves.json`` and
``OUT/curves.png`` (FD against iterations, ± sd over seeds).

    fewstep bench curves --out curves --iterations 600 1200 2400 6000 --seeds 0 1 2 --n 2000 --jobs 2

``--resume`` continues the runs already in ``--out`` (one more point, another seed) instead of starting over.

Every point measured with ``--n`` images is set against the 50-step teacher at the same seeds and n (``fd ÷ T``,
``recall ÷ T``: the student's mean over the teacher's). For the shipped digits teacher that row comes from its
record (``digits/shipped_teacher/fewstep_yardstick.json``, n = 2,000 at seeds 0, 1, 2) when this machine's yardstick
classifier scores the record's real row alike (the classifier is trained on first use, and its weights differ between
CPUs); ``--measure-teacher`` measures it in this process instead (about 9 minutes per seed at n = 2,000 on one CPU
thread).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from functools import reduce
from pathlib import Path

from . import mean_sd_cells

HELP = "learning curves: the demo's DMD2 1-/4-step and DMD students' FD, accuracy and recall against iterations"
# variant → (method, student steps)
VARIANTS = {"DMD2 1-step": ("dmd2", 1), "DMD2 4-step": ("dmd2", 4), "DMD 1-step": ("dmd", 1)}
DEFAULT_POINTS = [600, 1200, 2400, 6000]
METRICS = ("fd", "acc", "precision", "recall", "density", "coverage")
BASELINE_ROW = "teacher_50"  # the yardstick row the students are set against


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="fewstep-bench-curves", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
        help=f"which students ({', '.join(VARIANTS)}; default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--iterations", type=int, nargs="+",
        help=f"the points of the curve, in iterations (default: {' '.join(map(str, DEFAULT_POINTS))}; 2 4 with --quick)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="distillation/eval seeds (default: 0)")
    parser.add_argument("--n", type=int, default=2000, help="images at the first and last points (default: 2000)")
    parser.add_argument("--n-middle", type=int, default=500, help="images at the middle points (default: 500)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: %(default)s)")
    parser.add_argument("--device", help="yardstick device (default: cuda when available, else cpu)")
    parser.add_argument("--teacher", help="a built digits teacher folder (default: the cached one)")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the runs already in --out from their newest checkpoints (a longer --iterations extends them) "
        "and reuse the points they already measured",
    )  # fmt: skip
    parser.add_argument(
        "--measure-teacher", action="store_true",
        help="measure the 50-step teacher at --n and every seed in this process (about 9 minutes per seed at n = "
        "2,000 on one CPU thread) instead of reading the shipped teacher's record; needed for --teacher and where "
        "this machine's yardstick classifier differs from the record's",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny teacher and runs: checks the path, no quality")


def check_iterations(iterations: list[int]) -> list[int]:
    points = sorted(set(iterations))
    if not points or points[0] < 1:
        raise ValueError(f"--iterations must be positive, got {iterations}")
    return points


def checkpoint_spacing(points: list[int]) -> int:
    """The checkpoint interval that lands on every point: their greatest common divisor."""
    return reduce(math.gcd, points)


def run_curve(job: dict) -> list[dict]:
    """One (variant, seed): train to the last point, then measure each point's checkpoint. → one row per point.

    With ``job["resume"]`` a run already in ``run_dir`` is continued from its newest checkpoint (a longer
    ``--iterations`` extends it: the lr schedule is constant after warm-up, so the continued run is the one a longer
    run makes) and points already measured with the same ``n`` are read back from ``run_dir/curve_points.json``.
    """
    import dataclasses

    import torch

    from ..digits.demo_settings import QUICK, DigitsDemoSettings
    from ..digits.yardstick import evaluate
    from ..training.methods import get_method
    from ..training.loop.trainer import train
    from ..training.publish.export import export_run

    torch.set_num_threads(1)  # parallel jobs with torch's default threads oversubscribe the cores
    points, run_dir = job["points"], Path(job["run_dir"])
    method, num_steps = VARIANTS[job["variant"]]
    spacing = checkpoint_spacing(points)
    settings = dataclasses.replace(DigitsDemoSettings(**(QUICK if job["quick"] else {})), max_steps=points[-1])
    config = settings.train_config(job["teacher"], run_dir, job["prompts"], job["real_dir"], num_steps, job["seed"],
                                   method)  # fmt: skip
    config = dataclasses.replace(config, checkpoint_every=spacing, checkpoints_total_limit=points[-1] // spacing)
    done = _reached_step(run_dir) if job.get("resume") else 0
    ledger = _Ledger(run_dir) if done else _Ledger(run_dir, fresh=True)
    if done < points[-1]:
        started = time.perf_counter()
        train(get_method(method), config, resume=done > 0, overwrite=done == 0)
        ledger.trained(done, points[-1], time.perf_counter() - started)
    rows = []
    for point in points:
        n = job["n"] if point in (points[0], points[-1]) else job["n_middle"]
        scores = ledger.scores(point, n)
        if scores is None:
            lora = run_dir / f"lora-step-{point}"
            export_run(run_dir, "diffusers", str(point), str(lora))
            result = evaluate(job["teacher"], lora=lora, n=n, seed=job["seed"], rows=["student"], progress=False,
                              device=job["device"], guidance_scale=settings.guidance_scale)  # fmt: skip
            scores = ledger.measured(point, n, {k: v for k, v in result["rows"]["student"].items() if k in METRICS})
        rows.append(dict(variant=job["variant"], seed=job["seed"], iterations=point, n=n, **scores,
                         train_seconds=ledger.seconds_at(point)))  # fmt: skip
    return rows


def _reached_step(run_dir: Path) -> int:
    """The step of the run's newest complete checkpoint (0 when there is no run to continue)."""
    from ..training.loop.run_dir import RunDirError, checkpoint_step, latest_complete_checkpoint

    try:
        checkpoint = latest_complete_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    except RunDirError:  # every checkpoint damaged: start over
        return 0
    return checkpoint_step(checkpoint) if checkpoint is not None else 0


class _Ledger:
    """``run_dir/curve_points.json``: the training seconds of each stretch of the run and the points measured, so a
    resumed curve neither retrains nor re-measures what it has."""

    def __init__(self, run_dir: Path, fresh: bool = False):
        self.path = run_dir / "curve_points.json"
        saved = {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())
        self.stretches: list[list[float]] = saved.get("stretches", [])  # [from step, to step, seconds]
        self.points: dict[str, dict] = saved.get("points", {})

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"stretches": self.stretches, "points": self.points}, indent=1) + "\n")

    def trained(self, start: int, end: int, seconds: float) -> None:
        """Steps ``start`` → ``end`` took ``seconds``; what was recorded past ``start`` (a lost checkpoint's
        stretch) is cut off there."""
        kept = [[a, min(b, start), round(t * (min(b, start) - a) / (b - a), 1)] for a, b, t in self.stretches if a < start]
        self.stretches = kept + [[start, end, round(seconds, 1)]]
        self.points = {key: v for key, v in self.points.items() if int(key.split(":")[0]) <= start}
        self._save()

    def seconds_at(self, step: int) -> float:
        """Training seconds to ``step`` (a stretch's time spread evenly over its iterations)."""
        total = sum(seconds * (min(step, end) - start) / (end - start) for start, end, seconds in self.stretches
                    if step > start and end > start)  # fmt: skip
        return round(total, 1)

    def scores(self, point: int, n: int) -> dict | None:
        return self.points.get(f"{point}:{n}")

    def measured(self, point: int, n: int, scores: dict) -> dict:
        self.points[f"{point}:{n}"] = scores
        self._save()
        return scores


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sd over seeds per (variant, iterations)."""
    from ..digits.yardstick import mean_sd

    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["iterations"]), []).append(row)
    table = []
    for (variant, iterations), group in groups.items():
        entry = {"variant": variant, "iterations": iterations, "n": group[0]["n"], "seeds": len(group)}
        for metric in METRICS:
            if all(metric in r for r in group):
                entry[metric], entry[f"{metric}_sd"] = (round(v, 4) for v in mean_sd(r[metric] for r in group))
        entry["train_seconds"] = round(mean_sd(r["train_seconds"] for r in group)[0], 1)
        table.append(entry)
    return sorted(table, key=lambda e: (list(VARIANTS).index(e["variant"]), e["iterations"]))


def teacher_baseline(per_seed: list[dict], n: int, source: str) -> dict:
    """The 50-step teacher's row as mean ± sd over its seeds, the students' reference."""
    from ..digits.yardstick import mean_sd

    entry = {"row": BASELINE_ROW, "n": n, "seeds": [p["seed"] for p in per_seed], "source": source}
    for metric in METRICS:
        if all(metric in p for p in per_seed):
            entry[metric], entry[f"{metric}_sd"] = (round(v, 4) for v in mean_sd(p[metric] for p in per_seed))
    return entry


def against_teacher(rows: list[dict], baseline: dict | None) -> list[dict]:
    """Each row measured at the baseline's n gains ``fd_vs_teacher`` and ``recall_vs_teacher`` (its mean over the
    teacher's: FD ≤ 1 and recall ≥ 0.9 are issue 27's targets); FD at another n is biased differently, so those
    rows get none."""
    for row in rows:
        if baseline is None or row["n"] != baseline["n"]:
            continue
        for metric in ("fd", "recall"):
            if metric in row and baseline.get(metric):  # a teacher scoring 0 (a --quick one's recall) sets no ratio
                row[f"{metric}_vs_teacher"] = round(row[metric] / baseline[metric], 3)
    return rows


def _baseline(args, teacher: str, n: int, guidance_scale: float, device: str) -> tuple[dict | None, str]:
    """(the teacher's row, or None; a line saying where it came from or why there is none)."""
    from ..digits.shipped import shipped_yardstick_row
    from ..digits.teacher import DigitsTeacherConfig, ships
    from ..digits.yardstick import evaluate

    if args.measure_teacher:
        per_seed = []
        for seed in args.seeds:
            result = evaluate(teacher, n=n, seed=seed, rows=[BASELINE_ROW], guidance_scale=guidance_scale,
                              device=device)  # fmt: skip
            per_seed.append({"seed": seed, **result["rows"][BASELINE_ROW]})
        return teacher_baseline(per_seed, n, "measured in this run"), "measured in this run"
    shipped = args.teacher is None and not args.quick and ships(DigitsTeacherConfig())
    per_seed = shipped_yardstick_row(BASELINE_ROW, n, args.seeds, guidance_scale) if shipped else None
    if per_seed is None:
        why = "not the shipped teacher" if not shipped else f"its record does not hold n = {n} at these seeds"
        return None, f"no teacher baseline ({why}); --measure-teacher measures it"
    if not _record_has_this_classifier(teacher, n, args.seeds[0], guidance_scale, device):
        why = ("the record was measured with another yardstick classifier: it is trained on first use and its "
               "weights differ between CPUs, which moves FD by about 1")
        return None, f"no teacher baseline ({why}); --measure-teacher measures it with this one"
    source = "the shipped teacher's record (fewstep_yardstick.json)"
    return teacher_baseline(per_seed, n, source), source


def _record_has_this_classifier(teacher: str, n: int, seed: int, guidance_scale: float, device: str) -> bool:
    """Whether the shipped record's ``real`` row (train digits against the held-out ones: no sampling, so only the
    classifier moves it) scores the same here, within 0.1%."""
    from ..digits.shipped import shipped_yardstick_row
    from ..digits.yardstick import evaluate

    recorded = shipped_yardstick_row("real", n, [seed], guidance_scale)
    if recorded is None:
        return False
    here = evaluate(teacher, n=n, seed=seed, rows=["real"], progress=False, device=device)["rows"]["real"]
    return abs(here["fd"] - recorded[0]["fd"]) <= 1e-3 * recorded[0]["fd"]


def run(args) -> dict:
    import multiprocessing

    from ..cli import resolve_device
    from ..digits.demo_settings import QUICK, DigitsDemoSettings
    from ..digits.teacher import DigitsTeacherConfig, cached_train_images, digits_teacher, write_digit_prompts
    from ..digits.yardstick import balanced_labels, digit_classifier

    points = check_iterations(args.iterations or ([2, 4] if args.quick else DEFAULT_POINTS))
    n, n_middle = (20, 20) if args.quick else (args.n, args.n_middle)
    balanced_labels(n), balanced_labels(n_middle)  # bad sizes fail before any training
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_config = (
        DigitsTeacherConfig(vae_iterations=2, unet_iterations=2, batch_size=8) if args.quick else DigitsTeacherConfig()
    )
    teacher = str(Path(args.teacher) if args.teacher else digits_teacher(teacher_config, device=device))
    digit_classifier()  # built once, before the workers need it
    guidance_scale = DigitsDemoSettings(**(QUICK if args.quick else {})).guidance_scale
    baseline, baseline_note = _baseline(args, teacher, n, guidance_scale, device)
    common = dict(teacher=teacher, prompts=str(write_digit_prompts(out / "prompts.txt")),
                  real_dir=str(cached_train_images()), points=points, n=n, n_middle=n_middle, device=device,
                  quick=args.quick, resume=args.resume)  # fmt: skip
    jobs = [
        {**common, "variant": variant, "seed": seed, "run_dir": str(out / "runs" / f"{variant.replace(' ', '_')}-seed{seed}")}
        for variant in args.variants for seed in args.seeds
    ]  # fmt: skip
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per job: no torch state shared across forks
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=context) as pool:
        rows = [row for result in pool.map(run_curve, jobs) for row in result]
    result = {"rows": against_teacher(summarise(rows), baseline), "per_seed": rows, "seeds": list(args.seeds),
              "teacher": teacher, BASELINE_ROW: baseline, "baseline_note": baseline_note}  # fmt: skip
    (out / "curves.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curves(result["rows"], out / "curves.png", baseline)
    print(f"wrote {out / 'curves.json'} and {out / 'curves.png'}")
    return result


def plot_curves(rows: list[dict], path: Path, baseline: dict | None = None) -> None:
    """FD against iterations, one line per variant (± sd bars), the 50-step teacher's FD as a horizontal line."""
    from .plots import line_plot

    lines: dict[str, list[tuple[float, float]]] = {}
    errors: dict[str, list[float]] = {}
    for row in rows:
        lines.setdefault(row["variant"], []).append((row["iterations"], row["fd"]))
        errors.setdefault(row["variant"], []).append(row.get("fd_sd", 0.0))
    references = {"teacher 50-step": baseline["fd"]} if baseline and "fd" in baseline else None
    line_plot(lines, path, "iterations (log scale)", "FD (lower is better)", errors=errors, references=references)


def format_table(result: dict) -> str:
    shown = [m for m in METRICS if all(m in r for r in result["rows"])]
    ratios = [m for m in ("fd_vs_teacher", "recall_vs_teacher") if any(m in r for r in result["rows"])]
    header = (f"{'variant':14}{'iterations':>11}{'n':>6}" + "".join(f"{m:>17}" for m in shown)
              + "".join(f"{m.replace('_vs_teacher', ' ÷ T'):>10}" for m in ratios) + f"{'train s':>9}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        cells = mean_sd_cells(r, shown) + "".join(f"{r[m]:>10.3f}" if m in r else f"{'—':>10}" for m in ratios)
        lines.append(f"{r['variant']:14}{r['iterations']:>11}{r['n']:>6}{cells}{r['train_seconds']:>9.0f}")
    lines.append(f"(seeds {', '.join(map(str, result['seeds']))}: mean ± sd; train s = the run's time to that point)")
    baseline = result.get(BASELINE_ROW)
    if baseline:
        scores = ", ".join(f"{m} {baseline[m]:.3f} ± {baseline[f'{m}_sd']:.3f}" for m in ("fd", "acc", "recall")
                           if m in baseline)  # fmt: skip
        lines.append(f"(T = the 50-step teacher at n = {baseline['n']}, seeds {', '.join(map(str, baseline['seeds']))}"
                     f": {scores}; from {baseline['source']}; ÷ T = the student's mean over the teacher's)")
    elif result.get("baseline_note"):
        lines.append(f"({result['baseline_note']})")
    return "\n".join(lines)
