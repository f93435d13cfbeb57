"""Single-file checkpoints as teachers: the ``model.safetensors`` files A1111 and ComfyUI users hold.

What a file is comes from its safetensors header alone (key names, no tensors read): an SD1.x/2.x or SDXL
checkpoint is loaded with diffusers' single-file loader; a LoRA, a VAE, a UNet-only file, another model family
or a pickle gets a one-line error naming what it looks like. diffusers needs the components' configs (and
tokenizers) besides the weights: ``--teacher-config DIR_OR_ID`` names a diffusers folder or Hub id of the same
architecture; without it diffusers fetches them from the Hub, and when that fails the error says to pass it.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import TeacherError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
FAMILY_NAMES = {"sd15": "SD1.x/2.x", "sdxl": "SDXL"}
PIPELINE_FAMILY = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}
# Key prefixes of other model families, to say what a file is when it is not SD1.5/SDXL.
OTHER_FAMILIES = (
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
    ("double_blocks.", "a Flux transformer"),
    ("joint_blocks.", "a Stable Diffusion 3 transformer"),
    ("model.diffusion_model.blocks.", "a video or DiT checkpoint"),
)


def is_checkpoint_file_name(name: str) -> bool:
    """``--teacher`` names a single file (by suffix) rather than a folder or Hub id."""
    return Path(name).suffix.lower() in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a bad header
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TeacherError(f"teacher {path.name} is not a readable safetensors file ({reason})") from None


def checkpoint_family(path: str | Path) -> str:
    """``"sd15"`` or ``"sdxl"`` for a full single-file checkpoint; a one-line :class:`TeacherError` otherwise."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TeacherError(
            f"teacher {path.name} is a pickle checkpoint ({path.suffix}), which can run code when loaded; fewstep "
            "loads only .safetensors: convert it (e.g. ComfyUI's CheckpointSave, or diffusers' single-file loader + "
            "save_pretrained) and pass that"
        )
    if not path.is_file():
        raise TeacherError(f"teacher file {path} does not exist; give a .safetensors checkpoint, a folder or a Hub id")
    keys = _keys(path)
    lora_keys = [k for k in keys if any(m in k for m in ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1"))]
    if lora_keys:
        raise TeacherError(
            f"teacher {path.name} is a LoRA ({len(lora_keys)} LoRA tensors), not a checkpoint: pass the base model as "
            f"--teacher and this file as --teacher-lora {path.name}"
        )
    for prefix, what in OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            raise TeacherError(f"teacher {path.name} looks like {what}; fewstep distils SD1.5- and SDXL-family models")
    has_unet = any(k.startswith("model.diffusion_model.") for k in keys)
    has_vae = any(k.startswith(("first_stage_model.", "vae.")) for k in keys)
    vae_only = keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys)
    if vae_only or (has_vae and not has_unet):
        raise TeacherError(
            f"teacher {path.name} is a VAE, not a checkpoint: give the full model checkpoint (UNet + VAE + text encoder)"
        )
    if not has_unet:
        raise TeacherError(f"teacher {path.name} is not a Stable Diffusion checkpoint (no model.diffusion_model. weights)")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise TeacherError(f"teacher {path.name} is an SDXL refiner checkpoint; distil the SDXL base model")
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15"
    raise TeacherError(
        f"teacher {path.name} holds a UNet but no text encoder; give a full checkpoint, or a diffusers folder"
    )


def _check_config(config: str, family: str, checkpoint: Path) -> None:
    """A local ``--teacher-config`` folder must exist, be a diffusers pipeline folder, and be of the same family."""
    folder = Path(config).expanduser()
    looks_local = folder.exists() or config.startswith((".", "/", "~")) or config.count("/") > 1
    if not looks_local:
        return  # a Hub id: diffusers checks it
    if not (folder / "model_index.json").is_file():
        raise TeacherError(
            f"--teacher-config {config} is not a diffusers pipeline folder (no model_index.json); give the folder "
            "or Hub id of a model of the same architecture"
        )
    class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    config_family = PIPELINE_FAMILY.get(class_name)
    if config_family is not None and config_family != family:
        raise TeacherError(
            f"--teacher-config {config} is an {FAMILY_NAMES[config_family]} pipeline but {checkpoint.name} is an "
            f"{FAMILY_NAMES[family]} checkpoint; give an {FAMILY_NAMES[family]} config"
        )


def load_single_file_teacher(path: str | Path, config: str | None = None):
    """``(pipe, family)`` from a single-file checkpoint, with component configs from ``config`` or the Hub."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(path).expanduser()
    family = checkpoint_family(path)
    if config:
        _check_config(str(config), family, path)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {}
    if config:  # a local folder (with ~ expanded) or a Hub id
        kwargs["config"] = str(Path(config).expanduser()) if Path(config).expanduser().exists() else config
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as error:  # diffusers/huggingface_hub raise OSError, ValueError, HTTP and offline errors here
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if not config:
            raise TeacherError(
                f"teacher {path.name} is an {FAMILY_NAMES[family]} checkpoint, but its component configs could not be "
                f"fetched from the Hub ({reason}); pass --teacher-config DIR_OR_ID (a diffusers folder or Hub id of "
                "the same architecture)"
            ) from None
        raise TeacherError(f"could not load teacher {path.name} with --teacher-config {config}: {reason}") from None
    return pipe, family
