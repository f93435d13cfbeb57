"""Options that cannot work are refused in one line before any run folder is made (issue 23's table, one row per
test): a style-LoRA scale that is not a number in range, a resolution far above the teacher's, a --model-type that
does not match the weights, --device cuda without CUDA."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fewstep.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``fewstep ARGV``: (exit status, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_line(err: str, *words: str) -> None:
    """One error line (``fewstep CMD: error: ...``) naming ``words``, and no traceback."""
    lines = [line for line in err.strip().splitlines() if ": error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err


@pytest.fixture
def style_lora(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 4)}, str(path))
    return path


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e9"])
def test_a_style_lora_scale_that_is_not_a_number_in_range_is_refused(capsys, teacher, prompts, tmp_path, style_lora, scale):
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run),
                        "--teacher-lora", f"{style_lora}:{scale}")  # fmt: skip
    assert code == 2
    assert_one_line(err, "--teacher-lora", "scale", "[-4, 4]")
    assert not run.exists()


@pytest.mark.parametrize(
    "options, words",
    [
        (["--resolution", "4096"], ["--resolution 4096", "native", "memory", "at most"]),
        (["--model-type", "sdxl"], ["--model-type sdxl", "SD1.5"]),
        (["--num-steps", "1000"], ["--num-steps 1000", "999 distinct timesteps"]),
        (["--timesteps", "999,499", "--num-steps", "4"], ["--timesteps 999,499", "--num-steps is 4", "only one"]),
    ],
    ids=["resolution far above the teacher's", "model type not the weights'", "num-steps beyond the schedule",
         "num-steps with timesteps"],
)
def test_options_the_teacher_cannot_take_are_refused_before_any_folder_is_made(capsys, teacher, prompts, tmp_path, options, words):
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run),
                        *options)  # fmt: skip
    assert code == 2
    assert_one_line(err, *words)
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA GPU")
@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--device", "cuda", "--quick"],
        ["bench", "memory", "--device", "cuda"],
        ["bench", "inference", "--device", "cuda"],
        ["bench", "methods", "--device", "cuda", "--quick"],
        ["sample", "--device", "cuda", "--lora", "run", "--teacher", "base", "--prompt", "a cat"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_device_cuda_without_cuda_is_one_line_in_every_command(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line(err, "--device cuda", "no CUDA GPU", "--device cpu")


def test_a_device_torch_does_not_know_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "bench", "memory", "--device", "gpu0")
    assert code == 2
    assert_one_line(err, "--device 'gpu0'", "cpu, cuda")
