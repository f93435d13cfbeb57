"""DMD2's training loop, independent of the model family.

The generator, the fake score (with the GAN discriminator on its features) and the real score (the teacher with
CFG) sit behind :class:`DMD2Networks`. The exact-teacher toy (``fewstep.toy``) and the Stable Diffusion trainer
(``fewstep.training.dmd2``) both drive this one loop.

One iteration (two time-scale update rule, DMD2 §4.1):
  1. the generator produces x0 from noise (backward simulation for multi-step students), with grad on its turn;
  2. every ``dfake_gen_update_ratio``-th iteration: generator update = DM loss (+ GAN generator loss);
  3. every iteration: fake-score update = denoising loss on the detached samples (+ GAN discriminator loss);
  4. every iteration: both learning-rate schedulers step (the reference's unit: iterations, not updates).

Backward in stages. The networks may share weights that are switched in and out (fewstep's shared UNet with two
LoRA adapters), and gradient checkpointing recomputes a block's forward during backward with whatever weights are
active *then*. So no backward ever crosses two networks: on a generator turn, ∂L/∂x is computed first with the
fake score's weights active (the GAN term runs through its discriminator), then ``x.backward(∂L/∂x)`` runs with
the generator's weights active. Each backward runs with the same ``requires_grad`` flags as its forward, which
non-reentrant checkpointing also needs (it checks that recomputation saves the same tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch

from ...core.losses import (
    denoising_loss,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from ...core.sampling import sample_few_step
from ...core.schedule import NoiseSchedule
from .networks import FAKE_SCORE, GENERATOR  # the roles :meth:`DMD2Networks.activate` takes
from .update_loop import AdapterUpdateLoop, default_clip, frozen


class DMD2Networks(Protocol):
    """The three denoisers of DMD2. Each takes ``(x_t, t, cond)`` with t a (B,) long tensor and returns x0."""

    schedule: NoiseSchedule

    def generator(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def real_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def fake_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def discriminator(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """GAN logits from the fake score's features (only needed when a GAN weight is > 0)."""
        ...

    def activate(self, network: str) -> None:
        """Make ``network``'s weights ("generator" or "fake_score") the ones in use until the next call.

        Called before each backward so that checkpointed blocks recompute with the right weights; networks with
        separate weights make it a no-op.
        """
        ...

    def generator_parameters(self) -> list[torch.nn.Parameter]: ...

    def fake_score_parameters(self) -> list[torch.nn.Parameter]:
        """The fake score's trainable parameters, GAN head included."""
        ...


DM_TIMESTEPS = ("full", "below_input")  # the DM loss's timestep range per student step (DMD2LoopConfig)


@dataclass
class DMD2LoopConfig:
    """Hyper-parameters of the loop itself (the model-specific ones live with each trainer)."""

    student_timesteps: list[int] = field(default_factory=lambda: [999])
    dfake_gen_update_ratio: int = 10  # fake-score updates per generator update (TTUR)
    dm_min_timestep: int = 20  # DM loss t ~ U[0.02·T, 0.98·T]
    dm_max_timestep: int = 980
    # "below_input": a student step that takes its input at t_k draws its DM loss's t ≤ t_k, the noise levels whose
    # detail that step still decides (as Phased DMD restricts each phase's score matching to its SNR interval); the
    # first step (from noise) keeps the whole range. "full": every step at t ~ U[dm_min, dm_max], the reference's,
    # which made the digits' 4-step student trail the 1-step one (docs/methods.md). One-step students: the same.
    dm_timesteps: str = "below_input"
    gan_generator_weight: float = 0.0  # 0 disables the GAN (DMD2 "stage 1")
    gan_discriminator_weight: float = 0.0
    backward_simulation: bool = True  # multi-step: the generator's input at t_k comes from its own earlier steps
    use_fake_score: bool = True  # False = ablation: real score only (DMD Fig. 3, collapses)
    max_grad_norm: float = 10.0


@dataclass
class DMD2Batch:
    """One iteration's data. ``cond`` conditions the generated samples; real data feeds the GAN."""

    shape: tuple[int, ...]  # generator noise shape (B, ...)
    cond: Any = None
    real_x0: torch.Tensor | None = None
    real_cond: Any = None


class DMD2Loop(AdapterUpdateLoop):
    """Runs DMD2 iterations over :class:`DMD2Networks`; owns the RNGs so a run is reproducible and resumable.

    ``processes`` (the trainer's :class:`~.distributed.ProcessGroup`) averages gradients across processes and
    slices the global batch's draws. ``fp16_loss_scaling`` scales each optimizer's losses with its own dynamic ``GradScaler`` (the DM
    gradient is ~1/numel per element and underflows in fp16 without it). Both learning-rate schedulers step once
    per iteration, whether or not their optimizer updated.
    """

    def __init__(
        self,
        networks: DMD2Networks,
        generator_optimizer: torch.optim.Optimizer,
        fake_score_optimizer: torch.optim.Optimizer,
        config: DMD2LoopConfig,
        seed: int = 0,
        processes=None,
        generator_lr_scheduler=None,
        fake_score_lr_scheduler=None,
        clip_grad_norm: Callable[[list, float], torch.Tensor] = default_clip,
        device: torch.device | str = "cpu",
        fp16_loss_scaling: bool = False,
    ):
        if config.dfake_gen_update_ratio < 1:
            raise ValueError(f"dfake_gen_update_ratio must be ≥ 1, got {config.dfake_gen_update_ratio}")
        if config.dm_timesteps not in DM_TIMESTEPS:
            raise ValueError(f"dm_timesteps must be one of {', '.join(DM_TIMESTEPS)}, got {config.dm_timesteps!r}")
        super().__init__(
            {GENERATOR: generator_optimizer, FAKE_SCORE: fake_score_optimizer},
            {GENERATOR: generator_lr_scheduler, FAKE_SCORE: fake_score_lr_scheduler},
            seed=seed,
            processes=processes,
            max_grad_norm=config.max_grad_norm,
            clip_grad_norm=clip_grad_norm,
            device=device,
            fp16_loss_scaling=fp16_loss_scaling,
        )
        self.networks = networks
        self.input_timestep = networks.schedule.num_train_timesteps - 1  # set by each generate()
        self.generator_optimizer = generator_optimizer
        self.fake_score_optimizer = fake_score_optimizer
        self.config = config

    @property
    def schedule(self) -> NoiseSchedule:
        return self.networks.schedule

    # ---------------------------------------------------------------- the three phases
    def generate(self, batch: DMD2Batch, grad: bool) -> tuple[torch.Tensor, Any]:
        """The generator's x0 for this iteration and the conditioning it was made with.

        Multi-step students are trained at a random student step k (same k on all ranks). With backward
        simulation the input at t_k is made exactly as at inference: the generator's own first k steps (no grad)
        re-noised to t_k; without it, a noised real sample (the train/inference mismatch DMD2 removes).
        """
        timesteps = self.config.student_timesteps
        k = int(torch.randint(0, len(timesteps), (1,), generator=self.shared_rng)) if len(timesteps) > 1 else 0
        noise = self._randn(batch.shape)
        cond = batch.cond
        batch_size = batch.shape[0]

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            return self.networks.generator(x, torch.full((batch_size,), t, device=self.device), cond)

        if k == 0:
            x_in = noise
        elif self.config.backward_simulation:
            with torch.no_grad():
                renoise = lambda x: self._randn(x.shape).to(x.dtype)  # the global batch's draw, this process's rows
                x0 = sample_few_step(denoise, noise, timesteps[:k], self.schedule, renoise)
            x_in = self.schedule.add_noise(x0, self._randn(batch.shape), timesteps[k])
        else:
            if batch.real_x0 is None:
                raise ValueError("multi-step training without backward simulation needs real data (real_x0)")
            cond = batch.real_cond
            x_in = self.schedule.add_noise(batch.real_x0, self._randn(batch.shape), timesteps[k])
        # the input timestep of the step that made x (noise counts as T−1): the DM loss's range may depend on it
        self.input_timestep = timesteps[k] if k > 0 else self.schedule.num_train_timesteps - 1
        with torch.set_grad_enabled(grad):
            x = denoise(x_in, timesteps[k])
        return x, cond

    def generator_loss(self, x: torch.Tensor, cond: Any) -> tuple[torch.Tensor, dict]:
        """DM loss at t ~ U[dm_min, dm_max] (+ GAN generator loss) as a function of ``x`` alone. With
        ``dm_timesteps="below_input"`` the upper end is the input timestep of the step that made ``x`` (the last
        :meth:`generate`).

        Run it with the fake score's parameters frozen (the caller does): its graph reaches them only through the
        GAN term, and they must get no gradient on the generator's turn.
        """
        cfg = self.config
        batch_size = x.shape[0]
        t = self._randint(cfg.dm_min_timestep, self.dm_max_timestep() + 1, batch_size)
        x_t = self.schedule.add_noise(x.detach(), self._randn(x.shape), t)
        with torch.no_grad():
            x0_real = self.networks.real_score(x_t, t, cond)
            x0_fake = self.networks.fake_score(x_t, t, cond) if cfg.use_fake_score else x.detach()
        loss, metrics = distribution_matching_loss(x, x0_real, x0_fake)
        if cfg.gan_generator_weight > 0:
            t_gan = self._randint(0, self.schedule.num_train_timesteps, batch_size)
            x_t_gan = self.schedule.add_noise(x, self._randn(x.shape), t_gan)
            gan_loss, gan_metrics = gan_generator_loss(self.networks.discriminator(x_t_gan, t_gan, cond))
            loss = loss + cfg.gan_generator_weight * gan_loss
            metrics.update(gan_metrics)
        return loss, metrics

    def dm_max_timestep(self) -> int:
        """The DM loss's largest timestep for the last generated x (see ``DMD2LoopConfig.dm_timesteps``)."""
        cfg = self.config
        if cfg.dm_timesteps == "below_input":
            return max(cfg.dm_min_timestep, min(cfg.dm_max_timestep, self.input_timestep))
        return cfg.dm_max_timestep

    def fake_score_loss(self, x: torch.Tensor, cond: Any, batch: DMD2Batch) -> tuple[torch.Tensor, dict]:
        """Denoising loss on the generator's detached samples at t ~ U[0, T) (+ GAN discriminator loss)."""
        cfg = self.config
        x = x.detach()
        batch_size = x.shape[0]
        num_t = self.schedule.num_train_timesteps
        t = self._randint(0, num_t, batch_size)
        eps = self._randn(x.shape)
        x_t = self.schedule.add_noise(x, eps, t)
        x0_pred = self.networks.fake_score(x_t, t, cond)
        loss, metrics = denoising_loss(x0_pred, x, eps, x_t, t, self.schedule)
        if cfg.gan_discriminator_weight > 0 and batch.real_x0 is not None:
            real = batch.real_x0
            t_fake = self._randint(0, num_t, batch_size)
            t_real = self._randint(0, num_t, real.shape[0])
            fake_logits = self.networks.discriminator(
                self.schedule.add_noise(x, self._randn(x.shape), t_fake), t_fake, cond
            )
            real_logits = self.networks.discriminator(
                self.schedule.add_noise(real, self._randn(real.shape), t_real), t_real, batch.real_cond
            )
            disc_loss, disc_metrics = gan_discriminator_loss(real_logits, fake_logits)
            loss = loss + cfg.gan_discriminator_weight * disc_loss
            metrics.update(disc_metrics)
        return loss, metrics

    # ---------------------------------------------------------------- staged backward, one micro-batch each
    def _generator_backward(self, x: torch.Tensor, cond: Any, weight: float) -> tuple[bool, dict]:
        """Generator loss of one micro-batch, backpropagated in two stages (module docstring); → (finite, metrics).

        Stage 1: ∂L/∂x on a detached copy of x, with the fake score's weights active (the GAN term's graph runs
        through them) and its parameters frozen. Stage 2: ``x.backward(∂L/∂x)`` with the generator's weights active.
        """
        x_leaf = x.detach().requires_grad_(True)
        with frozen(self.networks.fake_score_parameters()):
            loss, metrics = self.generator_loss(x_leaf, cond)
            if not self.all_finite(loss.detach()):
                return False, metrics
            self.networks.activate(FAKE_SCORE)
            (grad_x,) = torch.autograd.grad(self._scaled(loss * weight, GENERATOR), x_leaf)
        self.networks.activate(GENERATOR)
        x.backward(grad_x)
        return True, metrics

    def _fake_score_backward(self, x: torch.Tensor, cond: Any, batch: DMD2Batch, weight: float) -> tuple[bool, dict]:
        """Fake-score (+ discriminator) loss of one micro-batch; one backward, fake score's weights active."""
        with frozen(self.networks.generator_parameters()):
            loss, metrics = self.fake_score_loss(x, cond, batch)
            if not self.all_finite(loss.detach()):
                return False, metrics
            self.networks.activate(FAKE_SCORE)
            self._scaled(loss * weight, FAKE_SCORE).backward()
        return True, metrics

    # ---------------------------------------------------------------- one iteration
    def is_generator_turn(self, step: int | None = None) -> bool:
        step = self.step if step is None else step
        return step % self.config.dfake_gen_update_ratio == 0

    def generator_update(self, samples: Iterable[tuple[torch.Tensor, Any]], num_micro_batches: int = 1) -> dict:
        """One generator update from ``(x, cond)`` pairs whose x carries the generator's graph, one per micro-batch.

        ``samples`` may be a generator: each x is backpropagated and freed before the next is made.
        """
        weight = 1.0 / num_micro_batches
        grad_norm, metrics = self._update(
            GENERATOR,
            (self._generator_backward(x, cond, weight) for x, cond in samples),
            self.networks.generator_parameters(),
            self.generator_optimizer,
        )
        return {**metrics, "grad_norm_gen": grad_norm}

    def fake_score_update(self, samples: list[tuple[torch.Tensor, Any, DMD2Batch]]) -> dict:
        """One fake-score (+ GAN head) update from detached ``(x, cond, batch)`` samples (one per micro-batch)."""
        weight = 1.0 / len(samples)
        grad_norm, metrics = self._update(
            FAKE_SCORE,
            (self._fake_score_backward(x, cond, batch, weight) for x, cond, batch in samples),
            self.networks.fake_score_parameters(),
            self.fake_score_optimizer,
        )
        return {**metrics, "grad_norm_fake": grad_norm}

    def train_step(self, batches: DMD2Batch | list[DMD2Batch]) -> dict[str, float]:
        """One DMD2 iteration over one batch, or several micro-batches whose gradients are accumulated.

        Generator turn: per micro-batch, generate with grad → DM (+GAN) loss → staged backward at once (frees the
        graph); the detached samples are kept for the fake-score turn, which accumulates the same way. Then both
        learning-rate schedulers step: schedules are functions of the iteration.
        """
        batches = [batches] if isinstance(batches, DMD2Batch) else list(batches)
        samples: list[tuple[torch.Tensor, Any, DMD2Batch]] = []
        metrics: dict = {}

        def generated_with_grad():
            for batch in batches:
                x, cond = self.generate(batch, grad=True)
                samples.append((x.detach(), cond, batch))
                yield x, cond

        if self.is_generator_turn():
            metrics.update(self.generator_update(generated_with_grad(), len(batches)))
        else:
            for batch in batches:
                x, cond = self.generate(batch, grad=False)
                samples.append((x, cond, batch))
        if self.config.use_fake_score:
            metrics.update(self.fake_score_update(samples))
        return self._end_iteration(metrics)
