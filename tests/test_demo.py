"""``fewstep demo`` end to end with a tiny budget: files, schema and finite numbers (quality is a benchmark)."""

import json
import math

import pytest

from fewstep.cli import main

TEACHER_ROWS = {"real", "teacher_50", "teacher_4", "teacher_1"}


def test_quick_digits_demo_writes_grid_metrics_and_lora_files(cache_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == TEACHER_ROWS | {"student_1"}  # not at 4 steps: it never trained on them
    rows = metrics["rows"]
    for name, row in rows.items():
        assert math.isfinite(row["fd"]) and 0.0 <= row["acc"] <= 1.0, name
        assert isinstance(row["seconds"], float) and math.isfinite(row["seconds"]) and row["seconds"] >= 0, name
    # Each row times its own sampling (not the time since the start): 50 teacher steps take longer than one.
    assert rows["teacher_50"]["seconds"] > rows["teacher_1"]["seconds"]
    assert metrics["n"] > 0 and "seed" in metrics
    assert (out / "samples.png").stat().st_size > 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora" / "fewstep_comfyui.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "[1/3]" in printed and "[3/3]" in printed and "student_1" in printed


def test_quick_four_step_demo_measures_its_own_steps_and_distillpp(cache_dir, tmp_path, capsys):
    out = tmp_path / "four"
    assert main(["demo", "--quick", "--num-steps", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == TEACHER_ROWS | {"student_4", "student_distillpp", "student_distillpp_control"}
    assert metrics["distillpp"]["guided_steps"] >= 1 and (out / "samples.png").stat().st_size > 0
    assert "(Distillation++: " in capsys.readouterr().out  # the table says which setting the row used


@pytest.mark.parametrize("method,num_steps", [("progressive", "2")])  # dmd: same path, tests/test_train_methods.py
def test_quick_demo_of_another_method_measures_its_student_at_its_own_recipe(cache_dir, tmp_path, method, num_steps):
    out = tmp_path / method
    assert main(["demo", "--quick", "--method", method, "--num-steps", num_steps, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == TEACHER_ROWS | {"student"}
    recipe = json.loads((out / "lora" / "fewstep_recipe.json").read_text())
    assert recipe["method"] == method and len(recipe["timesteps"]) == int(num_steps)
    assert recipe["sampler"] == ("ddim" if method == "progressive" else "few_step")


def test_quick_exact_demo_writes_scatter_and_metrics(tmp_path):
    out = tmp_path / "exact"
    assert main(["demo", "--exact", "--quick", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["swd_student"]) and math.isfinite(metrics["seconds"]) and metrics["seconds"] > 0
    # The mode count is the number of modes holding ≥ 5% of the student's samples, out of the ring's modes; even the
    # quick run's student lands on some of them.
    fractions, num_modes = metrics["mode_fractions"], metrics["config"]["num_modes"]
    assert len(fractions) == num_modes and all(f >= 0 for f in fractions) and sum(fractions) <= 1 + 1e-9
    assert metrics["modes_covered"] == sum(f >= 0.05 for f in fractions)
    assert isinstance(metrics["modes_covered"], int) and 1 <= metrics["modes_covered"] <= num_modes
    assert set(metrics["variety"]) == {"student", "teacher_50", "data"}
    keys = {"precision", "recall", "density", "coverage", "data_log_likelihood"}
    assert all(set(v) == keys for v in metrics["variety"].values())
    student, teacher = metrics["variety"]["student"]["coverage"], metrics["variety"]["teacher_50"]["coverage"]
    assert metrics["coverage_ratio_student_vs_teacher"] == pytest.approx(student / teacher)
    assert (out / "samples.png").stat().st_size > 0


def test_out_pointing_at_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["demo", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err
