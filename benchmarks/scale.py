"""``fewstep bench scale``: DMD2 training throughput against the process count, and what the processes exchange.

Each process count runs ``fewstep train`` on the digits teacher under ``torchrun --nproc_per_node N`` (gloo on the
CPU, NCCL on GPUs) with the same per-process batch (weak scaling: the global batch grows with N), and reads the
trainer's own closing line: samples per second of the global batch over the iterations (start-up excluded),
collectives and MB all-reduced per iteration. On a GPU machine every count up to its GPUs is measured, with the GPU
named; on the CPU, 1 and 2 processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HELP = "training samples/s at 1..N processes (digits teacher), collectives and MB all-reduced per iteration"
THROUGHPUT = re.compile(r"fewstep: (\d+) iterations in ([\d.]+) s: ([\d.]+) samples/s .*?per iteration ([\d.]+) "
                        r"collectives, ([\d.]+) MB all-reduced")  # fmt: skip


def add_arguments(parser) -> None:
    parser.add_argument("--processes", type=int, nargs="+", default=None,
                        help="process counts (default: 1 and 2 on the CPU, 1..GPUs on a GPU machine)")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=100, help="training iterations per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="per-process batch (default: %(default)s)")
    parser.add_argument("--out", default="fewstep-bench-scale", help="run folders (default: %(default)s)")


def _device() -> tuple[str, int]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.cuda.device_count()
    return "CPU (gloo)", 2


def run(args) -> dict:
    from ..digits.teacher import digits_teacher, write_digit_prompts

    device, available = _device()
    counts = args.processes or list(range(1, available + 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, prompts = digits_teacher(), write_digit_prompts(out / "prompts.txt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for count in counts:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
                   "-m", "fewstep.cli", "train", "--teacher", str(teacher), "--prompts", str(prompts),
                   "--output", str(out / f"processes-{count}"), "--overwrite", "--max-steps", str(args.iterations),
                   "--batch-size", str(args.batch_size), "--checkpoint-every", "0", "--validate-every", "0",
                   "--report-to", "none", "--gen-rank", "16", "--fake-rank", "16"]  # fmt: skip
        print(f"bench scale: {count} process(es) on {device}", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        found = THROUGHPUT.search(done.stdout + done.stderr)
        if done.returncode or found is None:
            raise RuntimeError(f"{count} process(es) failed: {(done.stdout + done.stderr).strip().splitlines()[-3:]}")
        iterations, seconds, samples, collectives, mb = found.groups()
        rows.append({"processes": count, "iterations": int(iterations), "seconds": float(seconds),
                     "samples_per_s": float(samples), "collectives_per_iteration": float(collectives),
                     "mb_all_reduced_per_iteration": float(mb)})  # fmt: skip
    base = rows[0]["samples_per_s"] / rows[0]["processes"]
    for row in rows:
        row["scaling_efficiency"] = round(row["samples_per_s"] / (base * row["processes"]), 3)
    return {"device": device, "batch_size_per_process": args.batch_size, "rows": rows}


def format_table(result: dict) -> str:
    header = f"{'processes':>9} {'samples/s':>10} {'efficiency':>10} {'collectives/it':>14} {'MB/it':>8}"
    lines = [f"{result['device']}, batch {result['batch_size_per_process']} per process", header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(f"{r['processes']:>9} {r['samples_per_s']:>10.2f} {r['scaling_efficiency']:>10.2f} "
                     f"{r['collectives_per_iteration']:>14.1f} {r['mb_all_reduced_per_iteration']:>8.2f}")
    return "\n".join(lines)
