"""The step-by-step measurement's command line and summary (the sampling itself: tests/test_digits.py)."""

import pytest

from fewstep.benchmarks.student_steps import format_table, main, parse_grid, summarise

SCORES = dict(fd=100.0, acc=0.99, precision=0.99, recall=0.66, density=1.4, coverage=0.91)


def test_a_grid_must_be_descending_timesteps():
    assert parse_grid("999,499") == [999, 499]
    with pytest.raises(SystemExit, match="--grid '499,999'"):
        parse_grid("499,999")


def test_rows_are_mean_and_sd_over_the_measurements_in_their_order():
    measured = [{"step 1 (t=999)": SCORES, "grid 999,499": {**SCORES, "fd": 70.0}},
                {"step 1 (t=999)": {**SCORES, "fd": 110.0}, "grid 999,499": {**SCORES, "fd": 80.0}}]  # fmt: skip
    rows = summarise(measured)
    assert [r["row"] for r in rows] == ["step 1 (t=999)", "grid 999,499"]
    assert rows[1]["fd"] == 75.0 and rows[1]["fd_sd"] == pytest.approx(7.0711, abs=1e-4) and rows[1]["measurements"] == 2
    table = format_table({"rows": rows, "n": 2000})
    assert "75.00 ± 7.07" in table and "2 measurements" in table


def test_paired_runs_need_one_run_per_seed(tmp_path):
    with pytest.raises(SystemExit, match="one run per seed: got 1 runs and 3 seeds"):
        main([str(tmp_path), "--seeds", "0", "1", "2", "--paired", "--out", str(tmp_path / "out")])
