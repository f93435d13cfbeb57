"""World-size invariance: 2 processes × --batch-size 2 (torchrun, gloo on the CPU) train the same LoRA as
1 process × --batch-size 4, for DMD2 (GAN, gradient checkpointing, accumulation), DMD and progressive distillation."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main

# What remains between the runs is floating-point noise (sums over batches of another shape: ~1e-8 per value), which
# AdamW's normalisation turns into up to ±lr on the few values whose gradient is ~0; so the difference scales with the
# learning rate: at the default 5e-5 it measured 2.4e-6 (DMD2), 3.3e-6 (DMD), 9.8e-6 (PD); 2e-5 leaves a margin.
COMMON = ["--max-steps", "4", "--gen-rank", "4", "--checkpoint-every", "2", "--validate-every", "0",
          "--warmup-steps", "1", "--lr", "2e-5", "--report-to", "none", "--mixed-precision", "no"]  # fmt: skip
METHODS = {
    "dmd2": ["--method", "dmd2", "--fake-rank", "4", "--gan-weight", "0.05", "--gradient-checkpointing",
             "--gradient-accumulation-steps", "2", "--dfake-gen-update-ratio", "2", "--num-steps", "2"],
    "dmd": ["--method", "dmd", "--fake-rank", "4", "--num-pairs", "8", "--pair-steps", "2"],
    "progressive": ["--method", "progressive", "--start-steps", "2", "--end-steps", "1", "--num-pairs", "8",
                    "--pair-steps", "2"],
}  # fmt: skip


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    norm = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (diff / norm) ** 0.5


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_with_half_the_batch_train_the_lora_of_one_process(method, teacher, prompts, images, tmp_path):
    data = ["--teacher", str(teacher), "--prompts", str(prompts)] + (["--images", str(images)] if method == "dmd2"
                                                                     else [])  # fmt: skip
    argv = ["train", *data, *METHODS[method], *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "fewstep.cli"]  # fmt: skip
    two = subprocess.run([*launch, *argv, "--batch-size", "2", "--output", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert main([*argv, "--batch-size", "4", "--output", str(tmp_path / "one")]) == 0
    lora = "lora/pytorch_lora_weights.safetensors"
    a, b = load_file(tmp_path / "two" / lora), load_file(tmp_path / "one" / lora)
    assert any(float(t.abs().max()) > 0 for t in b.values())  # trained: the comparison means something
    assert relative_difference(a, b) <= 1e-5


def test_two_nodes_launched_apart_with_a_rendezvous_train_as_one_process(teacher, prompts, tmp_path):
    """Two ``torchrun --nnodes 2`` launches (one process each) meeting at a localhost c10d rendezvous, as two
    machines would: the run is the one-process run with the global batch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["train", "--teacher", str(teacher), "--prompts", str(prompts), "--fake-rank", "4", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "fewstep-test",
              "-m", "fewstep.cli", *argv, "--batch-size", "1", "--output", str(tmp_path / "nodes")]  # fmt: skip
    nodes = [subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert any("adapter weights identical on all 2 processes" in o for o in outputs)
    assert main([*argv, "--batch-size", "2", "--output", str(tmp_path / "one")]) == 0
    lora = "lora/pytorch_lora_weights.safetensors"
    assert relative_difference(load_file(tmp_path / "nodes" / lora), load_file(tmp_path / "one" / lora)) <= 1e-5


def test_a_resume_at_another_process_count_keeps_the_global_batch_or_names_the_batch_size(teacher, prompts, tmp_path,
                                                                                         capsys):  # fmt: skip
    argv = ["train", "--teacher", str(teacher), "--prompts", str(prompts), "--fake-rank", "4", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "fewstep.cli"]  # fmt: skip
    first = subprocess.run([*launch, *argv, "--batch-size", "2", "--max-steps", "2", "--output", str(tmp_path / "run")],
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    capsys.readouterr()
    resume = ["train", "--output", str(tmp_path / "run"), "--resume", "--max-steps", "4"]
    assert main(resume) == 2  # 1 process × batch 2 would halve the global batch
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "global batch is 4" in err and "--batch-size 4" in err
    assert main([*resume, "--batch-size", "4"]) == 0
    assert main([*argv, "--batch-size", "4", "--output", str(tmp_path / "one")]) == 0  # one process throughout
    lora = "lora/pytorch_lora_weights.safetensors"
    assert relative_difference(load_file(tmp_path / "run" / lora), load_file(tmp_path / "one" / lora)) <= 1e-5
