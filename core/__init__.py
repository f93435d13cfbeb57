"""fewstep's math layer: pure torch, no diffusers, transformers or ComfyUI.

Noise schedule and ε/v/x0 conversions (``schedule``), few-step and DDIM samplers over a ``denoise(x_t, t) -> x0``
callable (``sampling``), Distillation++ (``distillpp``) and the DMD/DMD2/PD losses (``losses``).
"""

from .distillpp import distillpp_refine, distillpp_refiner, sample_distillpp
from .losses import (
    denoising_loss,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    progressive_loss,
    progressive_target,
    regression_loss,
)
from .sampling import cfg, ddim_step, ddim_timesteps, randn_like, sample_ddim, sample_few_step
from .schedule import NoiseSchedule, parse_timesteps, student_timesteps, validate_timesteps

__all__ = [
    "NoiseSchedule",
    "cfg",
    "ddim_step",
    "ddim_timesteps",
    "denoising_loss",
    "distillpp_refine",
    "distillpp_refiner",
    "distribution_matching_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "parse_timesteps",
    "progressive_loss",
    "progressive_target",
    "randn_like",
    "regression_loss",
    "sample_ddim",
    "sample_distillpp",
    "sample_few_step",
    "student_timesteps",
    "validate_timesteps",
]
