"""Few-step, DDIM and Distillation++ samplers over a denoiser callable."""

import pytest
import torch

from fewstep.core.distillpp import distillpp_refine, sample_distillpp
from fewstep.core.sampling import cfg, ddim_timesteps, sample_ddim, sample_few_step
from fewstep.core.schedule import NoiseSchedule, student_timesteps

SCHEDULE = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})


def recording_denoiser(calls, scale=0.5):
    def denoise(x, t):
        calls.append((t, x.clone()))
        return scale * x

    return denoise


def test_few_step_sampler_predicts_x0_then_renoises_with_fresh_seeded_noise():
    timesteps = student_timesteps(4)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    out = sample_few_step(recording_denoiser(calls), noise, timesteps, SCHEDULE, torch.Generator().manual_seed(1))
    # Replay the rule by hand with the same generator.
    g = torch.Generator().manual_seed(1)
    x = noise
    for i, t in enumerate(timesteps):
        assert calls[i][0] == t
        torch.testing.assert_close(calls[i][1], x)
        x0 = 0.5 * x
        if i + 1 < len(timesteps):
            x = SCHEDULE.add_noise(x0, torch.randn(x0.shape, generator=g), timesteps[i + 1])
    torch.testing.assert_close(out, x0)


def test_one_step_sampler_starts_from_pure_noise_even_at_a_shifted_timestep():
    calls = []
    noise = torch.randn(1, 4, 4, 4)
    sample_few_step(recording_denoiser(calls), noise, [399], SCHEDULE)
    assert calls[0][0] == 399 and torch.equal(calls[0][1], noise)


def test_same_seed_same_samples_and_different_seed_different_samples():
    noise = torch.randn(1, 4, 4, 4)
    run = lambda seed: sample_few_step(lambda x, t: 0.3 * x, noise, [999, 499], SCHEDULE, torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_ddim_trailing_timesteps_start_at_the_last_training_step():
    assert ddim_timesteps(1) == [999]
    assert ddim_timesteps(4) == [999, 749, 499, 249]
    assert ddim_timesteps(50)[:3] == [999, 979, 959] and ddim_timesteps(50)[-1] == 19


def test_ddim_with_the_exact_gaussian_denoiser_recovers_the_data_variance():
    # Data N(0, s²): E[x0|x_t] = a s² / (a² s² + 1 − a²) · x_t, exact; DDIM's ODE preserves the marginal.
    s = 0.5

    def denoise(x, t):
        a2 = SCHEDULE.alphas_cumprod[t]
        return (a2.sqrt() * s**2 / (a2 * s**2 + 1 - a2)) * x

    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    coarse = sample_ddim(denoise, noise, ddim_timesteps(10), SCHEDULE)
    fine = sample_ddim(denoise, noise, ddim_timesteps(500), SCHEDULE)
    assert abs(float(fine.std()) - s) < 0.01  # converges to the ODE's exact marginal
    assert abs(float(fine.std()) - s) < abs(float(coarse.std()) - s)


def test_cfg_is_uncond_plus_scale_times_difference():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert cfg(u, c, 1.0) == c and cfg(u, c, 0.0) == u and cfg(u, c, 2.0) == 5.0


def test_distillpp_refine_lerps_toward_the_teacher_x0_at_the_renoised_sample():
    x0_student = torch.ones(2, 3)
    seen = []

    def teacher(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    out = distillpp_refine(x0_student, teacher, 499, 0.25, SCHEDULE, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.full((2, 3), 0.75))
    assert seen == [499]


def test_distillpp_queries_the_teacher_at_the_next_student_timestep_on_guided_steps_only():
    seen = []

    def teacher(x, t):
        seen.append(t)
        return x

    noise = torch.randn(1, 4)
    sample_distillpp(lambda x, t: 0.5 * x, teacher, noise, [999, 749, 499, 249], SCHEDULE, 0.1, guided_steps=2)
    assert seen == [749, 499]
    seen.clear()
    sample_distillpp(lambda x, t: 0.5 * x, teacher, noise, [999], SCHEDULE, 0.1, guided_steps=1)
    assert seen == [999]  # last step: no next timestep, the paper's s = t variant


def test_distillpp_with_lambda_zero_equals_plain_sampling():
    noise = torch.randn(2, 4)
    student = lambda x, t: 0.5 * x
    plain = sample_few_step(student, noise, [999, 499], SCHEDULE, torch.Generator().manual_seed(5))
    guided = sample_distillpp(student, lambda x, t: -x, noise, [999, 499], SCHEDULE, 0.0, 2, torch.Generator().manual_seed(5))
    assert torch.equal(plain, guided)


@pytest.mark.parametrize("lam", [-0.1, 1.5])
def test_distillpp_rejects_lambda_outside_unit_interval(lam):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_distillpp(lambda x, t: x, lambda x, t: x, torch.zeros(1, 2), [999], SCHEDULE, lam)


# ------------------------------------------------------------------ Distillation++'s eps_mix rule (the authors' code)
def test_eps_mix_mixes_noise_predictions_and_recomputes_x0_from_the_student_input():
    x_t, x0_student, t, s = torch.randn(2, 4), torch.randn(2, 4), 999, 749
    x0_teacher = torch.randn(2, 4)
    seen = {}

    def teacher(x_s, step):
        seen["x_s"] = x_s
        return x0_teacher

    out = distillpp_refine(x0_student, teacher, s, 0.2, SCHEDULE, torch.Generator().manual_seed(0), "eps_mix", x_t, t)
    # By hand: ε_S from the student's x0 at x_t, ε_T from the teacher's at x_s; mix; x0 from x_t with the mix.
    a_t, s_t = SCHEDULE.coefficients(t, x_t)
    a_s, s_s = SCHEDULE.coefficients(s, x_t)
    eps_student = (x_t - a_t * x0_student) / s_t
    eps_teacher = (seen["x_s"] - a_s * x0_teacher) / s_s
    eps = eps_student + 0.2 * (eps_teacher - eps_student)
    torch.testing.assert_close(out, (x_t - s_t * eps) / a_t)


def test_eps_mix_with_lambda_zero_keeps_the_student_and_lambda_one_takes_the_teacher_noise():
    x_t, x0_student = torch.randn(1, 4), torch.randn(1, 4)
    teacher = lambda x_s, step: torch.zeros_like(x_s)
    zero = distillpp_refine(x0_student, teacher, 749, 0.0, SCHEDULE, torch.Generator().manual_seed(0), "eps_mix", x_t, 999)
    torch.testing.assert_close(zero, x0_student)


def test_eps_mix_weighs_the_teacher_by_about_sqrt_snr_ratio_on_the_first_step():
    """In x0 terms eps_mix is a lerp of weight λ·√(SNR_s/SNR_t) (plus a noise term): ≈ 3.6·λ for 999 → 749."""
    a_t, s_t = SCHEDULE.coefficients(999, torch.zeros(1))
    a_s, s_s = SCHEDULE.coefficients(749, torch.zeros(1))
    ratio = float((a_s / s_s) / (a_t / s_t))
    assert 3.3 < ratio < 3.9
    # The teacher says the image is 0 and the student's input is noise-free (ε_S = 0); the fresh noise of the
    # re-noising averages out over many samples.
    x0_student = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    teacher = lambda x_s, step: torch.zeros_like(x_s)
    x_t = SCHEDULE.add_noise(x0_student, torch.zeros_like(x0_student), 999)  # noise-free input: ε_S = 0
    out = distillpp_refine(x0_student, teacher, 749, 0.01, SCHEDULE, torch.Generator().manual_seed(1), "eps_mix", x_t, 999)
    # x̂0_new = x̂0_S − λ(σ_t/α_t)·ε_T with ε_T = x_s/σ_s = (α_s x̂0_S + σ_s ε)/σ_s: the x̂0_S part shrinks by λ·ratio.
    shrink = 1 - float(((out * x0_student).sum() / (x0_student * x0_student).sum()))
    assert abs(shrink - 0.01 * ratio) < 0.01 * ratio * 0.1


def test_an_unknown_teacher_guidance_rule_is_refused():
    with pytest.raises(ValueError, match="x0_lerp, eps_mix"):
        sample_distillpp(lambda x, t: x, lambda x, t: x, torch.zeros(1, 2), [999], SCHEDULE, 0.1, rule="x0")
