"""``fewstep bench methods``: the table, the JSON and the FD-vs-steps plot (end to end only with -m slow)."""

import json

import pytest
from PIL import Image

from fewstep.benchmarks.methods import aggregate, format_table, plot_fd_vs_steps
from fewstep.cli import main

VARIETY = dict(precision=0.9, recall=0.7, density=1.0, coverage=0.8)
ROWS = [
    dict(method="teacher (DDIM, CFG)", steps=50, fd=10.0, acc=0.9, train_seconds=0.0, sample_seconds=9.0, **VARIETY),
    dict(method="teacher (DDIM, CFG)", steps=1, fd=300.0, acc=0.1, train_seconds=0.0, sample_seconds=0.2, **VARIETY),
    dict(method="DMD2", steps=1, fd=40.0, acc=0.8, train_seconds=300.0, sample_seconds=0.2, **VARIETY),
    dict(method="DMD2 (backward simulation)", steps=4, fd=30.0, acc=0.85, train_seconds=300.0, sample_seconds=0.8,
         **VARIETY),  # fmt: skip
    dict(method="PD", steps=2, fd=60.0, acc=0.7, train_seconds=290.0, sample_seconds=0.4, **VARIETY),
]


def test_table_has_one_line_per_row_with_every_column():
    table = format_table({"rows": ROWS, "n": 100, "budget_seconds": 300, "seeds": [0]})
    lines = table.splitlines()
    assert lines[0].split() == ["method", "steps", "FD", "acc", "recall", "coverage", "train", "s", "sample", "s"]
    assert len(lines) == 2 + len(ROWS) + 1 and "DMD2 (backward simulation)" in table
    assert lines[2].split()[4:8] == ["10.00", "0.900", "0.70", "0.80"]


def test_rows_from_before_the_variety_scores_print_a_dash():
    old = [{key: value for key, value in row.items() if key not in VARIETY} for row in ROWS]
    rows = format_table({"rows": aggregate([old]), "n": 100, "budget_seconds": 300, "seeds": [0]}).splitlines()[2:-1]
    assert all(line.count("—") == 2 for line in rows)


def test_plot_draws_one_coloured_line_per_method(tmp_path):
    plot_fd_vs_steps(ROWS, tmp_path / "plot.png")
    image = Image.open(tmp_path / "plot.png").convert("RGB")
    colours = {c for _, c in image.getcolors(maxcolors=100000)}
    assert {(31, 119, 180), (214, 39, 40)} <= colours  # DMD2's and PD's lines (teacher's is dark grey)


@pytest.mark.slow
def test_quick_bench_methods_writes_json_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    assert main(["bench", "methods", "--quick", "--out", str(out), "--pd-start-steps", "2"]) == 0
    rows = json.loads((out / "methods.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["teacher (DDIM, CFG)"] * 3 + ["DMD2", "DMD2 (backward simulation)", "DMD", "PD", "PD"]
    assert [r["steps"] for r in rows[-2:]] == [2, 1]
    assert (out / "fd_vs_steps.png").stat().st_size > 0


def test_rows_of_several_seeds_become_mean_and_sd():
    other = [{**r, "fd": r["fd"] + 2.0, "acc": r["acc"] - 0.1, "recall": r["recall"] - 0.2} for r in ROWS]
    rows = aggregate([ROWS, other])
    assert [r["method"] for r in rows] == [r["method"] for r in ROWS]
    assert rows[0]["fd"] == 11.0 and rows[0]["fd_sd"] == pytest.approx(1.414, abs=1e-3)
    assert rows[0]["acc"] == pytest.approx(0.85) and len(rows[0]["per_seed"]) == 2
    assert rows[0]["recall"] == pytest.approx(0.6) and rows[0]["recall_sd"] == pytest.approx(0.1414, abs=1e-4)
    table = format_table({"rows": rows, "n": 2000, "budget_seconds": 300, "seeds": [0, 1]})
    assert "11.00 ± 1.41" in table and "0.60 ± 0.14" in table
