"""Loading a Stable Diffusion teacher (Hub id, local folder or single-file checkpoint, optionally with style LoRAs
fused in), its family, and caching its text/image encodings.

After :func:`encode_prompts` and :func:`encode_images` the text encoders and the VAE encoder can be dropped:
training needs only the UNet (and the VAE decoder for validation images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.schedule import NoiseSchedule
from ..loop.networks import TextConditioning
from . import TeacherError

# Teachers that fewstep builds itself (the digits teacher) record how, in this file beside their weights.
BUILD_RECORD_FILE = "fewstep_teacher.json"

FAMILIES = ("sd15", "sdxl")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1 or "\\" in name


def load_teacher(
    name: str, model_type: str | None = None, teacher_config: str | None = None, style_loras: list[str] | None = None
):
    """Load the teacher and return ``(pipe, family)``; family is detected or overridden.

    ``name`` is a diffusers folder, a Hub id, or a single-file checkpoint (``.safetensors``, with its component
    configs from ``teacher_config``: :mod:`.single_file`). ``style_loras`` (``FILE[:SCALE]``) are fused into the
    teacher's weights (:mod:`.style_lora`).
    """
    from .single_file import is_checkpoint_file_name, load_single_file_teacher
    from .style_lora import fuse_style_loras, parse_style_lora

    if model_type is not None and model_type not in FAMILIES:
        raise TeacherError(f"unknown model type {model_type!r}; use one of {', '.join(FAMILIES)}")
    if isinstance(style_loras, str):  # one FILE[:SCALE] from a YAML config
        style_loras = [style_loras]
    styles = [parse_style_lora(spec) for spec in style_loras or []]  # cheap checks before the expensive load
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # loading bars would bury a one-line error; training has its own
    transformers_logging.disable_progress_bar()
    if is_checkpoint_file_name(name):
        pipe, detected = load_single_file_teacher(name, teacher_config)
    elif teacher_config:
        raise TeacherError(
            f"--teacher-config is for single-file checkpoints, but the teacher {name!r} is a folder or Hub id; drop it"
        )
    else:
        pipe, detected = _load_pipeline(name)
    if model_type is not None and model_type != detected:
        names = {"sd15": "SD1.5", "sdxl": "SDXL"}
        raise TeacherError(
            f"--model-type {model_type} does not match the teacher's weights, which are {names[detected]} "
            f"({detected}); drop --model-type or give an {names[model_type]} teacher"
        )
    family = model_type or detected
    fuse_style_loras(pipe, family, styles)
    return pipe, family


def _load_pipeline(name: str):
    """A diffusers pipeline folder or Hub id, and its detected family."""
    from diffusers import DiffusionPipeline

    path = Path(name).expanduser()
    if path.is_file():
        raise TeacherError(
            f"teacher {name} is a file; give the diffusers pipeline folder that holds model_index.json, a Hub id "
            "or a single-file .safetensors checkpoint"
        )
    if _looks_like_path(name) and not path.is_dir():
        raise TeacherError(f"teacher folder {name} does not exist; give a diffusers pipeline folder or a Hub id")
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise TeacherError(
            f"teacher folder {name} has no model_index.json; save the teacher with pipeline.save_pretrained(...)"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.is_dir() else name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeacherError(f"could not load teacher {name!r}: {first_line}") from None
    detected = detect_family(pipe)
    if detected is None:
        raise TeacherError(f"teacher {name!r} ({type(pipe).__name__}) is not a Stable Diffusion 1.x/2.x or SDXL pipeline")
    return pipe, detected


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


# Training far above the UNet's native size costs memory with the square of the side, and the teacher was never
# trained there: refused above this many times the native side (SD1.5: 1024 px, SDXL: 2048 px).
MAX_RESOLUTION_FACTOR = 2


def check_resolution(pipe, resolution: int) -> None:
    """A resolution the VAE can take, at most :data:`MAX_RESOLUTION_FACTOR` × the teacher's native size."""
    factor = vae_scale_factor(pipe)
    if resolution <= 0 or resolution % factor:
        raise TeacherError(
            f"resolution {resolution} is not divisible by the VAE's scale factor {factor}; "
            f"use a multiple of {factor} such as {max(factor, resolution // factor * factor)}"
        )
    native = default_resolution(pipe)
    if resolution > MAX_RESOLUTION_FACTOR * native:
        raise TeacherError(
            f"--resolution {resolution} is {resolution / native:g}× the teacher's native {native} px: activations "
            f"would need about {(resolution / native) ** 2:.0f}× the memory of a native-size step, at a size the "
            f"teacher never saw; use at most {MAX_RESOLUTION_FACTOR * native} px (the default is {native})"
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


@dataclass
class LatentPosteriors:
    """The VAE posteriors N(mean, std²) of the real images, times the scaling factor (computed once, on the CPU).

    Real latents are drawn from them fresh each time (:meth:`sample`), as a Stable Diffusion teacher was trained —
    the digits teacher and the DMD2 reference alike — not as posterior means, which are smoother than the latents
    the teacher (and so the fake score and the GAN) learned to denoise.
    """

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def means(self, index: torch.Tensor) -> torch.Tensor:
        return self.mean[index]

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, std = self.mean[index], self.std[index]
        return mean + std * torch.randn(mean.shape, generator=generator)


@torch.no_grad()
def vae_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior N(mean, std²) of ``pixels`` (B, 3, H, W in [-1, 1]), times the scaling factor: the real
    latents a Stable Diffusion teacher was trained on. fp32, on the CPU."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return (posterior.mean * scale).float().cpu(), (posterior.std * scale).float().cpu()


def encode_images(pipe, images: list, resolution: int, batch_size: int = 8) -> LatentPosteriors:
    """The VAE posteriors of captioned image files, in memory (training reads them from the encoding cache, which
    :func:`vae_posterior` fills batch by batch)."""
    from ..data.prompts import load_image_tensor

    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([load_image_tensor(item.path, resolution) for item in images[start : start + batch_size]])
        mean, std = vae_posterior(pipe.vae, pixels)
        means.append(mean)
        stds.append(std)
    return LatentPosteriors(torch.cat(means), torch.cat(stds))


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W)."""
    images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()
