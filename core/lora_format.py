"""The file formats fewstep's trainer writes and its pipelines and nodes read: file names, the recipe file, and which
base family (SD1.5 or SDXL) a UNet or a LoRA belongs to.

Kept in the math layer's folder, free of diffusers and of the trainer, so that the pipelines (and the code a pushed
Hub repo carries) can read what the trainer wrote without importing it.
"""

from __future__ import annotations

import re
from typing import Mapping

DIFFUSERS_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers/PEFT keys; what load_lora_weights reads
KOHYA_WEIGHT_NAME = "fewstep_comfyui.safetensors"  # the same LoRA in kohya format (ComfyUI, A1111)
RECIPE_FILE = "fewstep_recipe.json"  # how a fewstep LoRA samples: {"method", "timesteps", "sampler"}
RUN_DIR_LORA = "lora"  # a run directory's exported LoRA folder
FAMILY_METADATA_KEY = "fewstep_base_family"
FAMILIES = ("sd15", "sdxl")


def unet_family(unet) -> str:
    """``"sdxl"`` for a UNet with SDXL's text/time added embedding, else ``"sd15"``."""
    return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd15"


def _shapes_and_metadata(state_dict_or_path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    if isinstance(state_dict_or_path, Mapping):
        return {key: tuple(value.shape) for key, value in state_dict_or_path.items()}, {}
    # Shapes from the header only: no need to read a 700 MB SDXL LoRA to name its family.
    from safetensors import safe_open

    with safe_open(state_dict_or_path, framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        return shapes, dict(handle.metadata() or {})


# Cross-attention key/value input width of the real models: the text encoder's hidden size (SDXL: 768 + 1280).
_CONTEXT_WIDTH_FAMILY = {768: "sd15", 2048: "sdxl"}
_SDXL_KEY = re.compile(r"lora_te2_|text_encoder_2|add_embedding|label_emb|transformer_blocks_[1-9]")
# SD1.5 has attention at its first UNet level; SDXL's first level is resnets only.
_SD15_KEY = re.compile(r"down_blocks_0_attentions|up_blocks_3_attentions|input_blocks_[12]_1_")
_CONTEXT_DOWN_KEY = re.compile(r"attn2_(processor_)?to_[kv]_lora_(A|down)_weight")


def lora_family_of_state_dict(state_dict_or_path) -> str | None:
    """Which base a UNet LoRA was trained on: ``"sd15"``, ``"sdxl"``, or ``None`` when it cannot tell.

    Evidence, strongest first: our ``fewstep_base_family`` / kohya's ``ss_base_model_version`` metadata; the
    cross-attention input width (768 SD1.5, 2048 SDXL); module names only one architecture has (SDXL's added
    embedding and stacked transformer blocks, SD1.5's attention at the first level). Works on diffusers/PEFT
    and kohya key styles.
    """
    shapes, metadata = _shapes_and_metadata(state_dict_or_path)
    if metadata.get(FAMILY_METADATA_KEY) in FAMILIES:
        return metadata[FAMILY_METADATA_KEY]
    base_version = metadata.get("ss_base_model_version", "")
    if base_version.startswith(("sdxl", "sd_v1")):
        return "sdxl" if base_version.startswith("sdxl") else "sd15"
    names = {key.replace(".", "_"): shape for key, shape in shapes.items()}
    for name, shape in names.items():
        if _CONTEXT_DOWN_KEY.search(name) and len(shape) == 2 and shape[1] in _CONTEXT_WIDTH_FAMILY:
            return _CONTEXT_WIDTH_FAMILY[shape[1]]
    if any(_SDXL_KEY.search(name) for name in names):
        return "sdxl"
    if any(_SD15_KEY.search(name) for name in names):
        return "sd15"
    return None


def canonical_header(path) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place.

    safetensors writes the header from a hash map, so the same tensors and metadata saved by two processes differ
    in key order, and so in bytes. Sorted, the same LoRA is the same file (one hash on the Hub, reproducible
    exports). The header keeps its length (compact JSON either way, padded with spaces as safetensors pads it), so
    the tensor data is not moved.
    """
    import json
    import struct

    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # never the case for safetensors' own compact header; leave such a file as it is
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))
