"""DMD (Yin et al. 2023): distribution matching + regression onto teacher ODE pairs, one-step.

What is particular to DMD: a generator loss of ``DM loss + regression_weight × d(G(z), y)`` on teacher ODE pairs
(:mod:`fewstep.training.loop.regression`, which also gives DMD2 its warm start). The fake score is DMD2's (same
adapter, same denoising loss); DMD updates generator and fake score every iteration and has no GAN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..loop.regression import DMDLoop, with_teacher_pairs
from ..loop.trainer import MethodRun, TrainingContext, TrainingError, train
from .base import Method
from .dmd2 import DMD2TrainConfig, build_distribution_matching, check_option_combinations, student_timesteps_of


@dataclass
class DMDTrainConfig(DMD2TrainConfig):
    """``fewstep train --method dmd`` options (DMD2's, minus the GAN and multi-step, plus the regression weight)."""

    regression_weight: float = field(
        default=0.25,
        metadata={"help": "weight of the regression loss on teacher ODE pairs (DMD's λ_reg = 0.25)", "min": 0},
    )
    # DMD's own defaults where they differ from DMD2's: no GAN, both networks updated every iteration.
    gan_weight: float | None = field(default=0.0, metadata={"help": "DMD has no GAN: keep 0", "min": 0})
    dfake_gen_update_ratio: int | None = field(
        default=1, metadata={"help": "fake-score updates per generator update (DMD: 1)", "min": 1}
    )


class DMD(Method):
    """``--method dmd``."""

    name = "DMD"
    key = "dmd"  # fewstep train --method KEY
    title = "DMD"
    paper = "DMD (Yin et al., *One-step Diffusion with Distribution Matching Distillation*, 2023)"
    summary = ("DMD: distribution matching + regression on teacher ODE pairs cached in RUN_DIR/pairs; one step, no "
               "GAN, both networks updated every iteration.")  # fmt: skip
    config_class = DMDTrainConfig
    demo_steps = "one step"

    def check(self, config: DMDTrainConfig, family: str, use_gan: bool, num_processes: int) -> None:
        if config.gan_weight:
            raise TrainingError(f"--gan-weight {config.gan_weight}: DMD has no GAN; use --method dmd2 for one")
        if config.init_regression_steps:
            raise TrainingError("--init-regression-steps is DMD2's warm start; DMD regresses throughout "
                                "(--regression-weight)")  # fmt: skip
        if len(student_timesteps_of(config)) != 1:
            raise TrainingError("DMD trains a one-step generator; for several steps use --method dmd2 or progressive")
        check_option_combinations(config, use_gan, 1)

    def build(self, ctx: TrainingContext) -> MethodRun:
        config = ctx.config
        run, networks = build_distribution_matching(
            ctx, use_gan=False, method_key=self.key, loop_class=DMDLoop, regression_weight=config.regression_weight,
            init_regression_steps=0, regression_kind=config.regression_loss,
        )  # fmt: skip
        return with_teacher_pairs(ctx, run, networks)

    def card_description(self, config: dict) -> str:
        return "DMD (distribution matching + regression on the teacher's ODE pairs)"

    def demo_steps_error(self, num_steps: int) -> str | None:
        if num_steps != 1:
            return f"--method {self.key} trains a one-step student; drop --num-steps {num_steps}"
        return None

    def demo_options(self, settings, num_steps: int, real_dir) -> dict:
        # No GAN, no EMA, both networks every iteration; the digits' own regression weight (demo_settings.py).
        return dict(dfake_gen_update_ratio=1, regression_weight=settings.dmd_regression_weight,
                    **settings.fake_score_options())  # fmt: skip


def train_dmd(config: DMDTrainConfig, resume: bool = False, on_step=None, overwrite: bool = False):
    """Run DMD. ``on_step(step, metrics)`` is called after each iteration; returning True stops the run."""
    return train(DMD(), config, resume=resume, on_step=on_step, overwrite=overwrite)
