"""Two-process data-parallel DMD2 (torchrun + gloo on the CPU): each process encodes its share of the encoding cache,
and the run ends with identical adapters on both processes."""

import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.skipif(shutil.which("torchrun") is None and sys.platform != "linux", reason="needs torchrun")
def test_two_process_run_encodes_each_share_once_and_ends_with_identical_adapter_weights(teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of thing {i}\n" for i in range(100)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "fewstep.cli", "train", "--teacher", str(teacher), "--output", str(tmp_path / "run"),
        "--prompts", str(prompts), "--max-steps", "3", "--gen-rank", "4", "--fake-rank", "4",
        "--dfake-gen-update-ratio", "1", "--validate-every", "0", "--checkpoint-every", "0", "--lr", "1e-3",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    # parts of 32 prompts: units 0-3, process 0 encodes units 0 and 2 (64 prompts), process 1 units 1 and 3 (36)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FEWSTEP_CACHE_PART_MB": "0.001"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "adapter weights identical on all 2 processes" in output
    assert "100 prompts" in output and "encoded 64 prompts" in output  # process 0's report: its own share
    [entry] = (tmp_path / "cache").iterdir()
    assert len(list(entry.glob("units/*.json"))) == 4
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
