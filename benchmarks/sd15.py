"""The real Stable Diffusion 1.5 architecture with random weights, for benchmarks (nothing is downloaded).

The configs are those of SD1.5's ``unet``, ``vae``, ``text_encoder`` and ``scheduler`` folders (the CLIP ViT-L/14
text tower: 12 layers, width 768, vocabulary 49408). Only the tokenizer is the offline stand-in of
``fewstep.training.teacher.tiny_models``: it tokenizes to the same 77-token sequence length, and its ids are valid in the
49408-entry embedding, so every timed network runs at the real size.
"""

from __future__ import annotations

import tempfile

import torch

from ..core.schedule import SD_TRAINING_SCHEDULE

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.18215,
)
SD15_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
SD15_SCHEDULER = dict(**SD_TRAINING_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_random_sd15_pipeline(seed: int = 0):
    """A ``StableDiffusionPipeline`` (DDIM scheduler, no safety checker) at SD1.5's real size, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..training.teacher.tiny_models import clip_text_config, write_offline_clip_tokenizer

    with tempfile.TemporaryDirectory() as directory:
        tokenizer = write_offline_clip_tokenizer(directory)
    torch.manual_seed(seed)
    text_config = clip_text_config(tokenizer, **SD15_TEXT_ENCODER)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE).eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET).eval(),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
