"""The teacher reduced to what training needs: its conditionings encoded once, then only the UNet and VAE decoder.

The text encoders (SDXL's two) and the VAE encoder are dropped once the prompts and ``--images`` are encoded, so that
only the base UNet (which carries the adapters) and the decoder of the validation grids stay in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .networks import TextConditioning
from .precision import WEIGHT_DTYPES


@dataclass
class EncodedTeacher:
    """What stays of the teacher pipeline once its encoders have run."""

    unet: torch.nn.Module  # on the device, in the --mixed-precision weight dtype
    vae: torch.nn.Module  # the decoder only
    schedule: Any  # the teacher's NoiseSchedule, on the device
    prompt_cond: TextConditioning  # every training prompt
    uncond: TextConditioning  # the empty prompt, for CFG
    real_latents: Any  # LatentPosteriors of --images, or None without the GAN
    real_cond: TextConditioning | None  # the captions of --images
    validation_cond: TextConditioning  # the first --num-validation-prompts prompts
    latent_shape: tuple[int, ...]  # (C, H/f, W/f)


def encode_teacher(pipe, family: str, prompts: list[str], real_items: list, use_gan: bool, config,
                   device: torch.device) -> EncodedTeacher:  # fmt: skip
    """Encode the prompts (and, with the GAN, the real images and their captions); keep the UNet and the decoder."""
    from ..teacher import loading as teachers

    resolution = config.resolution
    pipe.to(device)
    schedule = teachers.teacher_schedule(pipe).to(device)
    prompt_cond = teachers.encode_prompts(pipe, family, prompts, resolution)
    uncond = teachers.unconditional(pipe, family, resolution)
    real_latents = teachers.encode_images(pipe, real_items, resolution) if use_gan else None
    real_cond = (
        teachers.encode_prompts(pipe, family, [i.caption for i in real_items], resolution) if use_gan else None
    )
    validation_cond = teachers.encode_prompts(pipe, family, prompts[: config.num_validation_prompts], resolution)
    unet, vae = pipe.unet, pipe.vae
    pipe.text_encoder = pipe.tokenizer = None
    if family == "sdxl":
        pipe.text_encoder_2 = pipe.tokenizer_2 = None
    vae.encoder = None  # only the decoder is needed, for validation images
    unet.to(device)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    if unet.dtype != weight_dtype:  # diffusers warns on any dtype cast, even a no-op one (the full-precision runs)
        unet.to(dtype=weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    latent_size = resolution // teachers.vae_scale_factor_of(vae)
    latent_shape = (unet.config.in_channels, latent_size, latent_size)
    return EncodedTeacher(unet, vae, schedule, prompt_cond, uncond, real_latents, real_cond, validation_cond,
                          latent_shape)  # fmt: skip
