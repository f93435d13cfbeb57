"""DMD2 (Yin et al. 2024): distribution matching, a fake score updated on two time scales, an optional GAN.

What is particular to DMD2: the ``generator`` and ``fake_score`` adapters, the GAN head on the fake score's
mid block, two optimizers, and :class:`~fewstep.training.loop.dmd2_loop.DMD2Loop`. With ``--init-regression-steps N``
the generator first regresses onto teacher ODE pairs for N iterations (the reference's warm start before one-step
SDXL at timestep 399), through DMD's loop (:mod:`fewstep.training.loop.regression`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...core.sampling import sample_few_step
from ...core.schedule import student_timesteps, validate_timesteps
from ..data.pair_cache import TeacherPairOptions
from ..loop.dmd2_loop import DM_TIMESTEPS, DMD2Batch, DMD2Loop, DMD2LoopConfig
from ..loop.regression import DMDLoop, with_teacher_pairs
from ..loop.networks import FAKE_SCORE, GENERATOR, GANHead, SharedUNetNetworks, attach_adapters
from ..loop.trainer import FAMILY_DEFAULTS, MethodRun, TrainConfig, TrainingContext, TrainingError, train
from .base import Method

# DMD2's per-family defaults (docs/defaults.md sets each beside the reference's value).
DMD2_FAMILY_DEFAULTS = {
    "sd15": dict(FAMILY_DEFAULTS["sd15"], dfake_gen_update_ratio=10, gan_weight=1e-3),
    "sdxl": dict(FAMILY_DEFAULTS["sdxl"], dfake_gen_update_ratio=5, gan_weight=5e-3),
}
# The reference's effective batch (per-GPU batch × 64 GPUs); far below it the DM gradient is much noisier.
REFERENCE_EFFECTIVE_BATCH = {"sd15": 32 * 64, "sdxl": 2 * 64}
FAR_BELOW_REFERENCE = 16  # warn when the effective batch is under 1/16 of the reference's


@dataclass
class DMD2TrainConfig(TeacherPairOptions, TrainConfig):
    """``fewstep train --method dmd2`` options. None means "the teacher family's default"."""

    num_steps: int = field(
        default=1, metadata={"help": "student sampling steps: 1 = [999], 4 = [999,749,499,249]", "min": 1}
    )
    timesteps: list[int] | None = field(
        default=None, metadata={"help": "custom student timesteps, e.g. 999,499", "max": 999}
    )
    fake_lr: float | None = field(
        default=None,
        metadata={"help": "AdamW learning rate of the fake-score adapter and the GAN head (default: --lr)", "above": 0,
                  "on_resume": "may change"},
    )  # fmt: skip
    dfake_gen_update_ratio: int | None = field(
        default=None, metadata={"help": "fake-score updates per generator update (sd15 10, sdxl 5)", "min": 1}
    )
    fake_rank: int = field(default=64, metadata={"help": "fake-score LoRA rank", "min": 1})
    fake_alpha: float | None = field(
        default=None, metadata={"help": "fake-score LoRA alpha (default: --fake-rank, i.e. LoRA scale 1)", "above": 0}
    )
    gan_weight: float | None = field(
        default=None, metadata={"help": "generator GAN loss weight (sd15 1e-3, sdxl 5e-3; 0 = no GAN)", "min": 0}
    )
    disc_weight: float = field(default=1e-2, metadata={"help": "discriminator loss weight", "min": 0})
    gan_real_latents: str = field(
        default="sample",
        metadata={"help": "the GAN's real latents: 'sample' each from its image's VAE posterior (as SD teachers and the "
                          "reference draw them) or take the posterior 'mean'", "choices": ["sample", "mean"]},
    )  # fmt: skip
    backward_simulation: bool = field(default=True, metadata={"help": "multi-step: train on the student's own inputs"})
    dm_timesteps: str = field(
        default="below_input",
        metadata={"help": "multi-step: the DM loss's timesteps per student step: 'below_input' (a step whose input is "
                          "at t_k only at t ≤ t_k; docs/methods.md) or 'full' (every step at 20..980, the reference's)",
                  "choices": list(DM_TIMESTEPS), "older_runs": "full"},
    )  # fmt: skip
    init_regression_steps: int = field(
        default=0, metadata={"help": "first N iterations: regression onto teacher ODE pairs only (warm start)"}
    )

    family_defaults = DMD2_FAMILY_DEFAULTS

    def _derived_defaults(self) -> dict:
        fills = {}
        if self.fake_lr is None:
            fills["fake_lr"] = self.lr
        if self.fake_alpha is None:
            fills["fake_alpha"] = float(self.fake_rank)
        return fills


def check_option_combinations(config: DMD2TrainConfig, use_gan: bool, num_steps: int) -> None:
    """Refuse combinations that are known-bad or that nothing tests, before any model loads."""
    if use_gan and config.disc_weight <= 0:
        raise TrainingError(
            f"--gan-weight {config.gan_weight} with --disc-weight {config.disc_weight}: the generator would chase an "
            "untrained discriminator; set --disc-weight > 0 (default 1e-2) or --gan-weight 0"
        )
    if num_steps > 1 and not config.backward_simulation and not use_gan:
        raise TrainingError(
            "a multi-step student without --backward-simulation trains on noised real images; give --images DIR "
            "or keep backward simulation on (the default)"
        )
    if config.init_regression_steps > config.max_steps:  # ≥ 0 is the field's limit
        raise TrainingError(
            f"--init-regression-steps {config.init_regression_steps} must be in [0, --max-steps {config.max_steps}]"
        )


def effective_batch_warning(config, family: str, num_processes: int) -> str | None:
    """A one-line warning when the effective batch is far below what the reference validated.

    Not for a teacher fewstep built itself, such as the digits teacher (its build record beside the weights): the
    reference's batch is for SD at 512/1024 px, and the demo's batch is the digits sweep's choice, not an oversight.
    """
    from ..teacher.loading import BUILD_RECORD_FILE

    if config.teacher and (Path(config.teacher) / BUILD_RECORD_FILE).is_file():
        return None
    effective = config.batch_size * config.gradient_accumulation_steps * num_processes
    reference = REFERENCE_EFFECTIVE_BATCH[family]
    if effective * FAR_BELOW_REFERENCE >= reference:
        return None
    return (
        f"fewstep: warning: effective batch {effective} (batch {config.batch_size} × accumulation "
        f"{config.gradient_accumulation_steps} × {num_processes} process(es)) is far below the DMD2 reference's "
        f"{reference} for {family}; expect noisier distribution-matching gradients: raise --gradient-accumulation-steps "
        "or --batch-size, or lower --lr (docs/defaults.md)"
    )


def student_timesteps_of(config) -> list[int]:
    """The student's timesteps: ``--timesteps``, else DMD2's list for ``--num-steps``; given both, they must agree."""
    if config.timesteps:
        if config.num_steps not in (1, len(config.timesteps)):  # 1 is the default, so it may be "not given"
            raise TrainingError(
                f"--timesteps {','.join(map(str, config.timesteps))} is a {len(config.timesteps)}-step student but "
                f"--num-steps is {config.num_steps}; give only one of them"
            )
        return validate_timesteps(config.timesteps)
    try:
        return student_timesteps(config.num_steps)
    except ValueError as error:
        raise TrainingError(f"--num-steps {config.num_steps}: {error}") from None


def build_distribution_matching(
    ctx: TrainingContext, use_gan: bool, method_key: str = "dmd2", loop_class=DMD2Loop, loop_config=None, **loop_kwargs
):
    """The adapters, GAN head, optimizers and loop of DMD2 — and of DMD, which passes its own loop class."""
    config = ctx.config
    unet = ctx.unet
    attach_adapters(unet, config.gen_rank, config.gen_alpha, config.fake_rank, config.fake_alpha)
    gan_head = GANHead(unet.config.block_out_channels[-1]).to(ctx.device) if use_gan else None
    networks = SharedUNetNetworks(unet, ctx.schedule, ctx.uncond, config.guidance_scale, gan_head)
    generator_optimizer = ctx.adamw(networks.generator_parameters(), config.lr)
    fake_score_optimizer = ctx.adamw(networks.fake_score_parameters(), config.fake_lr)
    timesteps = student_timesteps_of(config)
    loop_config = loop_config or DMD2LoopConfig()
    loop_config = dataclasses.replace(
        loop_config,
        student_timesteps=timesteps,
        dfake_gen_update_ratio=config.dfake_gen_update_ratio,
        gan_generator_weight=config.gan_weight if use_gan else 0.0,
        gan_discriminator_weight=config.disc_weight if use_gan else 0.0,
        backward_simulation=config.backward_simulation,
        dm_timesteps=config.dm_timesteps,
        max_grad_norm=config.max_grad_norm,
    )
    loop = loop_class(
        networks,
        generator_optimizer,
        fake_score_optimizer,
        loop_config,
        seed=config.seed,
        processes=ctx.processes,
        generator_lr_scheduler=ctx.lr_scheduler(generator_optimizer),
        fake_score_lr_scheduler=ctx.lr_scheduler(fake_score_optimizer),
        device=ctx.device,
        fp16_loss_scaling=config.mixed_precision == "fp16",
        **loop_kwargs,
    )

    def next_batch() -> DMD2Batch:
        idx = ctx.draw_indices(len(ctx.prompt_cond), config.batch_size)
        batch = DMD2Batch(shape=(config.batch_size, *ctx.latent_shape), cond=ctx.prompt_cond.select(idx).to(ctx.device))
        if ctx.real_latents is not None:
            ridx = ctx.draw_indices(len(ctx.real_latents), config.batch_size)
            if config.gan_real_latents == "mean":
                batch.real_x0 = ctx.real_latents.means(ridx).to(ctx.device)
            else:
                batch.real_x0 = ctx.real_latents.sample(ridx, ctx.draw_noise).to(ctx.device)
            batch.real_cond = ctx.real_cond.select(ridx).to(ctx.device)
        return batch

    @torch.no_grad()
    def sample_student(noise, cond):
        n = noise.shape[0]
        denoise = lambda x, t: networks.generator(x, torch.full((n,), t, device=ctx.device), cond)
        return sample_few_step(denoise, noise, timesteps, ctx.schedule, torch.Generator().manual_seed(0))

    run = MethodRun(
        loop=loop,
        adapters=[GENERATOR, FAKE_SCORE],
        next_batch=next_batch,
        sample_student=sample_student,
        teacher=networks.real_score,
        recipe=lambda: {"method": method_key, "timesteps": timesteps, "sampler": "few_step"},
        ema_parameters=networks.generator_parameters(),
        modules={"gan_head": gan_head} if gan_head is not None else {},
    )
    return run, networks


class DMD2(Method):
    """``--method dmd2``."""

    name = "DMD2"
    key = "dmd2"  # fewstep train --method KEY
    title = "DMD2"
    paper = "DMD2 (Yin et al., *Improved Distribution Matching Distillation for Fast Image Synthesis*, 2024)"
    summary = "DMD2: distribution matching, fake score (adapter 'fake_score') on two time scales, GAN on --images."
    config_class = DMD2TrainConfig
    # Measured at the steps it was trained for (+ Distillation++ when multi-step): the yardstick's default rows.
    demo_rows = None
    demo_grid_rows = None

    def wants_real_images(self, config) -> bool:
        return config.gan_weight > 0

    def check(self, config: DMD2TrainConfig, family: str, use_gan: bool, num_processes: int) -> None:
        check_option_combinations(config, use_gan, len(student_timesteps_of(config)))
        warning = effective_batch_warning(config, family, num_processes)
        if warning:
            print(warning)

    def build(self, ctx: TrainingContext) -> MethodRun:
        use_gan = ctx.real_latents is not None
        config = ctx.config
        if not config.init_regression_steps:
            return build_distribution_matching(ctx, use_gan, self.key)[0]
        run, networks = build_distribution_matching(  # the regression warm start on teacher ODE pairs
            ctx, use_gan, self.key, loop_class=DMDLoop, regression_weight=0.0,
            init_regression_steps=config.init_regression_steps, regression_kind=config.regression_loss,
        )  # fmt: skip
        return with_teacher_pairs(ctx, run, networks)

    def card_description(self, config: dict) -> str:
        gan = float(config.get("gan_weight") or 0) > 0 and bool(config.get("images") or config.get("dataset"))
        return "DMD2 (distribution matching + GAN)" if gan else "DMD2 (distribution matching, no GAN)"

    def demo_gan(self, settings) -> bool:
        return bool(settings.gan_weight)

    def demo_options(self, settings, num_steps: int, real_dir) -> dict:
        shifted = num_steps == 1 and settings.conditioning_timestep != 999  # DMD2's one-step SDXL recipe: t = 399
        return dict(
            images=str(real_dir) if self.demo_gan(settings) else None, num_steps=num_steps,
            timesteps=[settings.conditioning_timestep] if shifted else None,
            init_regression_steps=settings.init_regression_steps,
            dfake_gen_update_ratio=settings.dfake_gen_update_ratio, gan_weight=settings.gan_weight,
            disc_weight=settings.disc_weight, ema_decay=settings.ema_decay, gan_real_latents=settings.gan_real_latents,
            dm_timesteps=settings.dm_timesteps, **settings.fake_score_options(),
        )  # fmt: skip


def train_dmd2(config: DMD2TrainConfig, resume: bool = False, on_step=None, overwrite: bool = False):
    """Run DMD2. ``on_step(step, metrics)`` is called after each iteration; returning True stops the run."""
    return train(DMD2(), config, resume=resume, on_step=on_step, overwrite=overwrite)
