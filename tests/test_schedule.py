"""The math layer's schedule and conversions equal diffusers' DDPMScheduler/DDIMScheduler (test-only reference)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fewstep.core.schedule import NoiseSchedule, parse_timesteps, student_timesteps, validate_timesteps

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]
ALL_T = torch.arange(1000)


def scheduler_config(beta_schedule, prediction_type="epsilon"):
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    )


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("reference_cls", [DDPMScheduler, DDIMScheduler])
def test_alphas_cumprod_equal_diffusers(beta_schedule, reference_cls):
    reference = reference_cls(**scheduler_config(beta_schedule))
    ours = NoiseSchedule.from_config(dict(reference.config))
    torch.testing.assert_close(ours.alphas_cumprod, reference.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_add_noise_and_velocity_equal_diffusers_at_every_t(beta_schedule):
    reference = DDPMScheduler(**scheduler_config(beta_schedule))
    ours = NoiseSchedule.from_config(dict(reference.config))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1000, 4, 3, 3, generator=g)
    eps = torch.randn(1000, 4, 3, 3, generator=g)
    torch.testing.assert_close(ours.add_noise(x0, eps, ALL_T), reference.add_noise(x0, eps, ALL_T), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.velocity(x0, eps, ALL_T), reference.get_velocity(x0, eps, ALL_T), atol=1e-6, rtol=0)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_to_x0_equals_ddim_pred_original_sample_at_every_t(beta_schedule, prediction_type):
    config = scheduler_config(beta_schedule, prediction_type)
    ours = NoiseSchedule.from_config(config)
    reference = DDIMScheduler(**config)
    reference.set_timesteps(1000)  # step t → t−1: exposes pred_original_sample at every t
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 3, 3, generator=g, dtype=torch.float64).float()
    model_output = torch.randn(4, 3, 3, generator=g)
    for t in range(1000):
        expected = reference.step(model_output, t, x_t).pred_original_sample
        torch.testing.assert_close(ours.to_x0(model_output, x_t, t), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_from_x0_inverts_to_x0(prediction_type):
    ours = NoiseSchedule.from_config(scheduler_config("scaled_linear", prediction_type))
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(1000, 4, dtype=torch.float64, generator=g)
    out = torch.randn(1000, 4, dtype=torch.float64, generator=g)
    back = ours.from_x0(ours.to_x0(out, x_t, ALL_T), x_t, ALL_T)
    torch.testing.assert_close(back, out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_target_is_what_the_model_should_predict(prediction_type):
    ours = NoiseSchedule.from_config(scheduler_config("scaled_linear", prediction_type))
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 1000, 4, generator=g)
    x_t = ours.add_noise(x0, eps, ALL_T)
    torch.testing.assert_close(ours.to_x0(ours.target(x0, eps, ALL_T), x_t, ALL_T), x0, atol=2e-4, rtol=0)


def test_unknown_beta_schedule_is_rejected_by_name():
    with pytest.raises(ValueError, match="'sigmoid'"):
        NoiseSchedule.from_config({"beta_schedule": "sigmoid"})


def test_unknown_prediction_type_is_rejected_by_name():
    with pytest.raises(ValueError, match="'flow'"):
        NoiseSchedule.from_config({"prediction_type": "flow"})


def test_four_step_student_timesteps_are_dmd2s():
    assert student_timesteps(4) == [999, 749, 499, 249]
    assert student_timesteps(2) == [999, 499]
    assert student_timesteps(1) == [999]


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 8, 16])
def test_any_step_count_gives_a_strictly_descending_list_of_that_length(num_steps):
    steps = student_timesteps(num_steps)
    assert len(steps) == num_steps and steps[0] == 999
    assert all(a > b for a, b in zip(steps, steps[1:])) and min(steps) >= 0  # no timestep twice


@pytest.mark.parametrize("timesteps", [[999, 999, 499], [999, 499, 499], [499, 499]])
def test_a_repeated_timestep_is_refused(timesteps):
    with pytest.raises(ValueError, match="strictly descending"):
        validate_timesteps(timesteps)
    with pytest.raises(ValueError, match="strictly descending"):
        parse_timesteps(",".join(map(str, timesteps)))


def test_more_shifted_steps_than_timesteps_below_the_first_is_refused_not_repeated():
    # 8 steps from t = 3 would round to [3, 2, 2, 2, 1, 0, 0, 0]: only 4 distinct timesteps exist.
    with pytest.raises(ValueError, match="strictly descending"):
        student_timesteps(8, first_timestep=3)


def test_shifted_one_step_timestep():
    assert student_timesteps(1, first_timestep=399) == [399]
    assert student_timesteps(4, first_timestep=399) == [399, 299, 199, 99]


def test_custom_timestep_lists_are_validated():
    assert parse_timesteps("999, 749,499,249") == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="descending"):
        validate_timesteps([249, 499])
    with pytest.raises(ValueError, match="lie in"):
        validate_timesteps([1000, 10])
    with pytest.raises(ValueError, match="empty"):
        validate_timesteps([])
    with pytest.raises(ValueError, match="parse"):
        parse_timesteps("999;499")
    with pytest.raises(ValueError, match="≥ 1"):
        student_timesteps(0)
