"""The teacher reduced to what training needs: its conditionings encoded once into the encoding cache, then only the
UNet and the VAE decoder.

The prompts' text conditioning and the real images' VAE posteriors (with their captions' conditioning) are
encoded into the on-disk encoding cache (:mod:`..data.encoding_cache`) once per teacher, resolution and data: a
second run or a ``--resume`` on the same data encodes nothing, and with N processes each encodes its share. The run
then reads batches from the cache by random access (:class:`CachedConditioning`, :class:`CachedLatents`), so its
memory does not grow with the dataset. The text encoders (SDXL's two) and the VAE encoder are dropped after
encoding, so that only the base UNet (which carries the adapters) and the decoder of the validation grids stay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..data.encoding_cache import BuildReport, CachedEntry, EncodingCache, cache_dir_default, module_digest
from ..data.sources import Source
from .distributed import ProcessGroup
from .networks import TextConditioning
from .precision import WEIGHT_DTYPES

TEXT_BATCH, IMAGE_BATCH = 32, 8  # items per encoder call (the DMD2 reference encodes its LMDB offline alike)
TEXT_FIELDS = ("prompt_embeds", "pooled_prompt_embeds")


class CachedConditioning:
    """Text conditioning read from a cache entry by rows, as :class:`TextConditioning` (fp32, on the CPU)."""

    def __init__(self, entry: CachedEntry, family: str, resolution: int):
        self.entry, self.family, self.resolution = entry, family, resolution
        self.fields = [name for name in TEXT_FIELDS if name in entry.names]

    def __len__(self) -> int:
        return len(self.entry)

    def select(self, index) -> TextConditioning:
        rows = self.entry.read(self.fields, index)
        embeds = rows["prompt_embeds"].float()
        if self.family != "sdxl":
            return TextConditioning(embeds)
        r = self.resolution  # SDXL's micro-conditioning: original size, crop (0, 0), target size
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=embeds.dtype).expand(embeds.shape[0], 6).clone()
        return TextConditioning(embeds, rows["pooled_prompt_embeds"].float(), time_ids)


class OnTheFlyConditioning:
    """Text conditioning encoded per batch by the teacher's text encoders, kept loaded (``--text-encoding
    on-the-fly``, as the DMD2 reference does): no cache on disk, at the cost of the encoders' memory and one
    encoder pass per batch."""

    def __init__(self, pipe, family: str, resolution: int, prompts: list[str]):
        self.pipe, self.family, self.resolution, self.prompts = pipe, family, resolution, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index) -> TextConditioning:
        from ..teacher import loading as teachers

        index = index.tolist() if torch.is_tensor(index) else list(index)
        texts = [self.prompts[i] for i in index]
        cond = teachers.encode_prompts(self.pipe, self.family, texts, self.resolution, max(1, len(texts)))
        return cond.map(lambda x: x.float())


class CachedLatents:
    """The real images' VAE posteriors N(mean, std²) (times the scaling factor), read from the cache by rows.

    Real latents are drawn fresh each time (:meth:`sample`), as a Stable Diffusion teacher was trained (the digits
    teacher and the DMD2 reference alike), not as posterior means (:meth:`means`), which are smoother than the
    latents the teacher, and so the fake score and the GAN, learned to denoise.
    """

    def __init__(self, entry: CachedEntry):
        self.entry = entry

    def __len__(self) -> int:
        return len(self.entry)

    def means(self, index) -> torch.Tensor:
        return self.entry.read(["mean"], index)["mean"].float()

    def sample(self, index, generator) -> torch.Tensor:
        """Fresh latents of rows ``index``; ``generator`` is a torch.Generator or ``shape → noise`` (the trainer's
        slice of its global batch's draw)."""
        rows = self.entry.read(["mean", "std"], index)
        mean, std = rows["mean"].float(), rows["std"].float()
        noise = generator(mean.shape) if callable(generator) else torch.randn(mean.shape, generator=generator)
        return mean + std * noise


@dataclass
class EncodedTeacher:
    """What stays of the teacher pipeline once its encoders have run."""

    unet: torch.nn.Module  # on the device, in the --mixed-precision weight dtype
    vae: torch.nn.Module  # the decoder only
    schedule: Any  # the teacher's NoiseSchedule, on the device
    prompt_cond: CachedConditioning | OnTheFlyConditioning  # every training prompt
    uncond: TextConditioning  # the empty prompt, for CFG
    real_latents: CachedLatents | None  # the real images' posteriors, or None without the GAN
    real_cond: CachedConditioning | None  # their captions
    validation_cond: TextConditioning  # the first --num-validation-prompts prompts
    latent_shape: tuple[int, ...]  # (C, H/f, W/f)
    reports: list[BuildReport] = dataclasses.field(default_factory=list)  # what the cache held and what was encoded


def captions_of(images: Source) -> Source:
    """The captions of an image source as a prompt source (a run without the GAN needs no image decoded)."""
    return dataclasses.replace(images, kind="prompts", description=f"captions of {images.description}",
                               identity={"captions of": images.identity})  # fmt: skip


def teacher_caches(pipe, family: str, data, use_gan: bool, config) -> tuple[EncodingCache | None, EncodingCache | None]:
    """The cache entries the run needs, keyed by what determines them: (prompts, images). The prompts are the
    captions of the images when no prompt source is given (then only the images entry, with the GAN)."""
    from ..teacher import loading as teachers

    root = config.cache_dir or cache_dir_default()
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    text = {"version": 1, "family": family, "text_encoders": module_digest(*encoders),
            "tokenizers": [[type(t).__name__, len(t), t.model_max_length] for t in tokenizers]}  # fmt: skip
    width = pipe.text_encoder.config.hidden_size + (pipe.text_encoder_2.config.hidden_size if family == "sdxl" else 0)
    text_bytes = 2 * tokenizers[0].model_max_length * width + (2 * 1280 if family == "sdxl" else 0)
    prompts_source = data.prompts
    if prompts_source is None and not use_gan:
        prompts_source = captions_of(data.images)
    prompts = images = None
    if prompts_source is not None and getattr(config, "text_encoding", "cache") == "cache":
        spec = {**text, "kind": "prompts", "data": prompts_source.identity}
        prompts = EncodingCache(root, spec, prompts_source, text_bytes, TEXT_BATCH)
    if use_gan:
        vae = pipe.vae
        factor = teachers.vae_scale_factor_of(vae)
        latent_bytes = 2 * 2 * vae.config.latent_channels * (config.resolution // factor) ** 2
        spec = {**text, "kind": "images", "data": data.images.identity, "resolution": config.resolution,
                "vae": module_digest(vae.encoder, *([vae.quant_conv] if vae.quant_conv is not None else [])),
                "scaling_factor": vae.config.scaling_factor}  # fmt: skip
        images = EncodingCache(root, spec, data.images, latent_bytes + text_bytes, IMAGE_BATCH, config.max_bad_fraction)
    return prompts, images


def prompt_encoder(pipe, family: str, resolution: int):
    """(items, _) → the items' text conditioning, fp16 on the CPU (what the prompts entry stores)."""
    from ..teacher import loading as teachers

    def encode(items, _images=None) -> dict[str, torch.Tensor]:
        cond = teachers.encode_prompts(pipe, family, [item.caption for item in items], resolution, len(items))
        rows = {"prompt_embeds": cond.prompt_embeds.half()}
        if cond.pooled_prompt_embeds is not None:
            rows["pooled_prompt_embeds"] = cond.pooled_prompt_embeds.half()
        return rows

    return encode


def image_encoder(pipe, family: str, resolution: int):
    """(items, images) → the images' VAE posterior mean and std (× the scaling factor) and their captions'
    conditioning, fp16 on the CPU (what the images entry stores)."""
    from ..data.images_io import image_tensor
    from ..teacher.loading import vae_posterior

    text = prompt_encoder(pipe, family, resolution)

    def encode(items, images) -> dict[str, torch.Tensor]:
        mean, std = vae_posterior(pipe.vae, torch.stack([image_tensor(image, resolution) for image in images]))
        return {"mean": mean.half(), "std": std.half(), **text(items)}

    return encode


def build_caches(pipe, family: str, data, use_gan: bool, config, processes: ProcessGroup,
                 log: Callable[[str], None] = print) -> tuple[EncodingCache | None, EncodingCache | None, list]:  # fmt: skip
    """Encode what the cache lacks (each process its share); the entries and their reports."""
    prompts, images = teacher_caches(pipe, family, data, use_gan, config)
    reports = []
    for entry, encoder in ((images, image_encoder), (prompts, prompt_encoder)):
        if entry is None:
            continue
        report = entry.build(encoder(pipe, family, config.resolution), processes.index, processes.world,
                             processes.wait_for_everyone)  # fmt: skip
        if processes.index == 0:
            log(report.line())
        reports.append(report)
    return prompts, images, reports


def encode_teacher(pipe, family: str, data, use_gan: bool, config, device: torch.device,
                   processes: ProcessGroup | None = None) -> EncodedTeacher:  # fmt: skip
    """Encode (or find cached) the prompts and, with the GAN, the real images and their captions; keep the UNet
    and the decoder."""
    from ..teacher import loading as teachers

    resolution = config.resolution
    pipe.to(device)
    schedule = teachers.teacher_schedule(pipe).to(device)
    uncond = teachers.unconditional(pipe, family, resolution)
    prompts, images, reports = build_caches(pipe, family, data, use_gan, config, processes or ProcessGroup())
    real_cond = CachedConditioning(images.open(), family, resolution) if images is not None else None
    prompt_cond = CachedConditioning(prompts.open(), family, resolution) if prompts is not None else real_cond
    on_the_fly = config.text_encoding == "on-the-fly"
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    if on_the_fly:
        prompt_cond = OnTheFlyConditioning(pipe, family, resolution, data.prompts.texts)
    real_latents = CachedLatents(real_cond.entry) if real_cond is not None else None
    validation_cond = prompt_cond.select(range(min(config.num_validation_prompts, len(prompt_cond))))
    unet, vae = pipe.unet, pipe.vae
    if on_the_fly:  # the encoders stay, in the weight dtype (bf16 on a GPU: SDXL's two are 1.6 GB)
        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if encoder is not None and encoder.dtype != weight_dtype:
                encoder.to(dtype=weight_dtype)
    else:
        pipe.text_encoder = pipe.tokenizer = None
        if family == "sdxl":
            pipe.text_encoder_2 = pipe.tokenizer_2 = None
    vae.encoder = None  # only the decoder is needed, for validation images
    unet.to(device)
    if unet.dtype != weight_dtype:  # diffusers warns on any dtype cast, even a no-op one (the full-precision runs)
        unet.to(dtype=weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    latent_size = resolution // teachers.vae_scale_factor_of(vae)
    latent_shape = (unet.config.in_channels, latent_size, latent_size)
    return EncodedTeacher(unet, vae, schedule, prompt_cond, uncond, real_latents, real_cond, validation_cond,
                          latent_shape, reports)  # fmt: skip
