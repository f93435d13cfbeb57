"""Progressive Distillation (Salimans & Ho 2022, Alg. 2) in rounds on one shared base UNet.

Each round trains a student to take in ONE deterministic DDIM step what its teacher takes in TWO, halving the
step count (e.g. 32 → 16 → 8 → 4 → 2 → 1). No second UNet, ever:
  * round 0's teacher is the base UNet, adapters off, with CFG at the distillation scale (the student absorbs
    the guidance, as in guided PD, Meng et al. 2023 — here in round 0 instead of a separate w-conditioned stage);
  * in round r > 0 the teacher is the previous round's student, held as the frozen adapter ``previous`` on the
    same UNet, without CFG; the trainable adapter ``generator`` starts from those same weights.
Target ``core.progressive_target`` of the teacher's two DDIM steps, loss ``core.progressive_loss`` (x-space MSE,
truncated-SNR weight max(SNR, 1)). The student keeps the teacher's prediction type (ε or v) and is read as x0
through the schedule, as every fewstep sampler reads it; docs/methods.md says why and what it measures.

Training inputs z_t are noised teacher samples (the teacher ODE pairs' y, shared with DMD), so PD needs no data.
Each finished round's LoRA is exported to ``lora/steps-N/`` with its timesteps and its sampler (deterministic
DDIM) in ``fewstep_recipe.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...core.losses import PD_WEIGHTINGS, progressive_loss, progressive_target
from ...core.sampling import ddim_step, ddim_timesteps, sample_ddim
from ..data.pair_cache import TeacherPairOptions
from ..loop.networks import GENERATOR, SharedUNetNetworks, attach_adapters
from ..loop.trainer import MethodRun, TrainConfig, TrainingContext, TrainingError, lr_factor, train
from ..loop.regression import teacher_pairs
from ..loop.update_loop import AdapterUpdateLoop, frozen
from .base import Method

PREVIOUS = "previous"  # the previous round's student: a frozen adapter, the teacher of rounds ≥ 1
DEMO_START_STEPS = 8  # the digits demo's first round; --num-steps is its last


@dataclass
class ProgressiveTrainConfig(TeacherPairOptions, TrainConfig):
    """``fewstep train --method progressive`` options (``--max-steps`` is split evenly over the rounds)."""

    # The rounds split --max-steps evenly, so a resumed run keeps its --max-steps (a new one would move the rounds).
    max_steps: int = field(
        default=1000, metadata={"help": "training iterations, all rounds together (split evenly)", "min": 1}
    )
    start_steps: int = field(
        default=32,
        metadata={"help": "round 0's student steps (its teacher, the base UNet, takes twice as many)", "min": 1},
    )
    end_steps: int = field(
        default=1, metadata={"help": "the last round's student steps (start / end a power of 2)", "min": 1}
    )
    pd_weighting: str = field(
        default="truncated_snr",
        metadata={"help": "the loss weight over t: 'truncated_snr' (x-space max(SNR, 1), the paper's) or 'eps' (an "
                          "ε-space MSE: a round's steps weigh alike for an ε-prediction teacher)",
                  "choices": list(PD_WEIGHTINGS)},
    )  # fmt: skip


def round_step_counts(start_steps: int, end_steps: int) -> list[int]:
    """The student step count of each round: start, start/2, …, end."""
    counts = [start_steps]
    while counts[-1] > end_steps:
        counts.append(counts[-1] // 2)
    return counts


def pd_timesteps(num_steps: int) -> tuple[list[int], list[int]]:
    """(student grid, teacher grid): trailing DDIM spacing, so teacher step 2i starts where student step i does."""
    return ddim_timesteps(num_steps), ddim_timesteps(2 * num_steps)


@dataclass
class ProgressiveBatch:
    """Clean samples x0 (the teacher's own, from the ODE pairs) and their conditioning."""

    x0: torch.Tensor
    cond: Any


class ProgressiveLoop(AdapterUpdateLoop):
    """PD iterations over rounds; the round follows from the iteration, so resuming anywhere is exact."""

    def __init__(
        self,
        networks: SharedUNetNetworks,
        optimizer: torch.optim.Optimizer,
        rounds: list[int],
        iterations_per_round: int,
        end_of_round: Callable[[int], None] = lambda num_steps: None,
        lr_scheduler=None,
        weighting: str = "truncated_snr",
        **kwargs,
    ):
        super().__init__({GENERATOR: optimizer}, {GENERATOR: lr_scheduler}, **kwargs)
        self.networks = networks
        self.optimizer = optimizer
        self.rounds = rounds
        self.iterations_per_round = iterations_per_round
        self.end_of_round = end_of_round
        self.weighting = weighting
        self.round = 0

    @property
    def schedule(self):
        return self.networks.schedule

    def round_of(self, step: int) -> int:
        return min(step // self.iterations_per_round, len(self.rounds) - 1)

    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Round 0: the base UNet with CFG; later rounds: the previous student (frozen adapter), no CFG."""
        if self.round == 0:
            return self.networks.real_score(x_t, t, cond)
        return self.networks.fake_score(x_t, t, cond)  # the second adapter is ``previous`` here

    def begin_round(self, new_round: int) -> None:
        """Hand the finished round's student over: export it, freeze a copy as the teacher, fresh Adam moments."""
        self.end_of_round(self.rounds[self.round])
        with torch.no_grad():
            for teacher_param, student_param in zip(self.networks.fake_score_parameters(), self.networks.generator_parameters()):
                teacher_param.copy_(student_param)
        self.optimizer.state.clear()
        self.round = new_round

    def progressive_loss(self, batch: ProgressiveBatch, step_index: int) -> tuple[torch.Tensor, dict]:
        """One PD loss: noise x0 to the student's t_i, two teacher DDIM steps, one student step's x0 vs x̃."""
        num_steps = self.rounds[self.round]
        _, teacher_grid = pd_timesteps(num_steps)
        t, t_mid = teacher_grid[2 * step_index], teacher_grid[2 * step_index + 1]
        t_next = teacher_grid[2 * step_index + 2] if 2 * step_index + 2 < len(teacher_grid) else -1
        batch_size = batch.x0.shape[0]
        as_batch = lambda timestep: torch.full((batch_size,), timestep, device=self.device)
        with torch.no_grad():
            z_t = self.schedule.add_noise(batch.x0, self._randn(batch.x0.shape), t)
            z_mid = ddim_step(self.teacher(z_t, as_batch(t), batch.cond), z_t, t, t_mid, self.schedule)
            z_next = ddim_step(self.teacher(z_mid, as_batch(t_mid), batch.cond), z_mid, t_mid, t_next, self.schedule)
            target = progressive_target(z_t, z_next, t, t_next, self.schedule)
        x0 = self.networks.generator(z_t, as_batch(t), batch.cond)
        loss, metrics = progressive_loss(x0, target, as_batch(t), self.schedule, self.weighting)
        return loss, metrics

    def _backward(self, batch: ProgressiveBatch, step_index: int, weight: float) -> tuple[bool, dict]:
        # Only the generator's adapter is in the graph: one backward, with it active (exact under checkpointing).
        with frozen(self.networks.fake_score_parameters()):
            loss, metrics = self.progressive_loss(batch, step_index)
            if not self.all_finite(loss.detach()):
                return False, metrics
            self.networks.activate(GENERATOR)
            self._scaled(loss * weight, GENERATOR).backward()
        return True, metrics

    def train_step(self, batches: ProgressiveBatch | list[ProgressiveBatch]) -> dict[str, float]:
        batches = [batches] if isinstance(batches, ProgressiveBatch) else list(batches)
        current = self.round_of(self.step)
        if current != self.round:
            self.begin_round(current)
        num_steps = self.rounds[self.round]
        step_index = int(torch.randint(0, num_steps, (1,), generator=self.shared_rng))  # same on all ranks
        weight = 1.0 / len(batches)
        grad_norm, metrics = self._update(
            GENERATOR,
            (self._backward(batch, step_index, weight) for batch in batches),
            self.networks.generator_parameters(),
            self.optimizer,
        )
        metrics.update(
            grad_norm_gen=grad_norm, round_steps=torch.tensor(num_steps), student_step=torch.tensor(step_index)
        )
        return self._end_iteration(metrics)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.round = int(state["round"])


def recipe(num_steps: int) -> dict:
    return {"method": "progressive", "timesteps": pd_timesteps(num_steps)[0], "sampler": "ddim"}


class Progressive(Method):
    """``--method progressive``."""

    name = "PD"
    key = "progressive"  # fewstep train --method KEY
    title = "Progressive Distillation"
    paper = ("Progressive Distillation (Salimans & Ho, *Progressive Distillation for Fast Sampling of Diffusion "
             "Models*, 2022)")  # fmt: skip
    summary = ("Progressive Distillation: rounds that halve the DDIM steps (--start-steps → --end-steps); the previous "
               "round's student is a frozen adapter; every round's LoRA goes to RUN_DIR/lora/steps-N/.")  # fmt: skip
    config_class = ProgressiveTrainConfig
    demo_steps = f"halves {DEMO_START_STEPS} steps down to --num-steps"

    def check(self, config: ProgressiveTrainConfig, family: str, use_gan: bool, num_processes: int) -> None:
        start, end = config.start_steps, config.end_steps
        if end < 1 or start < end or start % end or not math.log2(start // end).is_integer():
            raise TrainingError(
                f"--start-steps {start} --end-steps {end}: each round halves the steps, so start / end must be a "
                "power of 2 and end ≥ 1 (e.g. 32 and 1)"
            )
        rounds = len(round_step_counts(start, end))
        if config.max_steps < rounds:
            raise TrainingError(f"--max-steps {config.max_steps} is fewer than the {rounds} rounds; give at least one "
                                "iteration per round")  # fmt: skip
        if config.ema_decay:
            raise TrainingError(f"--ema-decay {config.ema_decay}: progressive distillation uses no EMA (Salimans & "
                                "Ho); leave it at 0")  # fmt: skip
        if config.images:
            raise TrainingError("--images feeds DMD2's GAN; progressive distils on the teacher's own samples")

    def build(self, ctx: TrainingContext) -> MethodRun:
        config = ctx.config
        unet = ctx.unet
        # ``previous`` has the generator's shape so that a round's student can be copied into it.
        attach_adapters(unet, config.gen_rank, config.gen_alpha, config.gen_rank, config.gen_alpha,
                        second_adapter=PREVIOUS)  # fmt: skip
        networks = SharedUNetNetworks(unet, ctx.schedule, ctx.uncond, config.guidance_scale, second_adapter=PREVIOUS)
        for param in networks.fake_score_parameters():
            param.requires_grad_(False)  # the previous student is a teacher: never trained
        rounds = round_step_counts(config.start_steps, config.end_steps)
        per_round = config.max_steps // len(rounds)
        optimizer = ctx.adamw(networks.generator_parameters(), config.lr)
        # Each round has its own warm-up and decay (the paper decays the rate to 0 within each halving).
        schedule = ctx.lr_scheduler(
            optimizer,
            lambda it: lr_factor(min(it - per_round * min(it // per_round, len(rounds) - 1), per_round),
                                 config.warmup_steps, per_round, config.lr_schedule),
        )  # fmt: skip
        pairs = teacher_pairs(ctx, networks.real_score)
        lora = ctx.run_dir / "lora"
        loop = ProgressiveLoop(
            networks, optimizer, rounds, per_round, lr_scheduler=schedule, weighting=config.pd_weighting,
            end_of_round=lambda n: ctx.export_lora(GENERATOR, lora / f"steps-{n}", recipe(n)),
            seed=config.seed, processes=ctx.processes, max_grad_norm=config.max_grad_norm, device=ctx.device,
            fp16_loss_scaling=config.mixed_precision == "fp16",
        )  # fmt: skip

        def next_batch() -> ProgressiveBatch:
            idx = ctx.draw_indices(len(pairs), config.batch_size)
            cond = ctx.prompt_cond.select(pairs.prompt_index[idx]).to(ctx.device)
            return ProgressiveBatch(x0=pairs.target[idx].to(ctx.device), cond=cond)

        @torch.no_grad()
        def sample_student(noise, cond):
            n = noise.shape[0]
            denoise = lambda x, t: networks.generator(x, torch.full((n,), t, device=ctx.device), cond)
            return sample_ddim(denoise, noise, recipe(rounds[loop.round])["timesteps"], ctx.schedule)

        current = lambda: rounds[loop.round]
        return MethodRun(
            loop=loop,
            adapters=[GENERATOR, PREVIOUS],
            next_batch=next_batch,
            sample_student=sample_student,
            teacher=networks.real_score,
            recipe=lambda: recipe(current()),
            on_finish=lambda: ctx.export_lora(GENERATOR, lora / f"steps-{current()}", recipe(current())),
        )

    def card_description(self, config: dict) -> str:
        return "Progressive Distillation (each round: one student DDIM step = two of its teacher's)"

    def demo_steps_error(self, num_steps: int) -> str | None:
        if num_steps > DEMO_START_STEPS or DEMO_START_STEPS % num_steps:
            *most, last = map(str, round_step_counts(DEMO_START_STEPS, 1))
            return (f"--method {self.key} halves {DEMO_START_STEPS} steps: --num-steps must be {', '.join(most)} or "
                    f"{last}, got {num_steps}")  # fmt: skip
        return None

    def demo_options(self, settings, num_steps: int, real_dir) -> dict:
        # Rounds from DEMO_START_STEPS down to num_steps, at least one iteration for each of the most rounds.
        most_rounds = len(round_step_counts(DEMO_START_STEPS, 1))
        return dict(start_steps=DEMO_START_STEPS, end_steps=num_steps, max_steps=max(settings.max_steps, most_rounds),
                    pd_weighting=settings.pd_weighting)


def train_progressive(config: ProgressiveTrainConfig, resume: bool = False, on_step=None, overwrite: bool = False):
    """Run Progressive Distillation. ``on_step(step, metrics)`` after each iteration; True stops the run."""
    return train(Progressive(), config, resume=resume, on_step=on_step, overwrite=overwrite)
