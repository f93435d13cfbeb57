"""Gradient checkpointing on one shared UNet gives exactly the gradients of the run without it.

Checkpointed blocks recompute their forward during backward with whatever adapter is active then; these tests
would catch a backward that runs under the wrong adapter (silent with equal ranks) or crosses two adapters
(a CheckpointError with unequal ones).
"""

import pytest
import torch

from fewstep.training.methods.dmd2 import train_dmd2
from fewstep.training.loop.dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
from fewstep.training.loop.networks import GANHead, SharedUNetNetworks, attach_adapters
from fewstep.training.teacher.loading import encode_prompts, teacher_schedule, unconditional
from fewstep.training.teacher.tiny_models import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline

BUILDERS = {"sd15": build_tiny_sd15_pipeline, "sdxl": build_tiny_sdxl_pipeline}


def networks_with_nonzero_adapters(family, gen_rank, fake_rank, checkpointing):
    pipe = BUILDERS[family]()
    cond = encode_prompts(pipe, family, ["a red car", "a cat"], 32)
    unet = pipe.unet
    torch.manual_seed(0)  # the same adapters and head in both runs; B ≠ 0 so every adapter changes the UNet
    attach_adapters(unet, gen_rank, gen_rank, fake_rank, fake_rank, init_lora_weights=False)
    head = GANHead(unet.config.block_out_channels[-1])
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return SharedUNetNetworks(unet, teacher_schedule(pipe), unconditional(pipe, family, 32), 2.0, head), cond


def gradients_of_one_iteration(family, gen_rank, fake_rank, checkpointing, num_steps=1, gan=0.5):
    """The generator's and the fake score's (+ GAN head's) gradients, as the optimizers would see them."""
    networks, cond = networks_with_nonzero_adapters(family, gen_rank, fake_rank, checkpointing)
    seen = []

    def record(params, max_norm):
        seen.append(torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params]))
        return torch.tensor(0.0)

    sgd = lambda params: torch.optim.SGD(params, lr=0.0)
    loop = DMD2Loop(
        networks, sgd(networks.generator_parameters()), sgd(networks.fake_score_parameters()),
        DMD2LoopConfig(
            student_timesteps=[999, 749, 499, 249][:num_steps] if num_steps > 1 else [999],
            dfake_gen_update_ratio=1, gan_generator_weight=gan, gan_discriminator_weight=gan,
        ),
        clip_grad_norm=record,
    )  # fmt: skip
    batch = DMD2Batch(shape=(2, 4, 16, 16), cond=cond, real_x0=torch.randn(2, 4, 16, 16), real_cond=cond)
    loop.train_step([batch, batch])  # two micro-batches: accumulation takes the staged path twice
    generator_grad, fake_score_grad = seen
    return generator_grad, fake_score_grad


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "family,gen_rank,fake_rank,num_steps,gan",
    [
        ("sd15", 4, 4, 1, 0.0),  # equal ranks, no GAN: the wrong adapter's recompute would be silent
        ("sd15", 4, 4, 1, 0.5),
        ("sd15", 4, 8, 4, 0.5),
        ("sdxl", 4, 4, 4, 0.0),
        ("sdxl", 8, 4, 1, 0.5),
    ],
)
def test_gradients_with_checkpointing_equal_those_without(family, gen_rank, fake_rank, num_steps, gan):
    kwargs = dict(num_steps=num_steps, gan=gan)
    plain = gradients_of_one_iteration(family, gen_rank, fake_rank, checkpointing=False, **kwargs)
    checkpointed = gradients_of_one_iteration(family, gen_rank, fake_rank, checkpointing=True, **kwargs)
    for name, a, b in zip(("generator", "fake score + GAN head"), checkpointed, plain):
        assert b.norm() > 0, f"{name} got no gradient"
        assert relative_difference(a, b) <= 1e-5, f"{name}: relative difference {relative_difference(a, b):.3g}"


def test_checkpointing_is_really_on_in_the_checkpointed_run(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    gradients_of_one_iteration("sd15", 4, 4, checkpointing=True)
    assert calls  # otherwise the equality above would prove nothing


def test_a_checkpointed_training_run_ends_where_the_plain_one_does(teacher, prompts, images, tmp_path):
    """Through the trainer, with the GAN on real images: the generator LoRA after 4 iterations is the same."""
    from safetensors.torch import load_file

    def lora_after(checkpointing):
        config = dict_config(teacher, tmp_path / f"run-{checkpointing}", prompts, images,
                             gradient_checkpointing=checkpointing)  # fmt: skip
        run = train_dmd2(config)
        return load_file(run / "checkpoints" / "step-0000004" / "generator.safetensors")

    plain, checkpointed = lora_after(False), lora_after(True)
    a = torch.cat([checkpointed[k].flatten() for k in sorted(plain)])
    b = torch.cat([plain[k].flatten() for k in sorted(plain)])
    assert relative_difference(a, b) <= 1e-5


def dict_config(teacher, output, prompts, images, **overrides):
    from fewstep.training.methods.dmd2 import DMD2TrainConfig

    return DMD2TrainConfig(
        teacher=str(teacher), output=str(output), prompts=str(prompts), images=str(images), max_steps=4,
        gen_rank=4, fake_rank=4, gen_alpha=4.0, fake_alpha=4.0, dfake_gen_update_ratio=1, checkpoint_every=0,
        validate_every=0, warmup_steps=1, lr=1e-3, gan_weight=0.1, **overrides,
    )  # fmt: skip
