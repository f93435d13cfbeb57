"""Sweep the exact-teacher demo's settings: fidelity and variety of the one-step student, mean ± sd over seeds.

Each (variant, seed) runs ``toy.exact_teacher.train_exact_teacher`` with ``ExactTeacherConfig`` plus the variant's
overrides (what ``fewstep demo --exact --seed S`` runs for the defaults) and records the student's and the teacher's
numbers against the data: coverage, recall and the data's log-likelihood under a KDE on the samples (variety), the
share within 2σ of a mode and E[−log p_data] (fidelity), sliced W1, and the student's coverage as a share of the
teacher's. Runs go in parallel processes
(``--jobs``, one torch thread each); CPU seconds are each run's own (training and measuring), which stay comparable
when other jobs share the cores and wall time does not.

    python -m fewstep.benchmarks.exact_sweep --out exact-sweep --seeds 0 1 2 --jobs 2 \
        --variant "defaults:" --variant "batch 512:batch_size=512"

A variant is ``NAME:key=value,key=value`` over :class:`~fewstep.toy.exact_teacher.ExactTeacherConfig` fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KEYS = ("coverage_ratio", "coverage", "teacher_coverage", "recall", "teacher_recall", "data_log_likelihood",
        "teacher_data_log_likelihood", "within_2std", "cross_entropy", "swd", "cpu_seconds")  # fmt: skip


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name:key=value,..."`` → (name, overrides typed like the ExactTeacherConfig field's default)."""
    from ..toy.exact_teacher import ExactTeacherConfig
    from .digits_sweep import named_settings

    defaults = {f.name: f.default for f in dataclasses.fields(ExactTeacherConfig)}
    name, values = named_settings(text, "variant", list(defaults))
    overrides = {}
    for key, value in values.items():
        kind = type(defaults[key])
        overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return name, overrides


def run_one(name: str, overrides: dict, seed: int) -> dict:
    """One run: the student's and teacher's numbers against the data."""
    import torch

    from ..toy.exact_teacher import ExactTeacherConfig, train_exact_teacher

    torch.set_num_threads(1)
    started = time.process_time()
    result = train_exact_teacher(ExactTeacherConfig(**overrides, seed=seed))
    student, teacher = result.variety["student"], result.variety["teacher_50"]
    return {
        "variant": name, "seed": seed, "overrides": overrides, "coverage_ratio": result.coverage_ratio(),
        "coverage": student["coverage"], "teacher_coverage": teacher["coverage"], "recall": student["recall"],
        "teacher_recall": teacher["recall"], "data_log_likelihood": student["data_log_likelihood"],
        "teacher_data_log_likelihood": teacher["data_log_likelihood"], "within_2std": result.within_2std["student"],
        "cross_entropy": result.cross_entropy["student"], "swd": result.swd_student,
        "cpu_seconds": round(time.process_time() - started, 1),
    }  # fmt: skip


def summarise(results: list[dict]) -> dict:
    """Per variant: every key's mean and sd over its seeds."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["variant"], []).append(r)
    summary = {}
    for name, rows in groups.items():
        summary[name] = {"seeds": [r["seed"] for r in rows]}
        for key in KEYS:
            values = [r[key] for r in rows]
            summary[name][key] = statistics.mean(values)
            summary[name][f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def format_summary(summary: dict) -> str:
    columns = (("cov/teacher", "coverage_ratio", 3), ("coverage", "coverage", 3), ("recall", "recall", 3),
               ("log p̂(data)", "data_log_likelihood", 3), ("within 2σ", "within_2std", 3),
               ("−log p", "cross_entropy", 3), ("CPU s", "cpu_seconds", 0))  # fmt: skip
    lines = [f"{'variant':30}" + "".join(f"{title:>16}" for title, _, _ in columns)]
    for name, s in summary.items():
        cells = "".join(f"{s[key]:.{d}f} ± {s[key + '_sd']:.{d}f}".rjust(16) for _, key, d in columns)
        label = f"{name} ({len(s['seeds'])} seeds)"
        lines.append(f"{label:30}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (results.json) (required)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: %(default)s)")
    args = parser.parse_args(argv)
    variants = [parse_variant(text) for text in args.variant] or [("defaults", {})]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, overrides, seed) for name, overrides in variants for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*jobs)))
    summary = summarise(results)
    (out / "results.json").write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
