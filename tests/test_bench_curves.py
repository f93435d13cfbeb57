"""``fewstep bench curves``: checkpoints on every point, mean ± sd per point, the table and the plot."""

import json

import pytest
from PIL import Image

from fewstep.benchmarks.curves import (
    _baseline,
    _Ledger,
    _reached_step,
    against_teacher,
    check_iterations,
    checkpoint_spacing,
    format_table,
    plot_curves,
    summarise,
    teacher_baseline,
)
from fewstep.cli import main
from fewstep.digits import shipped

PER_SEED = [
    dict(variant="DMD2 1-step", seed=seed, iterations=it, n=100, fd=fd + seed, acc=0.99, recall=0.5 + 0.1 * seed,
         train_seconds=it / 10)
    for seed in (0, 1) for it, fd in ((600, 80.0), (6000, 50.0))
] + [dict(variant="DMD 1-step", seed=0, iterations=600, n=100, fd=70.0, acc=0.98, recall=0.6, train_seconds=60.0)]


def test_checkpoints_land_on_every_point_of_the_curve():
    assert checkpoint_spacing([600, 1200, 2400, 6000]) == 600
    assert checkpoint_spacing([500, 1200]) == 100
    assert check_iterations([1200, 600, 600]) == [600, 1200]
    with pytest.raises(ValueError, match="must be positive"):
        check_iterations([0, 600])


def test_points_become_mean_and_sd_over_seeds_in_variant_order():
    rows = summarise(PER_SEED)
    assert [(r["variant"], r["iterations"]) for r in rows] == [
        ("DMD2 1-step", 600), ("DMD2 1-step", 6000), ("DMD 1-step", 600)
    ]  # fmt: skip
    first = rows[0]
    assert first["fd"] == 80.5 and first["fd_sd"] == pytest.approx(0.7071, abs=1e-4) and first["seeds"] == 2
    assert first["recall"] == pytest.approx(0.55) and "coverage" not in first  # only what every seed measured


def test_table_and_plot(tmp_path):
    result = {"rows": summarise(PER_SEED), "seeds": [0, 1]}
    table = format_table(result)
    assert table.splitlines()[0].split()[:5] == ["variant", "iterations", "n", "fd", "acc"]
    assert "recall" in table.splitlines()[0] and "80.50 ± 0.71" in table
    plot_curves(result["rows"], tmp_path / "curves.png")
    colours = {c for _, c in Image.open(tmp_path / "curves.png").convert("RGB").getcolors(maxcolors=100000)}
    assert {(40, 40, 40), (31, 119, 180)} <= colours  # one line per variant


TEACHER = teacher_baseline(
    [dict(seed=0, fd=40.0, acc=0.98, recall=0.8), dict(seed=1, fd=60.0, acc=0.98, recall=0.8)], n=100, source="test"
)  # fmt: skip


def test_points_at_the_teachers_n_are_set_against_its_mean():
    rows = against_teacher(summarise(PER_SEED), TEACHER)
    assert TEACHER["fd"] == 50.0 and TEACHER["fd_sd"] == pytest.approx(14.142, abs=1e-3)
    assert rows[0]["fd_vs_teacher"] == pytest.approx(80.5 / 50.0, abs=1e-3)
    assert rows[0]["recall_vs_teacher"] == pytest.approx(0.55 / 0.8, abs=1e-3)
    other_n = against_teacher([dict(PER_SEED[0], n=2000)], TEACHER)[0]
    assert "fd_vs_teacher" not in other_n  # FD's bias depends on n: no ratio across sizes


def test_table_and_plot_show_the_teacher(tmp_path):
    result = {"rows": against_teacher(summarise(PER_SEED), TEACHER), "seeds": [0, 1], "teacher_50": TEACHER}
    table = format_table(result)
    assert "fd ÷ T" in table.splitlines()[0] and "recall ÷ T" in table.splitlines()[0]
    assert "1.610" in table and "fd 50.000 ± 14.142" in table
    assert "÷ T" not in format_table({"rows": summarise(PER_SEED), "seeds": [0, 1]})
    plot_curves(result["rows"], tmp_path / "curves.png", TEACHER)
    colours = {c for _, c in Image.open(tmp_path / "curves.png").convert("RGB").getcolors(maxcolors=100000)}
    assert (150, 150, 150) in colours  # the teacher's dashed line


def test_the_shipped_record_gives_the_teachers_row_at_the_seeds_asked_for():
    record = json.loads((shipped.SHIPPED_DIR / shipped.YARDSTICK_FILE).read_text())
    n, scale, seeds = record["n"], record["guidance_scale"], record["seeds"]
    rows = shipped.shipped_yardstick_row("teacher_50", n, [seeds[-1], seeds[0]], scale)
    assert [r["seed"] for r in rows] == [seeds[-1], seeds[0]]
    assert rows[1]["fd"] == record["rows"]["teacher_50"]["per_seed"][0]["fd"]
    assert shipped.shipped_yardstick_row("teacher_50", n // 2, seeds, scale) is None  # another n
    assert shipped.shipped_yardstick_row("teacher_50", n, [max(seeds) + 1], scale) is None  # a seed it lacks
    assert shipped.shipped_yardstick_row("teacher_50", n, seeds, scale + 1) is None  # another CFG


def test_a_teacher_of_ones_own_has_no_baseline_unless_measured():
    import argparse

    args = argparse.Namespace(measure_teacher=False, teacher="/some/teacher", quick=False, seeds=[0])
    baseline, note = _baseline(args, "/some/teacher", 2000, 2.0, "cpu")
    assert baseline is None and "not the shipped teacher" in note and "--measure-teacher" in note


def _shipped_args(record):
    import argparse

    return argparse.Namespace(measure_teacher=False, teacher=None, quick=False, seeds=record["seeds"])


def _real_row_scoring(monkeypatch, fd):
    from fewstep.digits import yardstick

    monkeypatch.setattr(yardstick, "evaluate", lambda *a, **k: {"rows": {"real": {"fd": fd}}})


def test_the_record_is_the_baseline_where_the_classifier_scores_its_real_row_alike(monkeypatch):
    record = json.loads((shipped.SHIPPED_DIR / shipped.YARDSTICK_FILE).read_text())
    _real_row_scoring(monkeypatch, record["rows"]["real"]["per_seed"][0]["fd"])
    baseline, note = _baseline(_shipped_args(record), "/teacher", record["n"], record["guidance_scale"], "cpu")
    assert baseline["fd"] == pytest.approx(record["rows"]["teacher_50"]["fd_mean"], abs=1e-3)
    assert "record" in note


def test_another_classifier_gets_no_baseline_from_the_record(monkeypatch):
    record = json.loads((shipped.SHIPPED_DIR / shipped.YARDSTICK_FILE).read_text())
    _real_row_scoring(monkeypatch, record["rows"]["real"]["per_seed"][0]["fd"] - 0.65)  # seen on another CPU
    baseline, note = _baseline(_shipped_args(record), "/teacher", record["n"], record["guidance_scale"], "cpu")
    assert baseline is None and "another yardstick classifier" in note and "--measure-teacher" in note


def test_a_resumed_curve_keeps_the_training_time_and_the_points_it_measured(tmp_path):
    ledger = _Ledger(tmp_path)
    ledger.trained(0, 1200, 1200.0)
    ledger.measured(600, 2000, {"fd": 80.0})
    ledger.measured(1200, 1000, {"fd": 70.0})
    again = _Ledger(tmp_path)  # read back, as a later `--resume` does
    again.trained(1200, 2400, 600.0)  # slower per iteration: another machine, say
    assert (again.seconds_at(600), again.seconds_at(1200), again.seconds_at(1800)) == (600.0, 1200.0, 1500.0)
    assert again.scores(600, 2000) == {"fd": 80.0} and again.scores(600, 500) is None  # another n is re-measured
    assert _Ledger(tmp_path, fresh=True).scores(600, 2000) is None


def test_resuming_from_an_earlier_checkpoint_forgets_what_came_after_it(tmp_path):
    ledger = _Ledger(tmp_path)
    ledger.trained(0, 1200, 1200.0)
    ledger.measured(1200, 1000, {"fd": 70.0})
    ledger.trained(600, 1200, 900.0)  # the step-1200 checkpoint was lost: 600 → 1200 again
    assert ledger.stretches == [[0, 600, 600.0], [600, 1200, 900.0]] and ledger.scores(1200, 1000) is None


def test_a_curve_with_no_run_or_only_damaged_checkpoints_starts_over(tmp_path):
    assert _reached_step(tmp_path) == 0
    for step in (600, 1200):
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)  # empty: a write cut short
    assert _reached_step(tmp_path) == 0


@pytest.mark.slow
def test_quick_bench_curves_trains_and_measures_every_point(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "curves"
    args = ["bench", "curves", "--quick", "--out", str(out), "--variants", "DMD2 1-step", "DMD 1-step"]
    assert main([*args, "--measure-teacher"]) == 0
    result = json.loads((out / "curves.json").read_text())
    assert [(r["variant"], r["iterations"]) for r in result["rows"]] == [
        ("DMD2 1-step", 2), ("DMD2 1-step", 4), ("DMD 1-step", 2), ("DMD 1-step", 4)
    ]  # fmt: skip
    assert (out / "runs" / "DMD2_1-step-seed0" / "lora-step-2").is_dir() and (out / "curves.png").is_file()
    assert result["teacher_50"]["seeds"] == [0] and all(r["fd_vs_teacher"] > 0 for r in result["rows"])


@pytest.mark.slow
def test_quick_bench_curves_resume_extends_the_runs_it_finds(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "curves"
    args = ["bench", "curves", "--quick", "--out", str(out), "--variants", "DMD2 1-step"]
    assert main([*args, "--iterations", "2"]) == 0
    run_dir = out / "runs" / "DMD2_1-step-seed0"
    first = json.loads((run_dir / "curve_points.json").read_text())
    assert main([*args, "--iterations", "2", "4", "--resume"]) == 0
    ledger = json.loads((run_dir / "curve_points.json").read_text())
    assert [s[:2] for s in ledger["stretches"]] == [[0, 2], [2, 4]]  # continued, not started over
    assert ledger["points"]["2:20"] == first["points"]["2:20"]
    result = json.loads((out / "curves.json").read_text())
    assert [r["iterations"] for r in result["rows"]] == [2, 4]
    assert result["teacher_50"] is None and "--measure-teacher" in result["baseline_note"]  # a tiny teacher
