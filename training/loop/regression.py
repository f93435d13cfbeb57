"""Distribution matching plus regression onto teacher ODE pairs: DMD's generator loss and DMD2's warm start.

:class:`DMDLoop` is DMD2's loop with a regression term ``regression_weight × d(G(z), y)`` on the generator's turn
(``core.regression_loss``; latent pseudo-Huber by default), and regression-only iterations while
``step < init_regression_steps``. ``--method dmd`` runs it throughout; ``--method dmd2 --init-regression-steps N``
runs it as a warm start. :func:`teacher_pairs` makes the pairs (also progressive distillation's data).

The regression term runs in its own backward with the generator's adapter active: it involves no other network,
so, like DMD2's staged backward, no backward ever crosses two adapters (exact with gradient checkpointing).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

import torch

from ...core.losses import regression_loss
from ..data.pair_cache import (PairCacheMismatch, TeacherPairs, check_pair_manifest, count_saved_pairs,
                               ensure_teacher_pairs, load_teacher_pairs)  # fmt: skip
from .dmd2_loop import DMD2Batch, DMD2Loop
from .errors import TrainingError
from .interrupts import RunInterrupted
from .networks import GENERATOR
from .trainer import MethodRun, TrainingContext
from .update_loop import frozen


@dataclass
class DMDBatch(DMD2Batch):
    """A DMD2 batch plus teacher ODE pairs: noise z, the teacher's sample y, and z's conditioning."""

    pair_noise: torch.Tensor | None = None
    pair_target: torch.Tensor | None = None
    pair_cond: Any = None


class DMDLoop(DMD2Loop):
    """DMD2's loop with a regression term on the generator's turn (and regression-only warm-start iterations)."""

    def __init__(self, *args, regression_weight: float, init_regression_steps: int, regression_kind: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.regression_weight = regression_weight
        self.init_regression_steps = init_regression_steps
        self.regression_kind = regression_kind
        self._pending: list[DMDBatch] = []

    def in_warm_start(self) -> bool:
        return self.step < self.init_regression_steps

    def is_generator_turn(self, step: int | None = None) -> bool:
        step = self.step if step is None else step
        return step < self.init_regression_steps or super().is_generator_turn(step)

    def train_step(self, batches) -> dict[str, float]:
        batches = [batches] if isinstance(batches, DMD2Batch) else list(batches)
        self._pending = list(batches)  # the generator's turn takes them in micro-batch order
        return super().train_step(batches)

    def regression_loss(self, batch: DMDBatch) -> tuple[torch.Tensor, dict]:
        """d(G(z), y): the generator's x0 from the pair's noise at its first timestep, against the teacher's y."""
        t = torch.full((batch.pair_noise.shape[0],), self.config.student_timesteps[0], device=self.device)
        x0 = self.networks.generator(batch.pair_noise, t, batch.pair_cond)
        return regression_loss(x0, batch.pair_target, kind=self.regression_kind)

    def _regression_backward(self, batch: DMDBatch, weight: float) -> tuple[bool, dict]:
        with frozen(self.networks.fake_score_parameters()):
            loss, metrics = self.regression_loss(batch)
            if not self.all_finite(loss.detach()):
                return False, metrics
            self.networks.activate(GENERATOR)
            self._scaled(loss * weight, GENERATOR).backward()
        return True, metrics

    def _generator_backward(self, x: torch.Tensor, cond: Any, weight: float) -> tuple[bool, dict]:
        batch = self._pending.pop(0)
        warm = self.in_warm_start()
        finite, metrics = (True, {}) if warm else super()._generator_backward(x, cond, weight)
        regression_weight = 1.0 if warm else self.regression_weight
        if not finite or regression_weight == 0:
            return finite, metrics
        finite, regression_metrics = self._regression_backward(batch, weight * regression_weight)
        return finite, {**metrics, **regression_metrics}


def teacher_pairs(ctx: TrainingContext, teacher_x0) -> TeacherPairs:
    """The run's teacher ODE pairs: made (or resumed) by every process, each its share of the shards, then loaded
    by every process.

    ``teacher_x0(x_t, t, cond)`` is the teacher with CFG at the distillation scale (the base UNet, adapters off).
    """
    config = ctx.config
    pairs_dir = ctx.run_dir / "pairs"
    manifest = {
        **ctx.teacher_fingerprint, "pair_steps": config.pair_steps, "seed": config.seed, "num_pairs": config.num_pairs,
        "latent_shape": list(ctx.latent_shape),
    }  # fmt: skip
    prompt_cond = ctx.prompt_cond
    if ctx.is_main_process:  # the manifest is written (or checked) once, before any process reads it
        try:
            check_pair_manifest(pairs_dir, manifest)
        except PairCacheMismatch as error:
            raise TrainingError(str(error)) from None
    ctx.wait_for_everyone()
    try:  # every process makes its share of the shards
        ensure_teacher_pairs(
            pairs_dir, manifest, config.num_pairs,
            lambda x, t, idx: teacher_x0(x, t, prompt_cond.select(idx).to(ctx.device)),
            ctx.schedule, ctx.latent_shape, len(prompt_cond), device=ctx.device,
            show_progress=ctx.is_main_process, process_index=ctx.process_index, num_processes=ctx.num_processes,
        )  # fmt: skip
    except PairCacheMismatch as error:
        raise TrainingError(str(error)) from None
    except RunInterrupted as stop:  # Ctrl-C before the loop: the finished shards stay and are reused
        saved = count_saved_pairs(pairs_dir, config.num_pairs)
        command = f"fewstep train --output {shlex.quote(str(ctx.run_dir))} --resume"
        raise RunInterrupted(
            stop.exit_code - 128,
            f"stopped while making the teacher ODE pairs: {saved} of {config.num_pairs} are saved in {pairs_dir}; "
            f"continue with: {command}",
        ) from None
    ctx.wait_for_everyone()
    return load_teacher_pairs(pairs_dir, config.num_pairs)


def with_teacher_pairs(ctx: TrainingContext, run: MethodRun, networks) -> MethodRun:
    """``run`` (built with a :class:`DMDLoop`) fed teacher ODE pairs: made or resumed, then loaded, every batch."""
    config = ctx.config
    pairs = teacher_pairs(ctx, networks.real_score)
    prompt_cond = ctx.prompt_cond
    dm_batch = run.next_batch

    def next_batch() -> DMDBatch:
        batch = dm_batch()
        idx = ctx.draw_indices(len(pairs), config.batch_size)
        return DMDBatch(
            **vars(batch), pair_noise=pairs.noise[idx].to(ctx.device), pair_target=pairs.target[idx].to(ctx.device),
            pair_cond=prompt_cond.select(pairs.prompt_index[idx]).to(ctx.device),
        )  # fmt: skip

    run.next_batch = next_batch
    # The EMA follows the generator's updates, regression-only ones included.
    run.updated_generator = lambda metrics: "loss_dm" in metrics or "loss_reg" in metrics
    return run
