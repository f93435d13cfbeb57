"""Distillation++ (Park, Lee & Ye 2024): the teacher refines the student's x0 on the first sampling steps.

Per guided step i at student timestep t_i:
  1. the student predicts x̂0_θ;
  2. x̂0_θ is re-noised with fresh noise to s = t_{i+1}, the next student timestep (the paper's best choice;
     on the last step there is no next one and s = t_i, the paper's "s = t" variant);
  3. the teacher, with CFG, denoises that to x̂0_ψ(s);
  4. the correction, by one of two rules (``rule``):
     - ``"x0_lerp"`` (the paper): the proximal step of the SDS loss in closed form, x̂0 ← lerp(x̂0_θ, x̂0_ψ, λ);
     - ``"eps_mix"`` (the authors' code for DMD2 students): the noise predictions are mixed,
       ε ← ε_θ(x_t) + λ·(ε_ψ(x_s) − ε_θ(x_t)), and x̂0 is recomputed from the current x_t:
       x̂0 ← x̂0_θ − λ·(σ_t/α_t)·(ε_ψ − ε_θ). With x_s = α_s·x̂0_θ + σ_s·ξ (ξ the fresh noise of step 2) that is
         x̂0 ← x̂0_θ + λ·√(SNR_s/SNR_t)·(x̂0_ψ − x̂0_θ) − λ·(σ_t/α_t)·(ξ − ε_θ):
       a lerp toward the teacher of weight λ·√(SNR_s/SNR_t) (≈ 3.6·λ on the step 999 → 749 of SD's schedule)
       **plus injected noise** of std ≈ √2·λ·σ_t/α_t per latent element: 20.7·λ at t = 999 (σ/α = 14.6), so 0.2 at
       the authors' λ = 0.01 and 3.1 at the digits sweep's 0.15, against a latent std of about 1.

Defaults (``RECOMMENDED_*``, what the pipelines, ComfyUI nodes, ``fewstep sample`` and the model card use): the
authors' published setting for DMD2 students, from their SDXL DMD2 script (geonyeong-park/distillation_pp): eps_mix
with λ = 0.01 on the first 2 steps, teacher CFG 7.5, the negative prompt as the teacher's unconditional branch; the
paper reports SDXL DMD2 4-step COCO-10k FID 21.24 → 20.94 with it. ``DIGITS_TUNED`` (eps_mix, λ 0.15, 1 step) is the
digits sweep's pick (docs/sweeps.md): all of its FD gain there is the injected noise (added variety, at a cost in
prompt adherence): the noise-only control (``source="noise_only"``) lowers a 4-step student's FD further without the
teacher (53.0 against 71.7; the student alone: 103.0), and no teacher variant (at the student's input, m DDIM steps)
beat both the student and the control at the student's accuracy.
"""

from __future__ import annotations

from numbers import Integral

import torch

from .sampling import Denoiser, Generators, Refiner, randn_like, sample_ddim, sample_few_step
from .schedule import NoiseSchedule

RULES = ("x0_lerp", "eps_mix")  # the paper's x0 proximal step; the authors' code's noise-prediction mix
# What the front ends (pipelines, ComfyUI nodes, CLI, model card) default to: the authors' published DMD2 setting.
# The functions below keep the paper's rule as their own default, since it is the one written out in closed form.
RECOMMENDED_RULE = "eps_mix"
RECOMMENDED_LAMBDA = 0.01
RECOMMENDED_GUIDED_STEPS = 2
RECOMMENDED_TEACHER_CFG = 7.5
# The digits sweep's pick, by name (the digits yardstick's Distillation++ row): more variety, less prompt adherence.
DIGITS_TUNED = {"rule": "eps_mix", "lam": 0.15, "guided_steps": 1}


def check_teacher_guidance(
    lam: float, guided_steps: int, rule: str = "x0_lerp", teacher_guidance_scale: float | None = None
) -> None:
    """Distillation++ settings, checked here for every front end (pipelines, ``fewstep sample``, ComfyUI nodes,
    the digits yardstick): λ in [0, 1], an integer K ≥ 0 of guided steps, a known rule and, when given, the
    teacher's CFG scale w ≥ 0. The errors quote the bad value."""
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"Distillation++ λ must be in [0, 1], got {lam}")
    if isinstance(guided_steps, bool) or not isinstance(guided_steps, Integral):
        raise ValueError(f"Distillation++ guided steps must be an integer, got {guided_steps!r}")
    if guided_steps < 0:
        raise ValueError(f"Distillation++ guided steps must be ≥ 0, got {guided_steps}")
    _check_rule(rule)
    if teacher_guidance_scale is not None and not float(teacher_guidance_scale) >= 0.0:
        raise ValueError(f"Distillation++ teacher CFG scale must be ≥ 0, got {teacher_guidance_scale}")


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"Distillation++ rule must be one of {', '.join(RULES)}, got {rule!r}")


# Where the guiding x̂0 comes from (the ablations of issue 26; "renoised" is Distillation++):
#   "renoised": the teacher at x_s = add_noise(x̂0_θ, ξ, s), the paper's step 2-3;
#   "noise_only": the control — the same ξ and x_s, no teacher call, the guiding x̂0 is the student's own, so eps_mix
#       applies its injected-noise term alone (x0_lerp then changes nothing);
#   "at_student_input": the teacher at the student's own x_t and t, no fresh noise (eps_mix is then exactly
#       lerp(x̂0_θ, x̂0_ψ(x_t), λ)).
GUIDE_SOURCES = ("renoised", "noise_only", "at_student_input")


def check_guide_source(source: str, teacher_steps: int) -> None:
    if source not in GUIDE_SOURCES:
        raise ValueError(f"Distillation++ guide source must be one of {', '.join(GUIDE_SOURCES)}, got {source!r}")
    if isinstance(teacher_steps, bool) or not isinstance(teacher_steps, Integral) or teacher_steps < 1:
        raise ValueError(f"Distillation++ teacher steps must be an integer ≥ 1, got {teacher_steps!r}")


def teacher_refinement(teacher: Denoiser, x_s: torch.Tensor, s: int, teacher_steps: int,
                       schedule: NoiseSchedule) -> torch.Tensor:  # fmt: skip
    """The teacher's x̂0 from x_s: one call (the paper), or ``teacher_steps`` deterministic DDIM steps from s to the
    clean image on an evenly spaced grid, sharper than its one-step estimate (the digits teacher's one-step FD is
    276, its 4-step 78)."""
    if teacher_steps == 1:
        return teacher(x_s, s)
    grid = sorted({round(s * (1 - k / teacher_steps)) for k in range(teacher_steps)}, reverse=True)
    return sample_ddim(teacher, x_s, grid, schedule)


def guide_x0(x0_student: torch.Tensor, teacher: Denoiser, x_t: torch.Tensor | None, t: int | None, s: int,
             schedule: NoiseSchedule, generator: Generators, source: str = "renoised",
             teacher_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """(x̂0 the rule pulls toward, the input it was taken at, that input's timestep), per ``source``."""
    if source == "at_student_input":
        if x_t is None or t is None:
            raise ValueError("the at_student_input guide needs the student's input x_t and its timestep t")
        return teacher_refinement(teacher, x_t, t, teacher_steps, schedule).to(x0_student.dtype), x_t, t
    x_s = schedule.add_noise(x0_student, randn_like(x0_student, generator), s)
    if source == "noise_only":
        return x0_student, x_s, s
    return teacher_refinement(teacher, x_s, s, teacher_steps, schedule).to(x0_student.dtype), x_s, s


def distillpp_refine(
    x0_student: torch.Tensor,
    teacher: Denoiser,
    s: int,
    lam: float,
    schedule: NoiseSchedule,
    generator: Generators = None,
    rule: str = "x0_lerp",
    x_t: torch.Tensor | None = None,
    t: int | None = None,
    source: str = "renoised",
    teacher_steps: int = 1,
) -> torch.Tensor:
    """One Distillation++ refinement of the student's x̂0_θ(x_t, t) with the teacher at x_s = add_noise(x̂0_θ, ε, s).

    ``x0_lerp``: ``lerp(x̂0_θ, x̂0_ψ, λ)``. ``eps_mix``: ``x̂0_θ − λ·(σ_t/α_t)·(ε_ψ − ε_θ)`` with
    ε_θ = ε(x̂0_θ; x_t, t) and ε_ψ = ε(x̂0_ψ; x_s, s); it needs the student's input ``x_t`` and ``t``. ``source``
    and ``teacher_steps`` choose where x̂0_ψ comes from (:data:`GUIDE_SOURCES`, :func:`teacher_refinement`).
    """
    check_guide_source(source, teacher_steps)
    x0_teacher, x_s, s = guide_x0(x0_student, teacher, x_t, t, s, schedule, generator, source, teacher_steps)
    if rule == "x0_lerp":
        return torch.lerp(x0_student, x0_teacher, lam)
    _check_rule(rule)
    if x_t is None or t is None:
        raise ValueError("the eps_mix rule needs the student's input x_t and its timestep t")
    eps_student = schedule.eps_from_x0(x0_student, x_t, t)
    eps_teacher = schedule.eps_from_x0(x0_teacher, x_s, s)
    alpha_t, sigma_t = schedule.coefficients(t, x0_student)
    return x0_student - lam * (sigma_t / alpha_t) * (eps_teacher - eps_student)


def distillpp_refiner(
    teacher: Denoiser,
    timesteps: list[int],
    lam: float,
    guided_steps: int,
    schedule: NoiseSchedule,
    generator: Generators = None,
    rule: str = "x0_lerp",
    source: str = "renoised",
    teacher_steps: int = 1,
) -> Refiner | None:
    """The sampler hook that applies :func:`distillpp_refine` on the first ``guided_steps`` steps (None if idle)."""
    check_teacher_guidance(lam, guided_steps, rule)
    check_guide_source(source, teacher_steps)
    if lam == 0.0 or guided_steps == 0:
        return None

    def refine(x0: torch.Tensor, i: int, t: int, x_t: torch.Tensor) -> torch.Tensor:
        if i >= guided_steps:
            return x0
        s = timesteps[i + 1] if i + 1 < len(timesteps) else t
        return distillpp_refine(x0, teacher, s, lam, schedule, generator, rule, x_t, t, source, teacher_steps)

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
    rule: str = "x0_lerp",
    source: str = "renoised",
    teacher_steps: int = 1,
) -> torch.Tensor:
    """Few-step student sampling with Distillation++ on the first ``guided_steps`` steps."""
    refine = distillpp_refiner(teacher, timesteps, lam, guided_steps, schedule, generator, rule, source, teacher_steps)
    return sample_few_step(student, noise, timesteps, schedule, generator, refine=refine)
