"""ComfyUI samples in k-diffusion's sigma space; fewstep's math runs in DDPM's x_t space. This is the adapter.

Pure torch (no ComfyUI import), so CI tests it. For a discrete VP schedule (Karras et al. 2022, Table 1):

    σ_t = sqrt((1 − ᾱ_t) / ᾱ_t),    x_σ = x_t / sqrt(ᾱ_t) = x0 + σ_t·ε.

A ComfyUI model call ``model(x_σ, σ) -> x0`` (ε-, v- and x0-models alike) becomes fewstep's ``denoise(x_t, t) -> x0``
through :func:`vp_denoiser`; :func:`sample_sigma_space` is ``core.sample_few_step`` (or ``core.sample_ddim``) behind
ComfyUI's sampler contract (``x`` and ``sigmas`` in, x0 out).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.sampling import Denoiser, Refiner, check_sampler, randn_like, resolve_sampling, sample_ddim, sample_few_step
from ..core.schedule import NoiseSchedule, parse_timesteps, validate_timesteps

# model_x0(x_σ, σ) -> x0 with σ of shape (B,): a ComfyUI model as its samplers call it.
SigmaDenoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def schedule_from_sigmas(sigmas: torch.Tensor) -> NoiseSchedule:
    """The schedule behind σ_t, t = 0..T−1 (ComfyUI's ``model_sampling.sigmas``): ᾱ_t = 1 / (1 + σ_t²)."""
    sigmas = sigmas.detach().to("cpu", torch.float64)
    return NoiseSchedule((1.0 / (1.0 + sigmas**2)).float())


def sigma_of(schedule: NoiseSchedule, t: int) -> torch.Tensor:
    """σ_t as a 0-d float32 tensor."""
    alpha_bar = schedule.alphas_cumprod[t].double()
    return ((1 - alpha_bar) / alpha_bar).sqrt().float()


def to_sigma_space(x_t: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_σ = x_t·sqrt(1 + σ²)."""
    return x_t * (1 + torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device) ** 2).sqrt()


def from_sigma_space(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_t = x_σ / sqrt(1 + σ²)."""
    return x / (1 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2).sqrt()


def scheduler_timesteps(
    steps: int, first_timestep: int, custom: str = "", num_train_timesteps: int = 1000
) -> list[int]:
    """The FewStepScheduler's timesteps: a custom comma list if given, else DMD2's spacing from ``first_timestep``."""
    custom_timesteps = parse_timesteps(custom, num_train_timesteps) if custom.strip() else None
    return resolve_sampling(steps, custom_timesteps, None, None, num_train_timesteps, first_timestep).timesteps


def timesteps_of_sigmas(sigmas: torch.Tensor, schedule: NoiseSchedule) -> list[int]:
    """The nearest training timestep of each σ in log σ (ComfyUI's ``ModelSamplingDiscrete.timestep`` rule)."""
    table = ((1 - schedule.alphas_cumprod.double()) / schedule.alphas_cumprod.double()).sqrt().log()
    return (sigmas.detach().to("cpu", torch.float64).log()[:, None] - table[None]).abs().argmin(dim=1).tolist()


def step_timesteps(sigmas: torch.Tensor, schedule: NoiseSchedule) -> list[int]:
    """The timesteps a SIGMAS list steps through (all but its last entry, the end point), checked descending."""
    return validate_timesteps(timesteps_of_sigmas(sigmas[:-1], schedule), schedule.num_train_timesteps)


def vp_denoiser(model_x0: SigmaDenoiser, schedule: NoiseSchedule) -> Denoiser:
    """fewstep's ``denoise(x_t, t) -> x0`` from a sigma-space model: ``model_x0(x_t·sqrt(1 + σ_t²), σ_t)``."""

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        sigma = sigma_of(schedule, t).to(x_t.device)
        return model_x0(to_sigma_space(x_t, sigma), sigma.expand(x_t.shape[0]).to(x_t.dtype))

    return denoise


def sample_sigma_space(
    model_x0: SigmaDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: list[int],
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    refine: Refiner | None = None,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    sampler: str = "few_step",
) -> torch.Tensor:
    """A student's sampler (``core.sample_few_step``: DMD2's rule; ``sampler="ddim"``: ``core.sample_ddim``, for
    Progressive Distillation students) on ComfyUI's terms.

    ``x`` is the sampler's input at ``sigmas[0]`` (sigma space); ``timesteps[i]`` is the training timestep of
    ``sigmas[i]`` for every step; ``sigmas[-1]`` is where the run ends: 0 returns the last x0, a σ > 0 (a split
    schedule handing over to another sampler) returns the run's x_t at σ (DMD2: the last x0 re-noised; DDIM: its
    deterministic step), in sigma space.
    """
    x_t = from_sigma_space(x, sigmas[0])
    denoise = vp_denoiser(model_x0, schedule)
    t_end = -1 if sigmas[-1] <= 0 else int(timesteps_of_sigmas(sigmas[-1:], schedule)[0])
    if sampler == "ddim":
        x_end = sample_ddim(denoise, x_t, timesteps, schedule, refine, callback, end_timestep=t_end)
        return x_end if t_end < 0 else to_sigma_space(x_end, sigmas[-1])
    check_sampler(sampler)
    x0 = sample_few_step(denoise, x_t, timesteps, schedule, generator, refine, callback)
    if t_end < 0:
        return x0
    return to_sigma_space(schedule.add_noise(x0, randn_like(x0, generator), t_end), sigmas[-1])
