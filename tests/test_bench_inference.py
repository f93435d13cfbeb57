"""``fewstep bench inference``: the derived numbers, the table, and input errors (the timed run itself is too slow
for the test suite; its numbers are in the issue notes)."""

import argparse

import pytest
import torch

from fewstep.benchmarks.inference import _result, format_table
from fewstep.cli import main

SECONDS = {
    "text_encoder": 0.5, "text_encoder_cfg": 0.8, "unet_student": 8.0, "unet_teacher_cfg": 14.0, "vae_decode": 19.0,
    "pipeline_1_step": 28.5, "pipeline_4_steps": 52.0, "pipeline_4_steps_distillpp_1": 67.0,
    "vae_decode_tiny": 0.25, "pipeline_1_step_tiny_vae": 9.0,
}  # fmt: skip


def args(**overrides):
    values = dict(resolution=256, repeats=2, teacher_steps=50, teacher_timed_steps=None, teacher_guidance_scale=7.5,
                  distillpp=0.05, device="cpu", dtype=None, threads=1)  # fmt: skip
    return argparse.Namespace(**{**values, **overrides})


def test_overhead_and_speedup_definitions():
    result = _result(args(), torch.device("cpu"), torch.float32, dict(SECONDS), teacher_timed=720.0, timed_steps=50)
    assert result["one_step_overhead"] == pytest.approx(28.5 / (0.5 + 8.0 + 19.0) - 1)
    assert result["speedup_vs_teacher_50"] == pytest.approx(720.0 / 28.5)
    assert result["overhead"]["4_steps_distillpp_1"] == pytest.approx(67.0 / (0.8 + 4 * 8.0 + 14.0 + 19.0) - 1)
    assert result["speedup_vs_teacher_50_tiny_vae"] == pytest.approx(720.0 / 9.0)
    assert result["overhead"]["1_step_tiny_vae"] == pytest.approx(9.0 / (0.5 + 8.0 + 0.25) - 1)
    assert result["speedup_bound_same_vae"] == pytest.approx(720.0 / (0.5 + 19.0))
    assert result["setup"]["teacher_extrapolated"] is False
    table = format_table(result)
    assert "one_step_overhead = +3.6%" in table and "speedup_vs_teacher_50 = 25.3×" in table


def test_teacher_extrapolation_is_labelled():
    result = _result(
        args(teacher_timed_steps=5), torch.device("cpu"), torch.float32, dict(SECONDS), teacher_timed=90.0, timed_steps=5
    )
    assert result["seconds"]["teacher"] == pytest.approx(90.0 + 45 * 14.0)
    assert result["setup"]["teacher_extrapolated"] is True
    assert "(timed 5, extrapolated)" in format_table(result)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "100"], "--resolution must be a positive multiple of 8, got 100"),
        (["--repeats", "0"], "--repeats must be ≥ 1, got 0"),
        (["--teacher-timed-steps", "60"], "--teacher-timed-steps must be in [1, 50], got 60"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, extra, message):
    assert main(["bench", "inference", *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"fewstep bench: error: {message}"
