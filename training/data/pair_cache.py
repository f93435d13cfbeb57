"""Teacher ODE pairs (z, y): noise z and the teacher's deterministic DDIM sample y from z (DMD §3.3).

Generated once per run into ``RUN_DIR/pairs/`` as safetensors shards (``pairs-000000.safetensors``, … each with
``noise``, ``target`` and ``prompt_index``), next to a ``manifest.json`` naming what made them. Pair i is a pure
function of (teacher, CFG, resolution, prompts, DDIM steps, seed, i): its noise comes from its own seeded RNG and
its prompt is prompt i mod P, so an interrupted generation resumes at the first missing shard and ends with
exactly the pairs an uninterrupted one would have made. A shard is written to a temporary name and renamed, so a
half-written shard never counts. Pairs made for another teacher, CFG, resolution or prompt list are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ...core.sampling import ddim_timesteps, sample_ddim

MANIFEST = "manifest.json"
SHARD_SIZE = 64


@dataclass
class TeacherPairOptions:
    """Teacher ODE pairs (noise z, the teacher's DDIM sample from z): DMD's regression data, DMD2's warm start."""

    num_pairs: int = field(
        default=1000, metadata={"help": "teacher ODE pairs generated once into RUN_DIR/pairs", "min": 1}
    )
    pair_steps: int = field(default=50, metadata={"help": "teacher DDIM steps (with CFG) per pair", "min": 1})
    regression_loss: str = field(
        default="pseudo_huber", metadata={"help": "distance of the regression loss, on latents (LPIPS is not offered: "
                                                  "it needs pretrained VGG/AlexNet weights)",
                                          "choices": ["pseudo_huber", "l2"]},
    )  # fmt: skip


class PairCacheMismatch(ValueError):
    """The pairs on disk were made by another teacher setting."""


@dataclass
class TeacherPairs:
    """All cached pairs, loaded: noise (N, C, H, W), target (N, C, H, W), prompt_index (N,)."""

    noise: torch.Tensor
    target: torch.Tensor
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return self.noise.shape[0]


def pair_noise(index: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Pair ``index``'s noise z, from its own RNG (so it does not depend on which shards were made before)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def _shard_path(directory: Path, start: int) -> Path:
    return directory / f"pairs-{start:06d}.safetensors"


def check_pair_manifest(directory: Path, manifest: dict) -> None:
    """Refuse pairs made for another setting; write the manifest of a new pair folder."""
    _check_manifest(Path(directory), manifest)


def _check_manifest(directory: Path, manifest: dict) -> None:
    path = directory / MANIFEST
    if path.is_file():
        saved = json.loads(path.read_text())
        differs = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
        if differs:
            details = "; ".join(f"{k}: cached {saved.get(k)!r}, this run {manifest.get(k)!r}" for k in differs)
            raise PairCacheMismatch(
                f"teacher pairs in {directory} were made for another setting ({details}); delete {directory} or use "
                "a new --output"
            )
    else:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n")


def ensure_teacher_pairs(
    directory: str | Path,
    manifest: dict,
    num_pairs: int,
    teacher_x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    schedule,
    latent_shape: tuple[int, ...],
    num_prompts: int,
    device: torch.device | str = "cpu",
    shard_size: int = SHARD_SIZE,
    after_shard: Callable[[int], None] | None = None,
    show_progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
) -> None:
    """Make the missing shards of ``num_pairs`` pairs in ``directory`` (nothing when all are there); with several
    processes, process i makes shards i, i+N, ... (its share: nobody waits on one process making them all).

    ``manifest`` must hold ``pair_steps`` and ``seed`` besides the teacher fingerprint. ``teacher_x0(x_t, t, idx)``
    is the teacher with CFG for prompts ``idx``; ``after_shard(n_done)`` is called after each shard is written.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    directory = Path(directory)
    _check_manifest(directory, manifest)
    starts = [s for s in range(0, num_pairs, shard_size) if (s // shard_size) % num_processes == process_index]
    missing = [s for s in starts if not _shard_path(directory, s).is_file()]
    done = sum(min(shard_size, num_pairs - s) for s in starts if s not in missing)
    num_pairs_here = sum(min(shard_size, num_pairs - s) for s in starts)
    bar = tqdm(total=num_pairs_here, initial=done, desc="teacher ODE pairs", unit="pair", disable=not show_progress)
    timesteps = ddim_timesteps(int(manifest["pair_steps"]))
    for start in missing:
        indices = list(range(start, min(start + shard_size, num_pairs)))
        noise = torch.stack([pair_noise(i, latent_shape, int(manifest["seed"])) for i in indices]).to(device)
        prompt_index = torch.tensor([i % num_prompts for i in indices])
        n = len(indices)
        with torch.no_grad():
            denoise = lambda x, t: teacher_x0(x, torch.full((n,), t, device=x.device), prompt_index)
            target = sample_ddim(denoise, noise, timesteps, schedule)
        tensors = {"noise": noise.float().cpu(), "target": target.float().cpu(), "prompt_index": prompt_index}
        final = _shard_path(directory, start)
        tmp = final.with_name(final.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, final)
        done += n
        bar.update(n)
        if after_shard is not None:
            after_shard(done)
    bar.close()


def count_saved_pairs(directory: str | Path, num_pairs: int, shard_size: int = SHARD_SIZE) -> int:
    """How many of ``num_pairs`` pairs are already in finished shards."""
    starts = range(0, num_pairs, shard_size)
    return sum(min(shard_size, num_pairs - s) for s in starts if _shard_path(Path(directory), s).is_file())


def load_teacher_pairs(directory: str | Path, num_pairs: int, shard_size: int = SHARD_SIZE) -> TeacherPairs:
    """The first ``num_pairs`` cached pairs, in index order."""
    from safetensors.torch import load_file

    directory = Path(directory)
    shards = [load_file(_shard_path(directory, s)) for s in range(0, num_pairs, shard_size)]
    return TeacherPairs(
        noise=torch.cat([s["noise"] for s in shards]),
        target=torch.cat([s["target"] for s in shards]),
        prompt_index=torch.cat([s["prompt_index"] for s in shards]),
    )
