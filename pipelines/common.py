"""What fewstep's diffusers pipelines share: steps of ``__call__``, the UNet-to-denoiser adapter, the teacher of
Distillation++, and LoRA loading (source resolution, family check, recipe).

No ``DiffusionPipeline`` subclass lives here: diffusers' ``custom_pipeline`` loader refuses a pipeline file that
holds (or imports) more than one, so each of ``fewstep_sd.py`` and ``fewstep_sdxl.py`` defines its own class
and imports only functions and the plain mixin :class:`FewStepLoraMixin` from this module. What must stay inline
in both ``__call__`` is marked ``# [in-step: NAME]`` … ``# [/in-step: NAME]``; tests/test_pipelines_in_step.py
keeps those blocks identical.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Mapping

import torch

from diffusers.utils.torch_utils import randn_tensor

from ..core.sampling import SAMPLERS, Denoiser, cfg, sample_ddim, sample_few_step
from ..core.schedule import NoiseSchedule
from ..core.lora_format import (
    DIFFUSERS_LORA_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    RECIPE_FILE,
    RUN_DIR_LORA,
    lora_family_of_state_dict,
)

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


# ------------------------------------------------------------------------------------------ __call__ steps
def batch_size_of(prompt, prompt_embeds: torch.Tensor | None) -> int:
    """Step 2 of ``__call__``: the number of prompts, from ``prompt`` (a string or a list) or ``prompt_embeds``."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def initial_noise(pipe, batch: int, height: int, width: int, generator, latents, device, dtype) -> torch.Tensor:
    """Step 5 of ``__call__``: ``latents`` if given, else unit-variance noise (B, C, H/f, W/f), one generator per
    image when a list is given. Not scaled by ``init_noise_sigma``: the student starts at its first timestep from
    pure noise, as in DMD2's training."""
    shape = (batch, pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch} images; give one per image")
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return latents.to(device)


def run_student(sampler: str, denoise, latents, timesteps: list[int], schedule, generator, hook) -> torch.Tensor:
    """The sampling loop of ``sampler`` (fewstep.core); ``hook`` is :func:`step_hook`'s per-step function."""
    if sampler == "ddim":
        return sample_ddim(denoise, latents, timesteps, schedule, refine=hook)
    return sample_few_step(denoise, latents, timesteps, schedule, generator, refine=hook)


def uses_teacher(teacher_guidance: float, teacher_guided_steps: int) -> bool:
    return float(teacher_guidance) > 0.0 and teacher_guided_steps > 0


# ------------------------------------------------------------------------------------------ denoisers
def _cat_kwargs(first: Mapping, second: Mapping) -> dict:
    """Concatenate two UNet keyword dicts (tensors, or nested dicts of tensors) along the batch."""
    joined = {}
    for key, value in first.items():
        if isinstance(value, Mapping):
            joined[key] = _cat_kwargs(value, second[key])
        elif torch.is_tensor(value):
            joined[key] = torch.cat([value, second[key]])
        else:
            joined[key] = value
    return joined


def unet_denoiser(
    unet,
    schedule: NoiseSchedule,
    cond: Mapping,
    uncond: Mapping | None = None,
    guidance_scale: float = 1.0,
    context: Callable | None = None,
) -> Denoiser:
    """Wrap a diffusers UNet (ε-, v- or x0-prediction) as the math layer's ``denoise(x_t, t) -> x0``.

    ``cond``/``uncond`` are the UNet's keyword arguments (``encoder_hidden_states``, SDXL's ``added_cond_kwargs``)
    for a batch of B. With ``uncond`` and ``guidance_scale > 1`` the two are run as one batch of 2B and combined
    by CFG in x0 space (exact: x0 is affine in the prediction at fixed x_t). ``context`` (a context-manager
    factory) wraps every UNet call, e.g. to disable LoRA adapters for the teacher.
    """
    guided = uncond is not None and guidance_scale > 1.0
    kwargs = _cat_kwargs(uncond, cond) if guided else dict(cond)

    def call(x_t: torch.Tensor, t: int) -> torch.Tensor:
        timestep = torch.tensor(t, device=x_t.device)
        return unet(x_t, timestep, **kwargs, return_dict=False)[0]

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        x_in = torch.cat([x_t, x_t]) if guided else x_t
        with context() if context is not None else nullcontext():
            prediction = call(x_in.to(unet.dtype), t)
        x0 = schedule.to_x0(prediction.to(x_t.dtype), x_in, t)
        if not guided:
            return x0
        x0_uncond, x0_cond = x0.chunk(2)
        return cfg(x0_uncond, x0_cond, guidance_scale)

    return denoise


# ------------------------------------------------------------------------------------------ the teacher
def _peft_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]


def has_lora(unet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False)) and bool(getattr(unet, "peft_config", None))


@contextmanager
def adapters_disabled(unet):
    """Run the UNet's base weights: LoRA adapters off, then back on (restoring every ``requires_grad`` flag,
    which peft flips when it toggles adapters)."""
    grads = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
        for name, p in unet.named_parameters():
            p.requires_grad_(grads[name])


def teacher_unet_and_context(pipe) -> tuple[object, Callable | None]:
    """Where Distillation++ gets its teacher, without a second copy of the weights when it can.

    1. a ``teacher_unet`` component (a full-UNet student), else
    2. the pipeline's own UNet with its LoRA adapters disabled (a LoRA student: the base *is* the teacher).
    A fused LoRA is baked into the base weights, so it cannot be turned off: that is an error, as is having
    neither.
    """
    teacher_unet = getattr(pipe, "teacher_unet", None)
    if teacher_unet is not None:
        return teacher_unet, None
    unet = pipe.unet
    if has_lora(unet):
        fused = any(layer.merged for layer in _peft_layers(unet))
    else:  # fused, then unloaded: the LoRA lives on only in the weights
        fused = bool(getattr(pipe, "fused_loras", ()))
    if fused:
        raise ValueError(
            "teacher guidance needs the base UNet, but the LoRA is fused into its weights (pipe.fuse_lora()) and "
            "cannot be disabled; call pipe.unfuse_lora() first, or pass a teacher_unet"
        )
    if has_lora(unet):
        return unet, lambda: adapters_disabled(unet)
    raise ValueError(
        "teacher_guidance > 0 needs a teacher: load the student as a LoRA (pipe.load_lora_weights(...)) so the "
        "base UNet with the LoRA disabled is the teacher, or pass teacher_unet=<the base UNet> to the pipeline"
    )


# ------------------------------------------------------------------------------------------ LoRA sources
def looks_like_path(source: str) -> bool:
    """A local path (existing or not) rather than a Hub repo id ``owner/name``."""
    if Path(source).expanduser().exists():
        return True
    parts = source.split("/")
    hub_id = len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source
    return not hub_id or source.endswith(".safetensors")


def lora_file_of(source: str | Path) -> Path:
    """The LoRA file for a fewstep run directory, its ``lora/`` folder, or a ``.safetensors`` file.

    In a folder the diffusers-format ``pytorch_lora_weights.safetensors`` wins over the kohya file, then a single
    ``.safetensors`` file is taken as it is.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"LoRA {str(source)!r} does not exist; give a fewstep run directory, its lora/ folder or a .safetensors file"
        )
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"LoRA file {str(source)!r} is not a .safetensors file")
        return path
    for folder in (path / RUN_DIR_LORA, path):
        for name in (DIFFUSERS_LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if (folder / name).is_file():
                return folder / name
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    found = f"{len(candidates)} .safetensors files" if candidates else "no .safetensors file"
    raise ValueError(
        f"LoRA folder {str(source)!r} has {found}; expected lora/{DIFFUSERS_LORA_WEIGHT_NAME} (a fewstep run) "
        f"or a single LoRA file"
    )


def check_lora_family(state_dict_or_path, family: str, label: str) -> None:
    """Refuse a LoRA made for the other base model (SD1.5 vs SDXL) before diffusers fails on tensor shapes."""
    found = lora_family_of_state_dict(state_dict_or_path)
    if found is not None and found != family:
        raise ValueError(
            f"LoRA {label!r} is for {FAMILY_NAMES[found]} but this pipeline is {FAMILY_NAMES[family]}; "
            f"load it into a {FAMILY_NAMES[found]} base model"
        )


def resolve_lora_source(source, family: str, kwargs: dict) -> tuple[object, dict]:
    """Arguments for diffusers' ``load_lora_weights``: a local source becomes (folder, weight_name) — a fewstep
    run folder resolves to its LoRA file — and its family is checked against the pipeline's. Hub ids pass
    through to diffusers unchanged."""
    if isinstance(source, Mapping):
        check_lora_family(source, family, "<state dict>")
        return source, kwargs
    text = str(source)
    if not looks_like_path(text):
        return source, kwargs
    if kwargs.get("weight_name") is not None:
        path = Path(text).expanduser() / kwargs["weight_name"]
        if not path.is_file():
            raise ValueError(f"LoRA file {str(path)!r} does not exist")
    else:
        path = lora_file_of(text)
    check_lora_family(path, family, text)
    return str(path.parent), {**kwargs, "weight_name": path.name}


def read_lora_recipe(source, kwargs: Mapping) -> dict | None:
    """The ``fewstep_recipe.json`` beside a LoRA that :func:`resolve_lora_source` resolved: a local folder's, or a
    Hub repo's (fetched like the LoRA itself, honouring ``HF_HUB_OFFLINE``); None when there is none."""
    import json

    if isinstance(source, Mapping):
        return None
    text = str(source)
    if looks_like_path(text):
        path = Path(text).expanduser() / RECIPE_FILE
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download

        options = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        try:
            path = Path(hf_hub_download(text, RECIPE_FILE, **options))
        except Exception:  # no recipe in the repo, offline, …: the LoRA still loads, sampled at the given steps
            return None
    try:
        recipe = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or remove it") from None
    if recipe.get("sampler", "few_step") not in SAMPLERS or not recipe.get("timesteps"):
        raise ValueError(f"{path} is not a fewstep sampling recipe (needs timesteps and a sampler in {SAMPLERS})")
    return recipe


class FewStepLoraMixin:
    """LoRA loading for a fewstep pipeline class (listed before its diffusers base, which does the loading).

    A plain mixin, not a ``DiffusionPipeline``: each pipeline file still holds exactly one pipeline class.
    """

    family: str  # "sd15" or "sdxl": a LoRA made for the other family is refused

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' ``load_lora_weights``, also given a fewstep run directory (``RUN_DIR/lora/...``) or a kohya
        file (DMD2's published SDXL LoRAs are kohya files); a LoRA made for the other model family is refused with
        a one-line error. A fewstep LoRA's ``fewstep_recipe.json`` (its timesteps and sampler) becomes the default
        of ``__call__``."""
        source, kwargs = resolve_lora_source(pretrained_model_name_or_path_or_dict, self.family, kwargs)
        recipe = read_lora_recipe(source, kwargs)  # a broken recipe is refused before anything is loaded
        super().load_lora_weights(source, adapter_name=adapter_name, **kwargs)
        if recipe is not None:  # a style LoRA loaded beside the student has none and keeps the student's
            self.fewstep_recipe = recipe

    def unload_lora_weights(self, *args, **kwargs):
        super().unload_lora_weights(*args, **kwargs)
        self.fewstep_recipe = None


# ------------------------------------------------------------------------------------------ the loop
def step_hook(pipe, refine, callback_on_step_end, tensor_inputs, tensors: Mapping, progress_bar):
    """The sampler's per-step hook: Distillation++ refinement, then ``callback_on_step_end``, then progress.

    The callback sees ``latents`` = the step's x0 estimate (what the next step re-noises, and after the last step
    the result); a ``latents`` it returns replaces that estimate. Other tensors are passed read-only.
    """

    def on_step(x0: torch.Tensor, i: int, t: int, x_t: torch.Tensor) -> torch.Tensor:
        if refine is not None:
            x0 = refine(x0, i, t, x_t)
        if callback_on_step_end is not None:
            kwargs = {name: x0 if name == "latents" else tensors[name] for name in tensor_inputs}
            outputs = callback_on_step_end(pipe, i, t, kwargs) or {}
            x0 = outputs.get("latents", x0)
        progress_bar.update()
        return x0

    return on_step
