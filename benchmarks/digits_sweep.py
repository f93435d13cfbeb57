"""Sweep the digits demo's distillation settings on the yardstick: n images per row, several seeds, mean ± sd.

Each (variant, seed) distils the digits teacher with the demo's settings plus the variant's overrides into a
``--num-steps`` student (1: one step; more: DMD2's backward simulation), then measures it at its own timesteps (FD,
accuracy, precision/recall, density/coverage) at n images; the teacher's rows are measured once per seed. The summary
gives FD, accuracy, recall and coverage as mean ± sd over seeds (all six scores in ``results.json``).
``--distillpp NAME:SETTINGS`` also measures every trained student with Distillation++ (see below). Runs go in
parallel processes (``--jobs``, one torch thread each), so a GPU with many CPU cores runs a sweep in minutes.

    python -m fewstep.benchmarks.digits_sweep --out sweep/ --seeds 0 1 2 --n 2000 --jobs 12 \
        --variant "demo:" --variant "fake scale 1/8:fake_alpha=4" --variant "fake lr 2x:fake_lr=1e-3"

A variant is ``NAME:key=value,key=value`` over :class:`~fewstep.digits.demo_settings.DigitsDemoSettings` fields, and
``num_steps`` (that variant's student steps, instead of ``--num-steps``) and ``method`` (``fewstep train --method``:
dmd2, the default, dmd or progressive).
A Distillation++ setting is ``NAME:key=value,...`` over :class:`~fewstep.digits.yardstick.DistillppSettings`
(``lam``, ``guided_steps``, ``rule``, ``teacher_guidance_scale``; ``guide=student`` is the ablation where the
student guides itself), e.g. ``--distillpp "eps 0.02 cfg4:rule=eps_mix,
lam=0.02,teacher_guidance_scale=4"``; its rows are named ``VARIANT + NAME``.
``--reuse`` keeps a run that already finished in OUT (its LoRA and ``train_seconds.json``), so more Distillation++
settings can be measured on the same students later.
``--external "NAME:COMMAND"`` adds runs made by another program (e.g. an older fewstep, for a before/after table):
COMMAND is formatted with {seed}, {run_dir}, {teacher}, {prompts} and {images}, must leave a run directory (with
``lora/``) at {run_dir}, and is then measured exactly like the variants.
``--teacher DIR`` uses a built teacher folder (default: the cached default teacher, built on first use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TEACHER_ROWS = ["real", "teacher_50", "teacher_4", "teacher_1"]


def named_settings(text: str, what: str, known: list[str]) -> tuple[str, dict[str, str]]:
    """``"name:key=value,key=value"`` → (name, {key: value}); an unknown key is refused naming the known ones."""
    name, _, body = text.partition(":")
    values = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"{what} {name.strip()!r}: unknown setting {key!r}; known: {', '.join(known)}")
        values[key] = value
    return name.strip(), values


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name:key=value,..."`` over DigitsDemoSettings' fields (and ``num_steps``, ``method``) → (name, typed
    overrides)."""
    from ..digits.demo_settings import DigitsDemoSettings

    defaults = DigitsDemoSettings()
    # num_steps: default --num-steps; method: fewstep train's --method (default dmd2)
    known = [f.name for f in dataclasses.fields(DigitsDemoSettings)] + ["num_steps", "method"]
    name, values = named_settings(text, "variant", known)
    typed = {}
    for key, value in values.items():
        current = getattr(defaults, key, None)
        kind = type(current) if current is not None else (int if key in ("fake_rank", "num_steps") else float)
        typed[key] = value if key == "method" else kind(value)
    if "method" in typed:
        from ..training.methods import get_method

        try:
            get_method(typed["method"])
        except ValueError as error:
            raise SystemExit(f"variant {name!r}: {error}") from None
    return name, typed


def parse_distillpp(text: str) -> tuple[str, dict]:
    """``"name:lam=0.1,guided_steps=2,rule=eps_mix,teacher_guidance_scale=4"`` → (name, DistillppSettings fields)."""
    from ..digits.yardstick import DistillppSettings

    kinds = {"lam": float, "guided_steps": int, "rule": str, "teacher_guidance_scale": float, "guide": str,
             "teacher_steps": int}
    known = [f.name for f in dataclasses.fields(DistillppSettings)]
    name, values = named_settings(text, "Distillation++ setting", known)
    settings = {key: kinds[key](value) for key, value in values.items()}
    try:
        DistillppSettings(**settings)
    except ValueError as error:
        raise SystemExit(f"Distillation++ setting {name!r}: {error}") from None
    return name, settings


def run_directory(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name.replace(' ', '_').replace('/', '-')}-seed{seed}"


def student_row(num_steps: int) -> str:
    """The yardstick row of a ``num_steps`` student at its own timesteps (``student_1`` as in the earlier sweeps)."""
    return "student_1" if num_steps == 1 else "student"


def run_one(
    teacher: str, out: Path, name: str, overrides: dict, seed: int, n: int, device: str, external: str | None = None,
    num_steps: int = 1, reuse: bool = False, method: str = "dmd2",
) -> dict:  # fmt: skip
    """Distil with the demo's settings + ``overrides`` (or ``external``) at ``seed``; the student's row at n images."""
    from ..digits.demo_settings import DigitsDemoSettings
    from ..digits.teacher import cached_train_images
    from ..digits.yardstick import evaluate
    from ..training.loop.trainer import train
    from ..training.methods import get_method

    settings = dataclasses.replace(DigitsDemoSettings(), **overrides)
    run_dir = run_directory(out, name, seed)
    record = run_dir / "train_seconds.json"
    prompts = out / "prompts.txt"
    real_dir = cached_train_images()
    if reuse and record.is_file():
        train_seconds = json.loads(record.read_text())["train_seconds"]
    else:
        started = time.perf_counter()
        if external:
            command = external.format(seed=seed, run_dir=run_dir, teacher=teacher, prompts=prompts, images=real_dir)
            subprocess.run(command, shell=True, check=True, stdout=subprocess.DEVNULL)
        else:
            config = settings.train_config(teacher, run_dir, prompts, real_dir, num_steps, seed, method)
            train(get_method(method), config, overwrite=True)  # re-run anew
        train_seconds = round(time.perf_counter() - started, 1)
        record.write_text(json.dumps({"train_seconds": train_seconds}))
    row = student_row(num_steps)
    result = evaluate(teacher, lora=run_dir, n=n, seed=seed, rows=[row], progress=False, device=device)
    return {"variant": name, "seed": seed, "train_seconds": train_seconds, **result["rows"][row]}


def run_distillpp(teacher: str, out: Path, name: str, seed: int, n: int, device: str, label: str, settings: dict):
    """The trained student of (``name``, ``seed``) sampled with Distillation++ at ``settings``: its row at n images."""
    from ..digits.yardstick import DistillppSettings, evaluate

    run_dir = run_directory(out, name, seed)
    result = evaluate(teacher, lora=run_dir, n=n, seed=seed, rows=["student_distillpp"], progress=False,
                      device=device, distillpp=DistillppSettings(**settings))  # fmt: skip
    return {"variant": f"{name} + {label}", "seed": seed, "distillpp": settings, **result["rows"]["student_distillpp"]}


def _subprocess(args, job: dict) -> dict:
    import os

    command = [sys.executable, "-m", "fewstep.benchmarks.digits_sweep", "--out", job["out"], "--one", json.dumps(job)]
    # One thread per job: parallel jobs with torch's default threads each oversubscribe the cores and busy-wait.
    threads = os.environ.get("OMP_NUM_THREADS") or ("1" if args.jobs > 1 else "")
    environment = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        return {**job, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


SCORES = ("fd", "acc", "precision", "recall", "density", "coverage")


def summarise(results: list[dict]) -> dict:
    """Per variant (and the teacher rows): each score's mean ± sd over seeds (``fd_mean``, ``fd_sd``, …); a score
    missing from any of a variant's results (measured before the yardstick had it) is left out."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault(r["variant"], []).append(r)
    from ..digits.yardstick import mean_sd

    summary = {}
    for name, rows in groups.items():
        summary[name] = {"seeds": len(rows)}
        for key in SCORES:
            if all(key in r for r in rows):
                summary[name][f"{key}_mean"], summary[name][f"{key}_sd"] = mean_sd(r[key] for r in rows)
        summary[name]["train_seconds_mean"] = statistics.mean(r.get("train_seconds", 0.0) for r in rows)
    return summary


def _mean_sd_cell(summary_row: dict, key: str, decimals: int) -> str:
    if f"{key}_mean" not in summary_row:
        return "—"
    return f"{summary_row[f'{key}_mean']:.{decimals}f} ± {summary_row[f'{key}_sd']:.{decimals}f}"


def format_summary(summary: dict, n: int, num_steps: int = 1) -> str:
    columns = (("FD ↓", "fd", 2, 16), ("acc ↑", "acc", 3, 15), ("recall ↑", "recall", 2, 13),
               ("coverage ↑", "coverage", 2, 13))  # fmt: skip
    lines = [
        f"digits yardstick, n={n} per seed; {num_steps}-step students unless a variant sets num_steps",
        f"{'row':52}" + "".join(f"{title:>{width}}" for title, _, _, width in columns) + f"{'train s':>9}",
    ]
    for name, s in summary.items():
        label = f"{name} ({s['seeds']} seeds)"
        cells = "".join(f"{_mean_sd_cell(s, key, decimals):>{width}}" for _, key, decimals, width in columns)
        lines.append(f"{label:52}{cells}{s['train_seconds_mean']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (runs, results.json) (required)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--external", action="append", default=[], help="NAME:COMMAND runs of another program")
    parser.add_argument(
        "--num-steps", type=int, default=1,
        help="the students' sampling steps (1; more trains with DMD2's backward simulation) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--distillpp", action="append", default=[],
        help="NAME:key=value,... Distillation++ setting measured on every trained student (repeatable)",
    )  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished in OUT")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distillation/eval seeds")
    parser.add_argument("--n", type=int, default=2000, help="images per row and seed (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: %(default)s)")
    parser.add_argument("--teacher", help="a built digits teacher folder (default: the cached one)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", help="yardstick device")
    parser.add_argument("--teacher-rows", nargs="*", default=TEACHER_ROWS, choices=TEACHER_ROWS, metavar="ROW",
                        help=f"the teacher's rows to measure per seed (default: all of {', '.join(TEACHER_ROWS)}; "
                        "teacher_50 at n=2000 takes a while on a CPU)")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one job, as JSON (the parallel workers)
    args = parser.parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        if job["variant"] == "teacher":
            from ..digits.yardstick import evaluate

            result = evaluate(job["teacher"], n=job["n"], seed=job["seed"], rows=[job["row"]], progress=False,
                              device=job["device"], guidance_scale=job["guidance_scale"])  # fmt: skip
            print(json.dumps({"variant": job["row"], "seed": job["seed"], **result["rows"][job["row"]]}))
        elif "distillpp" in job:
            print(json.dumps(run_distillpp(job["teacher"], Path(job["out"]), job["variant"], job["seed"], job["n"],
                                           job["device"], job["label"], job["distillpp"])))  # fmt: skip
        else:
            print(json.dumps(run_one(job["teacher"], Path(job["out"]), job["variant"], job["overrides"], job["seed"],
                                     job["n"], job["device"], job.get("external"), job["num_steps"],
                                     job["reuse"], job.get("method", "dmd2"))))  # fmt: skip
        return 0
    if args.num_steps < 1:
        parser.error(f"--num-steps must be ≥ 1, got {args.num_steps}")
    distillpp = [parse_distillpp(text) for text in args.distillpp]

    from ..digits.demo_settings import DigitsDemoSettings
    from ..digits.teacher import cached_train_images, digits_teacher, write_digit_prompts
    from ..digits.yardstick import digit_classifier

    from ..cli import resolve_device

    args.device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher or str(digits_teacher(device=args.device))
    digit_classifier()  # built once, before the workers need it
    cached_train_images()  # written once, before the workers read it
    write_digit_prompts(out / "prompts.txt")
    variants = [parse_variant(v) for v in args.variant] or [("demo", {})]
    common = dict(teacher=teacher, out=str(out), n=args.n, device=args.device)
    training = dict(num_steps=args.num_steps, reuse=args.reuse)
    jobs = [
        {**common, **training, "variant": name, "overrides": o, "seed": seed}
        for name, o in variants for seed in args.seeds
    ]  # fmt: skip
    for job in jobs:  # a variant's own num_steps overrides --num-steps
        job["overrides"] = dict(job["overrides"])
        job["num_steps"] = job["overrides"].pop("num_steps", args.num_steps)
        job["method"] = job["overrides"].pop("method", "dmd2")
    for text in args.external:
        name, _, command = text.partition(":")
        jobs += [
            {**common, **training, "variant": name, "overrides": {}, "external": command, "seed": s} for s in args.seeds
        ]  # fmt: skip
    guided = [  # after every distillation: they sample the trained students
        {**common, "variant": job["variant"], "seed": job["seed"], "label": label, "distillpp": settings}
        for job in jobs for label, settings in distillpp
    ]  # fmt: skip
    jobs += [  # last: quick, they fill in while the distillations run
        {**common, "variant": "teacher", "row": row, "seed": seed, "guidance_scale": DigitsDemoSettings.guidance_scale}
        for seed in args.seeds for row in args.teacher_rows
    ]
    results = []

    def run_job(job):  # results are written as they come, so a sweep cut short keeps what it finished
        result = _subprocess(args, job)
        results.append(result)
        print(json.dumps(result), flush=True)
        (out / "results.json").write_text(json.dumps({"n": args.n, "results": results}, indent=2))

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run_job, jobs))
        list(pool.map(run_job, guided))
    summary = summarise(results)
    (out / "results.json").write_text(json.dumps({"n": args.n, "results": results, "summary": summary}, indent=2))
    print(format_summary(summary, args.n, args.num_steps))
    for r in results:
        if "error" in r:
            print(f"failed: {r['variant']} seed {r['seed']}: {r['error']}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
