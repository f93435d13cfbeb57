"""``fewstep bench curves``: checkpoints on every point, mean ± sd per point, the table and the plot."""

import json

import pytest
from PIL import Image

from fewstep.benchmarks.curves import check_iterations, checkpoint_spacing, format_table, plot_curves, summarise
from fewstep.cli import main

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


@pytest.mark.slow
def test_quick_bench_curves_trains_and_measures_every_point(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "curves"
    assert main(["bench", "curves", "--quick", "--out", str(out), "--variants", "DMD2 1-step", "DMD 1-step"]) == 0
    result = json.loads((out / "curves.json").read_text())
    assert [(r["variant"], r["iterations"]) for r in result["rows"]] == [
        ("DMD2 1-step", 2), ("DMD2 1-step", 4), ("DMD 1-step", 2), ("DMD 1-step", 4)
    ]  # fmt: skip
    assert (out / "runs" / "DMD2_1-step-seed0" / "lora-step-2").is_dir() and (out / "curves.png").is_file()
