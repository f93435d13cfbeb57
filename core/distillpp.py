"""Distillation++ (Park, Lee & Ye 2024): the teacher refines the student's x0 on the first sampling steps.

Per guided step i at student timestep t_i:
  1. the student predicts x̂0_θ;
  2. x̂0_θ is re-noised with fresh noise to s = t_{i+1}, the next student timestep (the paper's best choice;
     on the last step there is no next one and s = t_i, the paper's "s = t" variant);
  3. the teacher, with CFG, denoises that to x̂0_ψ(s);
  4. the proximal step of the SDS loss in closed form: x̂0 ← lerp(x̂0_θ, x̂0_ψ, λ).
"""

from __future__ import annotations

import torch

from .sampling import Denoiser, Generators, Refiner, randn_like, sample_few_step
from .schedule import NoiseSchedule


def check_teacher_guidance(lam: float, guided_steps: int) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"teacher guidance λ must be in [0, 1], got {lam}")
    if guided_steps < 0:
        raise ValueError(f"teacher-guided steps must be ≥ 0, got {guided_steps}")


def distillpp_refine(
    x0_student: torch.Tensor,
    teacher: Denoiser,
    s: int,
    lam: float,
    schedule: NoiseSchedule,
    generator: Generators = None,
) -> torch.Tensor:
    """One Distillation++ refinement: ``lerp(x̂0_θ, teacher(add_noise(x̂0_θ, ε, s), s), λ)``."""
    x_s = schedule.add_noise(x0_student, randn_like(x0_student, generator), s)
    x0_teacher = teacher(x_s, s)
    return torch.lerp(x0_student, x0_teacher.to(x0_student.dtype), lam)


def distillpp_refiner(
    teacher: Denoiser,
    timesteps: list[int],
    lam: float,
    guided_steps: int,
    schedule: NoiseSchedule,
    generator: Generators = None,
) -> Refiner | None:
    """The sampler hook that applies :func:`distillpp_refine` on the first ``guided_steps`` steps (None if idle)."""
    check_teacher_guidance(lam, guided_steps)
    if lam == 0.0 or guided_steps == 0:
        return None

    def refine(x0: torch.Tensor, i: int, t: int) -> torch.Tensor:
        if i >= guided_steps:
            return x0
        s = timesteps[i + 1] if i + 1 < len(timesteps) else t
        return distillpp_refine(x0, teacher, s, lam, schedule, generator)

    return refine


def sample_distillpp(
    student: Denoiser,
    teacher: Denoiser,
    noise: torch.Tensor,
    timesteps: list[int],
    schedule: NoiseSchedule,
    lam: float,
    guided_steps: int = 1,
    generator: Generators = None,
) -> torch.Tensor:
    """Few-step student sampling with Distillation++ on the first ``guided_steps`` steps."""
    refine = distillpp_refiner(teacher, timesteps, lam, guided_steps, schedule, generator)
    return sample_few_step(student, noise, timesteps, schedule, generator, refine=refine)
