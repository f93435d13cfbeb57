"""Two-process data-parallel DMD2 (torchrun + gloo on the CPU) ends with identical adapters on both processes."""

import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux", reason="needs torchrun")
def test_two_process_run_ends_with_identical_adapter_weights(teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na photo of a cat\na dog\na blue sky\n")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "fewstep.cli", "train", "--teacher", str(teacher), "--output", str(tmp_path / "run"),
        "--prompts", str(prompts), "--max-steps", "3", "--gen-rank", "4", "--fake-rank", "4",
        "--dfake-gen-update-ratio", "1", "--validate-every", "0", "--checkpoint-every", "0", "--lr", "1e-3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "adapter weights identical on all 2 processes" in output
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
