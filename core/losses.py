"""Loss functions of DMD, DMD2 and Progressive Distillation. Each returns ``(loss, metrics)``.

Pure tensor functions: the networks are evaluated by the caller (the training loops), which passes their x0
estimates in. Shapes: (B, ...) with the batch first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import NoiseSchedule


def distribution_matching_loss(
    x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """DMD's distribution matching loss (DMD eq. 7–8, DMD2's reference implementation).

    ``x`` is the generator's output (with grad); ``x0_real``/``x0_fake`` are the real (teacher, CFG) and fake
    scores' x0 estimates at a noised copy of ``x``. With p = x − x0:
    ``grad = (p_real − p_fake) / mean(|p_real|)`` (per sample, over all non-batch dims) then ``nan_to_num``;
    ``loss = 0.5·mse(x, (x − grad).detach())``, so ∂loss/∂x = grad / numel: descending it moves x toward the
    teacher's x0 and away from the fake score's. The normaliser makes the step size independent of the noise level.
    """
    x0_real, x0_fake = x0_real.detach(), x0_fake.detach()
    with torch.no_grad():
        p_real = x - x0_real
        p_fake = x - x0_fake
        reduce_dims = tuple(range(1, x.ndim))
        normaliser = p_real.abs().mean(dim=reduce_dims, keepdim=True)
        grad = torch.nan_to_num((p_real - p_fake) / normaliser)
    loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float(), reduction="mean")
    return loss, {"loss_dm": loss.detach(), "dm_grad_norm": grad.norm().detach()}


def denoising_loss(
    x0_pred: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
) -> tuple[torch.Tensor, dict]:
    """The fake score's loss: plain denoising MSE in the model's own prediction space (ε-MSE for ε models).

    ``x0_pred`` is the network's x0 estimate at ``x_t = add_noise(x0, eps, t)``; it is converted back to the
    network's prediction type so the weighting matches the reference's ``mean((ε̂ − ε)²)``.
    """
    prediction = schedule.from_x0(x0_pred.float(), x_t.float(), t)
    target = schedule.target(x0.float(), eps.float(), t)
    loss = F.mse_loss(prediction, target.detach(), reduction="mean")
    return loss, {"loss_fake": loss.detach()}


def gan_generator_loss(fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Non-saturating GAN loss for the generator: ``softplus(−D(G(z))).mean()``."""
    loss = F.softplus(-fake_logits.float()).mean()
    return loss, {"loss_gan_gen": loss.detach()}


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Discriminator loss: ``softplus(D(fake)).mean() + softplus(−D(real)).mean()``."""
    loss_fake = F.softplus(fake_logits.float()).mean()
    loss_real = F.softplus(-real_logits.float()).mean()
    loss = loss_fake + loss_real
    return loss, {
        "loss_disc": loss.detach(),
        "disc_real_prob": torch.sigmoid(real_logits.detach().float()).mean(),
        "disc_fake_prob": torch.sigmoid(fake_logits.detach().float()).mean(),
    }


def regression_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "pseudo_huber", huber_c: float = 0.03
) -> tuple[torch.Tensor, dict]:
    """DMD's regression loss on teacher ODE pairs (z, y): ``d(G(z), y)``.

    The paper uses LPIPS, which needs pretrained VGG/AlexNet weights; fewstep offers the weight-free
    ``pseudo_huber`` (sqrt(‖Δ‖²/n + c²) − c per sample) and ``l2`` distances in the space of ``pred``.
    """
    diff = (pred.float() - target.detach().float()).flatten(1)
    if kind == "l2":
        loss = diff.pow(2).mean()
    elif kind == "pseudo_huber":
        loss = (torch.sqrt(diff.pow(2).mean(dim=1) + huber_c**2) - huber_c).mean()
    else:
        raise ValueError(f"regression loss {kind!r} is not supported; use 'pseudo_huber' or 'l2'")
    return loss, {"loss_reg": loss.detach()}


def progressive_target(
    z_t: torch.Tensor, z_t2: torch.Tensor, t: torch.Tensor | int, t2: torch.Tensor | int, schedule: NoiseSchedule
) -> torch.Tensor:
    """Progressive Distillation's target x̃ (Salimans & Ho 2022, Alg. 2).

    ``z_t2`` is the result of the teacher's two DDIM steps from ``z_t`` at t to t2 (t2 = −1: clean). x̃ is the x0
    for which ONE DDIM step from z_t lands exactly on z_t2:
    ``x̃ = (z_t2 − (σ_t2/σ_t)·z_t) / (α_t2 − (σ_t2/σ_t)·α_t)``; at t2 = −1 (σ = 0, α = 1) x̃ = z_t2.
    """
    a_t, s_t = schedule.coefficients(t, z_t)
    a_t2, s_t2 = schedule.coefficients(t2, z_t)
    ratio = s_t2 / s_t
    return (z_t2 - ratio * z_t) / (a_t2 - ratio * a_t)


# Progressive Distillation's loss weights over t, as x-space weights (an ε-student's ε-space weight is this / SNR):
# "truncated_snr" max(SNR, 1), the paper's (ε-space max(1, 1/SNR): 214 at t = 999, 1 at t = 249 on SD's schedule);
# "eps" SNR, an ε-space MSE (every step's ε error weighs alike).
PD_WEIGHTINGS = ("truncated_snr", "eps")


def progressive_loss(
    x0_pred: torch.Tensor, x0_target: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
    weighting: str = "truncated_snr",
) -> tuple[torch.Tensor, dict]:
    """Progressive Distillation's x-space MSE weighted over t by ``weighting`` (:data:`PD_WEIGHTINGS`)."""
    a, s = schedule.coefficients(t, x0_pred)
    snr = (a / s) ** 2
    if weighting == "truncated_snr":
        weight = torch.clamp(snr, min=1.0)
    elif weighting == "eps":
        weight = snr
    else:
        raise ValueError(f"weighting must be one of {', '.join(PD_WEIGHTINGS)}, got {weighting!r}")
    loss = (weight * (x0_pred.float() - x0_target.detach().float()) ** 2).mean()
    return loss, {"loss_pd": loss.detach()}
