"""The discrete variance-preserving noise schedule of Stable Diffusion, and conversions between ε, v and x0.

Pure torch: built from a diffusers scheduler config *dict* (``scheduler.config`` or ``scheduler_config.json``),
so that training, pipelines and ComfyUI nodes share one definition of ᾱ_t without importing diffusers.

Notation (DDPM): ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε``; ``v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The training noise schedule of SD1.5 and SDXL (their scheduler configs' beta fields).
SD_TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                        "beta_end": 0.012}  # fmt: skip


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, computed exactly as diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1, t2 = i / num_train_timesteps, (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for integer timesteps 0..T−1 and the model's prediction type."""

    alphas_cumprod: torch.Tensor  # (T,) float32, as diffusers computes it
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (DDPM/DDIM/Euler/LCM... all share these keys)."""
        num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        beta_start = float(config.get("beta_start", 0.0001))
        beta_end = float(config.get("beta_end", 0.02))
        beta_schedule = config.get("beta_schedule", "linear")
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}"
            )
        if config.get("rescale_betas_zero_snr"):
            raise ValueError(
                "rescale_betas_zero_snr=True gives ᾱ_T = 0 (x0 cannot be recovered from ε at t = T−1); "
                "distil from a scheduler config with rescale_betas_zero_snr=False"
            )
        trained_betas = config.get("trained_betas")
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(num_train_timesteps)
        else:
            raise ValueError(
                f"beta_schedule {beta_schedule!r} is not supported; use one of {', '.join(BETA_SCHEDULES)}"
            )
        return cls(torch.cumprod(1.0 - betas, dim=0), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def coefficients(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1−ᾱ_t)) broadcast to ``like``; t is an int or a (B,) tensor of ints.

        t = −1 means "clean" (ᾱ = 1), the end point of a sampler's last step.
        """
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        alpha_bar = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones_like(t, dtype=torch.float32))
        alpha_bar = alpha_bar.to(device=like.device, dtype=like.dtype)
        alpha_bar = alpha_bar.reshape(alpha_bar.shape + (1,) * (like.ndim - alpha_bar.ndim))
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε (diffusers' ``add_noise``)."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x0 (diffusers' ``get_velocity``)."""
        a, s = self.coefficients(t, x0)
        return a * eps - s * x0

    def x0_from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a, s = self.coefficients(t, x_t)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a, s = self.coefficients(t, x_t)
        return (x_t - a * x0) / s

    def x0_from_v(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        a, s = self.coefficients(t, x_t)
        return a * x_t - s * v

    def v_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        return self.velocity(x0, self.eps_from_x0(x0, x_t, t), t)

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The model's prediction (in its ``prediction_type``) as an x0 estimate."""
        if self.prediction_type == "epsilon":
            return self.x0_from_eps(model_output, x_t, t)
        if self.prediction_type == "v_prediction":
            return self.x0_from_v(model_output, x_t, t)
        return model_output

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """An x0 estimate expressed in the model's ``prediction_type`` (inverse of :meth:`to_x0`)."""
        if self.prediction_type == "epsilon":
            return self.eps_from_x0(x0, x_t, t)
        if self.prediction_type == "v_prediction":
            return self.v_from_x0(x0, x_t, t)
        return x0

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The regression target of a denoising loss in the model's ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, eps, t)
        return x0

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        return NoiseSchedule(self.alphas_cumprod.to(device), self.prediction_type)


def student_timesteps(
    num_steps: int = 1, num_train_timesteps: int = 1000, first_timestep: int | None = None
) -> list[int]:
    """DMD2's student timesteps: ``range(T−1, 0, −T//N)`` → [999, 749, 499, 249] for N = 4.

    ``first_timestep`` shifts a one-step student's conditioning timestep (DMD2's SDXL one-step model uses 399);
    for N > 1 it rescales the whole list to start there (e.g. 399 → [399, 299, 199, 99] for N = 4).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
    if num_steps > num_train_timesteps - 1:  # DMD2's rule never reaches t = 0: at most T − 1 distinct steps
        raise ValueError(
            f"num_steps {num_steps} is more than the {num_train_timesteps - 1} distinct timesteps a "
            f"{num_train_timesteps}-step schedule gives a few-step student; use fewer steps"
        )
    top = num_train_timesteps - 1 if first_timestep is None else int(first_timestep)
    if not 0 <= top < num_train_timesteps:
        raise ValueError(f"first timestep {top} is outside [0, {num_train_timesteps - 1}]")
    if top == num_train_timesteps - 1:
        steps = list(range(top, 0, -(num_train_timesteps // num_steps)))[:num_steps]
    else:
        stride = (top + 1) / num_steps
        steps = [int(round(top - i * stride)) for i in range(num_steps)]
    return validate_timesteps(steps, num_train_timesteps)


def validate_timesteps(timesteps, num_train_timesteps: int = 1000) -> list[int]:
    """Check a custom student timestep list: integers, strictly descending, inside [0, T−1]."""
    steps = [int(t) for t in timesteps]
    if not steps:
        raise ValueError("the timestep list is empty; give at least one timestep, e.g. [999]")
    if any(float(a) != int(a) for a in timesteps):
        raise ValueError(f"timesteps must be integers, got {list(timesteps)}")
    if any(not 0 <= t < num_train_timesteps for t in steps):
        raise ValueError(f"timesteps {steps} must lie in [0, {num_train_timesteps - 1}]")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"timesteps {steps} must be strictly descending, e.g. [999, 749, 499, 249]")
    return steps


def parse_timesteps(text: str, num_train_timesteps: int = 1000) -> list[int]:
    """Parse "999,749,499,249" (CLI and node input) into a validated list."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"could not parse timesteps {text!r}; write integers separated by commas, e.g. 999,499") from None
    return validate_timesteps(values, num_train_timesteps)
