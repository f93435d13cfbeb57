"""Write and read the LoRA files users load in diffusers, ComfyUI and A1111.

Two formats, because no single file works everywhere (see ``shared/design/diffusers-peft-hub.md``):

* diffusers/PEFT (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``): alpha is not in
  the tensors, so the adapter's ``LoraConfig`` goes into the safetensors metadata the way diffusers'
  ``save_lora_weights(..., unet_lora_adapter_metadata=...)`` writes it; without it diffusers assumes alpha = rank.
* kohya (``lora_unet_<module with '.'->'_'>.lora_down/lora_up/alpha``): what ComfyUI and A1111 load. ComfyUI
  silently skips PEFT-named attention keys, and diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank,
  so this module writes the real per-module alpha itself.

Both files carry ``fewstep_base_family`` in their metadata so a LoRA can be matched to its base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...core.lora_format import (  # noqa: F401  (re-exported: the trainer's LoRA files are in this format)
    DIFFUSERS_LORA_WEIGHT_NAME,
    FAMILIES,
    FAMILY_METADATA_KEY,
    KOHYA_WEIGHT_NAME,
    RECIPE_FILE,
    canonical_header,
    lora_family_of_state_dict,
    unet_family,
)

# kohya's own spelling of the base model, read by its tools and by LoRA browsers.
_KOHYA_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}

# Parts of diffusers UNet module paths that contain '_', longest first. kohya names replace every '.' with '_',
# so turning a name back into a module path needs to know which underscores were there to begin with.
_UNDERSCORED_PARTS = sorted(
    (
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "time_emb_proj",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "add_time_proj", "time_proj",
        "encoder_hid_proj", "class_embedding",
        # sgm/LDM names, as kohya's SDXL trainer writes them.
        "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "time_embed", "label_emb",
    ),
    key=lambda part: -part.count("_"),
)  # fmt: skip


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family


def _json_ready(value):
    """Sets -> sorted lists, recursively: LoraConfig holds sets (target_modules) that JSON cannot encode."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _adapter_state_dict(unet, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed ``<module path>.lora_A.weight`` (PEFT-native; the adapter name stripped)."""
    from peft import get_peft_model_state_dict

    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in state_dict.items()}


def _rewrite_metadata(path: Path, extra: Mapping[str, str]) -> None:
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    save_file(load_file(path), path, metadata={**metadata, **extra})
    canonical_header(path)


def save_diffusers_lora(unet, adapter_name: str, directory: str | Path, family: str | None = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(directory)``.

    diffusers' own ``save_lora_weights`` writes the file, with the adapter's ``LoraConfig`` in the metadata so
    diffusers rebuilds the same config on load (alpha, rank_pattern, alpha_pattern exactly). The keys are
    PEFT-native: mixing key styles makes diffusers drop adapters on reload (diffusers issue #14548).
    ``family`` ("sd15" or "sdxl") defaults to the one ``unet`` is shaped like.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = _check_family(family or unet_family(unet))
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    lora_layers = _adapter_state_dict(unet, adapter_name)
    directory = Path(directory)
    pipeline_class.save_lora_weights(
        directory,
        unet_lora_layers=lora_layers,
        unet_lora_adapter_metadata=_json_ready(unet.peft_config[adapter_name].to_dict()),
    )
    path = directory / DIFFUSERS_LORA_WEIGHT_NAME
    # diffusers writes its metadata only through its default save function (a custom one drops it): add ours after.
    _rewrite_metadata(path, {FAMILY_METADATA_KEY: family})
    return path


def _module_alpha(unet, module_path: str, adapter_name: str) -> tuple[int, float]:
    """(rank, alpha) of one LoRA layer as PEFT applies it: delta W = scaling * B @ A with scaling = alpha / rank.

    Read from the layer itself, so per-module ``rank_pattern``/``alpha_pattern`` are honoured; with rsLoRA the
    returned alpha is the one that gives the same scaling under kohya's alpha / rank rule.
    """
    layer = unet.get_submodule(module_path)
    rank = layer.r[adapter_name]
    if layer.use_rslora.get(adapter_name, False):
        return rank, float(layer.scaling[adapter_name] * rank)
    return rank, float(layer.lora_alpha[adapter_name])


def save_kohya_lora(
    unet, adapter_name: str, path: str | Path, alpha: float | None = None, family: str | None = None
) -> Path:
    """Write a kohya-format LoRA (ComfyUI, A1111): ``lora_unet_<module>.lora_down/.lora_up/.alpha``.

    ``alpha=None`` writes each module's real alpha. A number writes that alpha everywhere and rescales
    ``lora_up`` by real_alpha / alpha so the file still applies exactly the trained update.
    """
    family = _check_family(family or unet_family(unet))
    state_dict = _adapter_state_dict(unet, adapter_name)
    unsupported = [key for key in state_dict if not key.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unsupported:
        raise ValueError(f"kohya format holds plain LoRA only (A, B, alpha); cannot write {unsupported[0]!r}")
    tensors: dict[str, torch.Tensor] = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_path = key.removesuffix(".lora_A.weight")
        up = state_dict[f"{module_path}.lora_B.weight"]
        rank, module_alpha = _module_alpha(unet, module_path, adapter_name)
        written_alpha = module_alpha if alpha is None else float(alpha)
        name = "lora_unet_" + module_path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up if alpha is None else (up * (module_alpha / written_alpha)).to(up.dtype)
        tensors[f"{name}.alpha"] = torch.tensor(written_alpha, dtype=torch.float32)
    config = unet.peft_config[adapter_name]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(float(config.lora_alpha if alpha is None else alpha)),
        "ss_base_model_version": _KOHYA_BASE_MODEL_VERSION[family],
        FAMILY_METADATA_KEY: family,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    canonical_header(path)
    return path


def kohya_name_to_module_path(name: str) -> str:
    """``lora_unet_down_blocks_1_attentions_0_proj_in`` -> ``down_blocks.1.attentions.0.proj_in``."""
    rest = name.removeprefix("lora_unet_")
    parts = []
    while rest:
        part = next((p for p in _UNDERSCORED_PARTS if rest == p or rest.startswith(p + "_")), rest.split("_")[0])
        parts.append(part)
        rest = rest[len(part) + 1 :]
    return ".".join(parts)


def load_kohya_lora(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Read a kohya UNet LoRA as ``{module path: (lora_down, lora_up, alpha)}``.

    A module without an ``.alpha`` entry gets alpha = rank (scale 1), the rule ComfyUI and A1111 apply.
    """
    tensors = load_file(path)
    foreign = [key for key in tensors if not key.startswith("lora_unet_")]
    if foreign:
        raise ValueError(f"only UNet LoRAs (keys 'lora_unet_...') are supported; {path} has {foreign[0]!r}")
    modules = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        up = tensors[f"{name}.lora_up.weight"]
        alpha_tensor = tensors.get(f"{name}.alpha")
        alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(down.shape[0])
        modules[kohya_name_to_module_path(name)] = (down, up, alpha)
    return modules


def kohya_lora_to_peft(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A kohya file as a PEFT-style state dict (``<module>.lora_A.weight``/``.lora_B.weight``) and per-module alphas."""
    state_dict, alphas = {}, {}
    for module_path, (down, up, alpha) in load_kohya_lora(path).items():
        state_dict[f"{module_path}.lora_A.weight"] = down
        state_dict[f"{module_path}.lora_B.weight"] = up
        alphas[module_path] = alpha
    return state_dict, alphas
