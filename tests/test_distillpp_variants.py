"""Distillation++'s ablations in core.distillpp, checked against the rule written out: the noise-only control injects
eps_mix's noise term and calls no teacher; the teacher at the student's own input is an exact x0 lerp; a multi-step
teacher runs DDIM from x_s."""

import torch

from fewstep.core.distillpp import distillpp_refine, teacher_refinement
from fewstep.core.sampling import ddim_step
from fewstep.core.schedule import SD_TRAINING_SCHEDULE, NoiseSchedule

SCHEDULE = NoiseSchedule.from_config(dict(SD_TRAINING_SCHEDULE))
T, S, LAM = 999, 749, 0.1


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0_student, x_t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    return x0_student, x_t


def test_the_noise_only_control_is_the_injected_noise_term_and_calls_no_teacher():
    x0_student, x_t = inputs()
    calls = []
    teacher = lambda x, t: calls.append(t) or torch.zeros_like(x)  # noqa: E731
    out = distillpp_refine(x0_student, teacher, S, LAM, SCHEDULE, torch.Generator().manual_seed(7), "eps_mix", x_t, T,
                           source="noise_only")  # fmt: skip
    xi = torch.randn(x0_student.shape, generator=torch.Generator().manual_seed(7))  # the same fresh ξ
    alpha_t, sigma_t = SCHEDULE.coefficients(T, x0_student)
    eps_student = SCHEDULE.eps_from_x0(x0_student, x_t, T)
    torch.testing.assert_close(out, x0_student - LAM * (sigma_t / alpha_t) * (xi - eps_student))
    assert calls == []


def test_the_renoised_teacher_is_the_control_plus_a_lerp_of_weight_lam_sqrt_snr_ratio():
    x0_student, x_t = inputs()
    target = torch.full_like(x0_student, 0.5)
    teacher = lambda x, t: target  # noqa: E731
    run = lambda source: distillpp_refine(x0_student, teacher, S, LAM, SCHEDULE, torch.Generator().manual_seed(3),  # noqa: E731
                                          "eps_mix", x_t, T, source=source)  # fmt: skip
    a_t, s_t = SCHEDULE.coefficients(T, x0_student)
    a_s, s_s = SCHEDULE.coefficients(S, x0_student)
    weight = LAM * (s_t * a_s) / (a_t * s_s)  # λ·√(SNR_s / SNR_t)
    torch.testing.assert_close(run("renoised"), run("noise_only") + weight * (target - x0_student))


def test_the_teacher_at_the_students_input_is_an_exact_lerp_with_no_noise():
    x0_student, x_t = inputs()
    target = torch.full_like(x0_student, -0.25)
    seen = []
    teacher = lambda x, t: seen.append((x, t)) or target  # noqa: E731
    out = distillpp_refine(x0_student, teacher, S, LAM, SCHEDULE, None, "eps_mix", x_t, T, source="at_student_input")
    torch.testing.assert_close(out, torch.lerp(x0_student, target, LAM))
    assert len(seen) == 1 and seen[0][0] is x_t and seen[0][1] == T


def test_a_multi_step_teacher_runs_ddim_from_x_s_down_an_even_grid():
    x_s = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []

    def teacher(x, t):
        seen.append(t)
        return 0.9 * x / SCHEDULE.coefficients(t, x)[0]

    out = teacher_refinement(teacher, x_s, S, 2, SCHEDULE)
    assert seen == [749, 374]
    x0 = 0.9 * x_s / SCHEDULE.coefficients(S, x_s)[0]
    x_mid = ddim_step(x0, x_s, S, 374, SCHEDULE)
    torch.testing.assert_close(out, 0.9 * x_mid / SCHEDULE.coefficients(374, x_mid)[0])
    seen.clear()
    torch.testing.assert_close(teacher_refinement(teacher, x_s, S, 1, SCHEDULE), x0)  # one step: the paper's
    assert seen == [749]


def test_the_yardstick_names_each_ablation_and_counts_its_extra_unet_passes():
    import pytest

    from fewstep.digits.yardstick import DistillppSettings

    assert DistillppSettings(guide="noise").extra_unet_calls(2.0) == 0
    assert DistillppSettings(lam=0.01, guided_steps=2).extra_unet_calls(2.0) == 4  # 2 steps × CFG's 2 passes
    assert DistillppSettings(guided_steps=2, teacher_steps=4).extra_unet_calls(2.0) == 16
    assert "guide teacher_at_input" in DistillppSettings(guide="teacher_at_input").describe(2.0)
    with pytest.raises(ValueError, match="guide must be one of"):
        DistillppSettings(guide="oracle")
    with pytest.raises(ValueError, match="teacher steps must be an integer ≥ 1"):
        DistillppSettings(teacher_steps=0)
