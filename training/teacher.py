"""Loading a Stable Diffusion teacher (Hub id or local folder), its family, and caching its text/image encodings.

After :func:`encode_prompts` and :func:`encode_images` the text encoders and the VAE encoder can be dropped:
training needs only the UNet (and the VAE decoder for validation images).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.schedule import NoiseSchedule
from .networks import TextConditioning

FAMILIES = ("sd15", "sdxl")


class TeacherError(ValueError):
    """The teacher cannot be used: the message names the problem and the fix."""


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1 or "\\" in name


def load_teacher(name: str, model_type: str | None = None):
    """Load a diffusers text-to-image pipeline and return ``(pipe, family)``; family is detected or overridden."""
    from diffusers import DiffusionPipeline

    if model_type is not None and model_type not in FAMILIES:
        raise TeacherError(f"unknown model type {model_type!r}; use one of {', '.join(FAMILIES)}")
    path = Path(name).expanduser()
    if path.is_file():
        raise TeacherError(
            f"teacher {name} is a file; give the diffusers pipeline folder that holds model_index.json, or a Hub id"
        )
    if _looks_like_path(name) and not path.is_dir():
        raise TeacherError(f"teacher folder {name} does not exist; give a diffusers pipeline folder or a Hub id")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise TeacherError(
            f"teacher folder {name} has no model_index.json; save the teacher with pipeline.save_pretrained(...)"
        )
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # loading bars would bury a one-line error; training has its own
    transformers_logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.is_dir() else name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeacherError(f"could not load teacher {name!r}: {first_line}") from None
    detected = detect_family(pipe)
    if detected is None:
        raise TeacherError(f"teacher {name!r} ({type(pipe).__name__}) is not a Stable Diffusion 1.x/2.x or SDXL pipeline")
    if model_type is not None and model_type != detected:
        print(f"fewstep: --model-type {model_type} overrides the detected family {detected}")
    return pipe, model_type or detected


def detect_family(pipe) -> str | None:
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "text_encoder", None) is None:
        return None
    if getattr(unet.config, "addition_embed_type", None) == "text_time" or getattr(pipe, "text_encoder_2", None):
        return "sdxl"
    return "sd15"


def teacher_schedule(pipe) -> NoiseSchedule:
    return NoiseSchedule.from_config(dict(pipe.scheduler.config))


def vae_scale_factor_of(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_scale_factor(pipe) -> int:
    return vae_scale_factor_of(pipe.vae)


def default_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * vae_scale_factor(pipe)


def check_resolution(pipe, resolution: int) -> None:
    factor = vae_scale_factor(pipe)
    if resolution <= 0 or resolution % factor:
        raise TeacherError(
            f"resolution {resolution} is not divisible by the VAE's scale factor {factor}; "
            f"use a multiple of {factor} such as {max(factor, resolution // factor * factor)}"
        )


@torch.no_grad()
def encode_prompts(pipe, family: str, prompts: list[str], resolution: int, batch_size: int = 32) -> TextConditioning:
    """Text conditioning for every prompt, computed once (kept on the CPU)."""
    device = pipe.unet.device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        if family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(batch, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=embeds.dtype)
            chunks.append(TextConditioning(embeds.cpu(), pooled.cpu(), time_ids.expand(len(batch), 6).clone()))
        else:
            embeds, _ = pipe.encode_prompt(batch, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            chunks.append(TextConditioning(embeds.cpu()))
    return TextConditioning.cat(chunks)


@torch.no_grad()
def unconditional(pipe, family: str, resolution: int) -> TextConditioning:
    """The teacher's CFG baseline: the encoding of "" (SD1.5) or all-zero embeddings (SDXL, as DMD2 does)."""
    if family == "sdxl":
        cond = encode_prompts(pipe, family, [""], resolution)
        return TextConditioning(
            torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled_prompt_embeds), cond.time_ids
        )
    return encode_prompts(pipe, family, [""], resolution)


@torch.no_grad()
def encode_images(pipe, images: list, resolution: int, batch_size: int = 8) -> torch.Tensor:
    """VAE latents (mean of the posterior, times the scaling factor) of the real images, computed once."""
    from .data import load_image_tensor

    vae = pipe.vae
    latents = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([load_image_tensor(item.path, resolution) for item in images[start : start + batch_size]])
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents.append((posterior.mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(latents)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W)."""
    images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()
