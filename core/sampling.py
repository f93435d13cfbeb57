"""Samplers over a denoiser callable ``denoise(x_t, t) -> x0`` (k-diffusion style).

``t`` is an integer training timestep (0..T−1). UNets that predict ε or v are wrapped into such a callable by
their framework adapter (diffusers in ``training/``/``pipelines/``, ComfyUI in ``nodes/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Callable, Mapping

import torch

from .schedule import NoiseSchedule, student_timesteps, validate_timesteps

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
# refine(x0, step_index, t, x_t) -> x0: a hook on the student's x0 (from input x_t) before the next step
# (Distillation++).
Refiner = Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]


Generators = torch.Generator | list[torch.Generator] | Callable[[torch.Tensor], torch.Tensor] | None


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Gaussian noise shaped like ``x``, drawn on the generator's device so a seed gives the same noise anywhere.

    A list of generators draws sample ``i`` of the batch from ``generator[i]`` (diffusers' ``randn_tensor`` rule);
    a callable is asked for the noise (``generator(x)``: the trainer's slice of its global batch's draw).
    """
    if generator is None:
        return torch.randn_like(x)
    if callable(generator):
        return generator(x)
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per sample")
        return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)


def cfg(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance ``u + w·(c − u)``; exact in x0 space too, since x0 is affine in ε and v at fixed x_t."""
    return uncond + guidance_scale * (cond - uncond)


def sample_few_step(
    denoise: Denoiser,
    noise: torch.Tensor,
    timesteps: list[int],
    schedule: NoiseSchedule,
    generator: Generators = None,
    refine: Refiner | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """DMD2's multi-step rule: x = noise; for each t_i: x0 = G(x, t_i); x = add_noise(x0, fresh ε, t_{i+1}).

    The input at the first timestep is the pure noise itself (also for a shifted start such as t = 399), as in
    DMD2's training. Returns the last x0. The same function runs the first k steps of backward simulation.
    """
    x = noise
    x0 = noise
    for i, t in enumerate(timesteps):
        x0 = denoise(x, t)
        if refine is not None:
            x0 = refine(x0, i, t, x)
        if callback is not None:
            callback(i, t, x0)
        if i + 1 < len(timesteps):
            x = schedule.add_noise(x0, randn_like(x0, generator), timesteps[i + 1])
    return x0


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """DDIM timesteps with "trailing" spacing: 1 step samples t = T−1 (the "leading" spacing would start near t = 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
    stride = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - i * stride)) - 1 for i in range(num_steps)]


def ddim_step(
    x0: torch.Tensor, x_t: torch.Tensor, t: int, t_next: int, schedule: NoiseSchedule
) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) from t to t_next (−1 = clean)."""
    eps = schedule.eps_from_x0(x0, x_t, t)
    return schedule.add_noise(x0, eps, t_next)


def sample_ddim(
    denoise: Denoiser,
    noise: torch.Tensor,
    timesteps: list[int],
    schedule: NoiseSchedule,
    refine: Refiner | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    end_timestep: int = -1,
) -> torch.Tensor:
    """Deterministic DDIM (the teacher's ODE sampler, and Progressive Distillation's students).

    ``refine`` may change each step's x0 before the step is taken (as in :func:`sample_few_step`); the run ends at
    ``end_timestep`` (−1 = clean; a later timestep hands a partly denoised x_t to another sampler).
    """
    x = noise
    for i, t in enumerate(timesteps):
        x0 = denoise(x, t)
        if refine is not None:
            x0 = refine(x0, i, t, x)
        if callback is not None:
            callback(i, t, x0)
        x = ddim_step(x0, x, t, timesteps[i + 1] if i + 1 < len(timesteps) else end_timestep, schedule)
    return x


# ------------------------------------------------------------------------------------------ a student's settings
# "few_step": predict x0, re-noise with fresh noise (DMD2, DMD); "ddim": deterministic DDIM (Progressive Distillation).
SAMPLERS = ("few_step", "ddim")


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return sampler


@dataclass(frozen=True)
class SamplingSettings:
    """How a few-step student samples."""

    timesteps: list[int]  # strictly descending student timesteps, e.g. [999, 749, 499, 249]
    sampler: str  # one of SAMPLERS: sample_few_step's rule or sample_ddim


def resolve_sampling(
    num_steps: int | None = None,
    timesteps=None,
    sampler: str | None = None,
    recipe: Mapping | None = None,
    num_train_timesteps: int = 1000,
    first_timestep: int | None = None,
) -> SamplingSettings:
    """A student's timesteps and sampler, each from the first source that sets it: the explicit arguments
    (``timesteps`` over ``num_steps``, which takes DMD2's spacing from ``first_timestep``), then the LoRA's recipe
    (its ``fewstep_recipe.json``: ``{"method", "timesteps", "sampler"}``), then one step at T − 1 and ``few_step``.

    The one place the pipelines, ``fewstep sample`` and the ComfyUI nodes settle this; errors quote the bad value.
    """
    recipe = recipe or {}
    if timesteps is not None:
        steps = validate_timesteps(list(timesteps), num_train_timesteps)
    elif num_steps is not None:
        if isinstance(num_steps, bool) or not isinstance(num_steps, Integral):
            raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
        steps = student_timesteps(int(num_steps), num_train_timesteps, first_timestep)
    elif recipe.get("timesteps"):
        steps = validate_timesteps([int(t) for t in recipe["timesteps"]], num_train_timesteps)
    else:
        steps = student_timesteps(1, num_train_timesteps, first_timestep)
    return SamplingSettings(steps, check_sampler(sampler or recipe.get("sampler") or "few_step"))
