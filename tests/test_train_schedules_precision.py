"""The real-user path of `fewstep train`: learning-rate schedules in iterations, fp16 loss scaling, GAN real
latents drawn from the VAE posterior, the effective-batch warning and refused option combinations."""

import math

import pytest
import torch
from PIL import Image

from fewstep.training.data.prompts import CaptionedImage
from fewstep.training.methods.dmd2 import DMD2TrainConfig, effective_batch_warning, train_dmd2
from fewstep.training.loop.errors import TrainingError
from fewstep.training.loop.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
from fewstep.training.loop.networks import SharedUNetNetworks, attach_adapters
from fewstep.training.teacher.loading import encode_images, encode_prompts, teacher_schedule, unconditional
from fewstep.training.teacher.tiny_models import build_tiny_sd15_pipeline


def config(teacher, output, prompts, **overrides):
    base = dict(
        teacher=str(teacher), output=str(output), prompts=str(prompts), max_steps=4, gen_rank=4, fake_rank=4,
        checkpoint_every=0, validate_every=0, lr=1e-3,
    )  # fmt: skip
    return DMD2TrainConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------------------- schedules
def documented_factor(k, warmup, total, schedule):
    """docs/defaults.md: linear warm-up over `warmup` iterations, then constant or cosine to 0 at `total`."""
    warm = min(1.0, (k + 1) / warmup)
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, k - warmup) / (total - warmup))))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_both_learning_rates_follow_the_documented_schedule_in_iterations(teacher, prompts, tmp_path, schedule):
    seen = {}
    train_dmd2(
        config(teacher, tmp_path / "run", prompts, max_steps=9, warmup_steps=4, dfake_gen_update_ratio=3,
               lr=1e-3, fake_lr=2e-3, lr_schedule=schedule),
        on_step=lambda step, metrics: seen.__setitem__(step - 1, metrics),
    )  # fmt: skip
    for k in range(9):
        expected = documented_factor(k, 4, 9, schedule)
        assert seen[k]["lr_generator"] == pytest.approx(1e-3 * expected, rel=1e-9), k
        assert seen[k]["lr_fake_score"] == pytest.approx(2e-3 * expected, rel=1e-9), k


def test_a_generator_updating_every_tenth_iteration_leaves_warm_up_with_the_fake_score(teacher, prompts, tmp_path):
    seen = {}
    train_dmd2(
        config(teacher, tmp_path / "run", prompts, max_steps=11, warmup_steps=5, dfake_gen_update_ratio=10),
        on_step=lambda step, metrics: seen.__setitem__(step - 1, metrics),
    )  # fmt: skip
    assert "loss_dm" in seen[10]  # a generator update …
    assert seen[10]["lr_generator"] == pytest.approx(1e-3)  # … at the full rate (counted in updates: 2 of 5 → 0.4×)


def test_fake_score_defaults_to_lora_scale_one_and_the_generator_learning_rate():
    resolved = DMD2TrainConfig(lr=3e-5, fake_rank=32).resolved("sdxl")
    assert resolved.fake_alpha == 32.0 and resolved.fake_lr == 3e-5
    assert resolved.gradient_checkpointing is True  # SDXL on a 24 GB card needs it
    assert DMD2TrainConfig().resolved("sd15").gradient_checkpointing is False


# ----------------------------------------------------------------------------------------- fp16
def tiny_gradient_generator_grads(unet_dtype, fp16_loss_scaling):
    """Generator LoRA gradients of an injected tiny loss (1e-9·⟨x, d⟩) through an fp16 or fp32 base UNet."""
    pipe = build_tiny_sd15_pipeline()
    cond = encode_prompts(pipe, "sd15", ["a red car", "a cat"], 32)
    torch.manual_seed(0)
    attach_adapters(pipe.unet, 4, 4, 4, 4, init_lora_weights=False)
    pipe.unet.to(unet_dtype)
    for name, param in pipe.unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    networks = SharedUNetNetworks(pipe.unet, teacher_schedule(pipe), unconditional(pipe, "sd15", 32), 1.0)
    direction = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    class InjectedTinyGradient(DMD2Loop):
        def generator_loss(self, x, cond):
            loss = 1e-9 * (x * direction).sum()
            return loss, {"loss_dm": loss.detach()}

    seen = []

    def record(params, max_norm):
        seen.append(torch.cat([p.grad.flatten() for p in params]).clone())
        return torch.tensor(0.0)

    sgd = lambda params: torch.optim.SGD(params, lr=0.0)
    loop = InjectedTinyGradient(
        networks, sgd(networks.generator_parameters()), sgd(networks.fake_score_parameters()),
        DMD2LoopConfig(use_fake_score=False), clip_grad_norm=record, fp16_loss_scaling=fp16_loss_scaling,
    )  # fmt: skip
    with torch.autocast("cpu", dtype=torch.float16, enabled=unet_dtype == torch.float16):
        loop.train_step(DMD2Batch(shape=(2, 4, 16, 16), cond=cond))
    return seen[0]


def test_fp16_loss_scaling_keeps_a_tiny_gradient_that_fp16_alone_loses():
    reference = tiny_gradient_generator_grads(torch.float32, fp16_loss_scaling=False)
    scaled = tiny_gradient_generator_grads(torch.float16, fp16_loss_scaling=True)
    unscaled = tiny_gradient_generator_grads(torch.float16, fp16_loss_scaling=False)
    assert reference.norm() > 0
    assert float((scaled - reference).norm() / reference.norm()) < 0.05  # fp16 precision, unscaled back exactly
    assert float(unscaled.norm() / reference.norm()) < 0.5  # without scaling most of it underflows to 0


def test_fp16_training_runs_with_a_loss_scale_per_optimizer(teacher, prompts, tmp_path):
    seen = []
    train_dmd2(
        config(teacher, tmp_path / "run", prompts, mixed_precision="fp16", dfake_gen_update_ratio=1),
        on_step=lambda step, metrics: seen.append(metrics),
    )  # fmt: skip
    assert all("grad_scale_generator" in m and "grad_scale_fake_score" in m for m in seen)
    assert all(math.isfinite(m["loss_fake"]) for m in seen)


# ----------------------------------------------------------------------------------------- GAN real latents
def test_gan_real_latents_are_drawn_from_the_vae_posterior_not_its_mean(tmp_path):
    pipe = build_tiny_sd15_pipeline()
    Image.new("RGB", (32, 32), (200, 30, 90)).save(tmp_path / "a.png")
    posteriors = encode_images(pipe, [CaptionedImage(tmp_path / "a.png", "a red thing")], 32)
    index = torch.zeros(4000, dtype=torch.long)
    draws = posteriors.sample(index, torch.Generator().manual_seed(0))
    assert posteriors.std.min() > 0
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), posteriors.mean[0], atol=0.1, rtol=0)
    torch.testing.assert_close(draws.std(0), posteriors.std[0], atol=0.1, rtol=0.1)


@pytest.mark.parametrize("kind", ["sample", "mean"])
def test_the_trainer_gives_the_gan_posterior_samples_or_with_gan_real_latents_mean_the_means(
    teacher, prompts, tmp_path, monkeypatch, kind
):
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 30, 90), (20, 180, 60)]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a red thing")
    posteriors = encode_images(build_tiny_sd15_pipeline(), [CaptionedImage(images / f"{i}.png", "") for i in range(2)], 32)
    seen = []
    train_step = DMD2Loop.train_step
    record = lambda self, batches: (seen.extend(b.real_x0 for b in batches), train_step(self, batches))[1]
    monkeypatch.setattr(DMD2Loop, "train_step", record)
    train_dmd2(config(teacher, tmp_path / "run", prompts, images=str(images), gan_weight=1e-3, max_steps=2,
                      gan_real_latents=kind))  # fmt: skip
    assert seen and all(real is not None for real in seen)
    for real in seen:
        is_mean = [any(torch.allclose(x, m, atol=1e-5) for m in posteriors.mean.half().float()) for x in real]  # fp16 cache
        assert all(is_mean) if kind == "mean" else not any(is_mean)


# ----------------------------------------------------------------------------------------- warnings, refusals
def test_an_effective_batch_far_below_the_reference_warns_in_one_line():
    small = effective_batch_warning(DMD2TrainConfig(batch_size=1), "sdxl", num_processes=1)
    assert small is not None and len(small.splitlines()) == 1 and "128" in small
    assert effective_batch_warning(DMD2TrainConfig(batch_size=2, gradient_accumulation_steps=4), "sdxl", 1) is None


def test_the_digits_teacher_gets_no_effective_batch_warning(tmp_path):
    """The reference's batch is for SD at 512/1024 px; the digits demo's batch 32 is the sweep's choice."""
    (tmp_path / "fewstep_teacher.json").write_text("{}")
    assert effective_batch_warning(DMD2TrainConfig(teacher=str(tmp_path), batch_size=32), "sd15", 1) is None
    assert effective_batch_warning(DMD2TrainConfig(teacher=str(tmp_path / "other"), batch_size=32), "sd15", 1)


def test_training_prints_the_effective_batch_warning(teacher, prompts, tmp_path, capsys):
    train_dmd2(config(teacher, tmp_path / "run", prompts, max_steps=1))
    assert "warning: effective batch 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(gan_weight=0.1, disc_weight=0.0), "untrained discriminator"),
        (dict(num_steps=4, backward_simulation=False), "backward simulation"),
    ],
)
def test_known_bad_option_combinations_are_refused(teacher, prompts, tmp_path, overrides, message):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "0.png")
    (images / "0.txt").write_text("a cat")
    with_images = {"images": str(images)} if "gan_weight" in overrides else {}
    with pytest.raises(TrainingError, match=message):
        train_dmd2(config(teacher, tmp_path / "run", prompts, **with_images, **overrides))
