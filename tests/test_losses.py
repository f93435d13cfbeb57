"""The DMD/DMD2/PD losses: gradients, signs and scales against their closed forms."""

import pytest
import torch
import torch.nn.functional as F

from fewstep.core.losses import (
    denoising_loss,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    progressive_loss,
    progressive_target,
    regression_loss,
)
from fewstep.core.sampling import ddim_step
from fewstep.core.schedule import NoiseSchedule

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def test_dm_loss_gradient_is_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(True)
    x0_real, x0_fake = torch.randn(2, 3, 4, 8, 8, generator=g)
    loss, _ = distribution_matching_loss(x, x0_real, x0_fake)
    loss.backward()
    p_real, p_fake = x.detach() - x0_real, x.detach() - x0_fake
    normaliser = p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (p_real - p_fake) / (normaliser * x.numel())
    torch.testing.assert_close(x.grad, expected, atol=1e-9, rtol=1e-5)


def test_dm_loss_descent_moves_toward_real_and_away_from_fake():
    x = torch.zeros(1, 2, requires_grad=True)
    x0_real, x0_fake = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    loss, _ = distribution_matching_loss(x, x0_real, x0_fake)
    loss.backward()
    step = -x.grad[0]
    assert step[0] > 0  # toward x0_real = +1, away from x0_fake = −1
    assert torch.dot(step, x0_real[0] - x.detach()[0]) > 0


def test_dm_loss_gradient_is_zero_when_fake_matches_real():
    x = torch.randn(2, 3, requires_grad=True)
    x0 = torch.randn(2, 3)
    loss, _ = distribution_matching_loss(x, x0, x0.clone())
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


def test_dm_loss_turns_zero_over_zero_into_no_gradient():
    # Both scores return x itself: 0/0 = NaN, which nan_to_num (as in the reference) makes 0.
    x = torch.ones(2, 3, requires_grad=True)
    loss, _ = distribution_matching_loss(x, x.detach().clone(), x.detach().clone())
    loss.backward()
    assert loss == 0 and torch.count_nonzero(x.grad) == 0


def test_dm_loss_gives_no_gradient_to_the_scores():
    x = torch.randn(2, 3, requires_grad=True)
    x0_real = torch.randn(2, 3, requires_grad=True)
    x0_fake = torch.randn(2, 3, requires_grad=True)
    distribution_matching_loss(x, x0_real, x0_fake)[0].backward()
    assert x0_real.grad is None and x0_fake.grad is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_loss_is_mse_in_the_models_prediction_space(prediction_type):
    schedule = NoiseSchedule.from_config({**SD, "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(1)
    x0, eps, prediction = torch.randn(3, 5, 4, generator=g)
    t = torch.tensor([10, 500, 990, 3, 700])
    x_t = schedule.add_noise(x0, eps, t)
    x0_pred = schedule.to_x0(prediction, x_t, t)
    loss, _ = denoising_loss(x0_pred, x0, eps, x_t, t, schedule)
    expected = F.mse_loss(prediction, schedule.target(x0, eps, t))
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)


def test_gan_generator_loss_is_non_saturating_softplus():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    loss, _ = gan_generator_loss(logits)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-logits)).mean())
    assert gan_generator_loss(torch.tensor([5.0]))[0] < gan_generator_loss(torch.tensor([-5.0]))[0]


def test_gan_discriminator_loss_rewards_real_high_and_fake_low():
    good, _ = gan_discriminator_loss(real_logits=torch.tensor([4.0]), fake_logits=torch.tensor([-4.0]))
    bad, _ = gan_discriminator_loss(real_logits=torch.tensor([-4.0]), fake_logits=torch.tensor([4.0]))
    assert good < 0.05 < 8.0 < bad
    loss, _ = gan_discriminator_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.5]))
    torch.testing.assert_close(loss, F.softplus(torch.tensor([0.5])).mean() + F.softplus(-torch.tensor([1.0, 2.0])).mean())


def test_regression_losses_are_zero_at_target_and_grow_with_distance():
    y = torch.randn(2, 4, 4)
    for kind in ("pseudo_huber", "l2"):
        assert regression_loss(y, y, kind)[0] == 0
        assert regression_loss(y + 0.1, y, kind)[0] < regression_loss(y + 1.0, y, kind)[0]
    with pytest.raises(ValueError, match="lpips"):
        regression_loss(y, y, "lpips")


def test_progressive_target_makes_one_student_ddim_step_land_on_two_teacher_steps():
    schedule = NoiseSchedule.from_config(SD)
    g = torch.Generator().manual_seed(2)
    z_t = torch.randn(4, 3, generator=g)
    t, t_mid, t2 = 749, 624, 499
    # Teacher: two DDIM steps with arbitrary x0 predictions.
    z_mid = ddim_step(torch.randn(4, 3, generator=g), z_t, t, t_mid, schedule)
    z_t2 = ddim_step(torch.randn(4, 3, generator=g), z_mid, t_mid, t2, schedule)
    x_tilde = progressive_target(z_t, z_t2, t, t2, schedule)
    torch.testing.assert_close(ddim_step(x_tilde, z_t, t, t2, schedule), z_t2, atol=1e-4, rtol=1e-4)


def test_progressive_target_at_the_last_step_is_the_clean_sample():
    schedule = NoiseSchedule.from_config(SD)
    z_t, clean = torch.randn(2, 4, 3)
    torch.testing.assert_close(progressive_target(z_t, clean, 249, -1, schedule), clean)


def test_progressive_loss_uses_truncated_snr_weight():
    schedule = NoiseSchedule.from_config(SD)
    x0_pred, x0 = torch.ones(2, 3), torch.zeros(2, 3)
    t = torch.tensor([999, 10])
    snr_low_t = float(schedule.alphas_cumprod[10] / (1 - schedule.alphas_cumprod[10]))
    loss, _ = progressive_loss(x0_pred, x0, t, schedule)
    torch.testing.assert_close(loss, torch.tensor((1.0 + snr_low_t) / 2), rtol=1e-4, atol=0)


def test_eps_weighting_is_the_eps_space_mse_of_an_eps_student():
    schedule = NoiseSchedule.from_config(SD)
    z_t, eps_pred, eps_target = torch.randn(3, 2, 4, 3)
    t = torch.tensor([999, 249])
    x0_of = lambda eps: schedule.to_x0(eps, z_t, t)  # the student read as x0, as the PD loop reads it
    loss, _ = progressive_loss(x0_of(eps_pred), x0_of(eps_target), t, schedule, weighting="eps")
    torch.testing.assert_close(loss, ((eps_pred - eps_target) ** 2).mean(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="weighting must be one of truncated_snr, eps"):
        progressive_loss(z_t, z_t, t, schedule, weighting="v")
