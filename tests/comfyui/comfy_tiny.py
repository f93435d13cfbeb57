"""Tiny SD1.5- and SDXL-shaped models with the same weights in diffusers and ComfyUI (import after ComfyUI is set up).

A diffusers ``UNet2DConditionModel`` is converted to ComfyUI's ldm layout with ComfyUI's own key map
(``comfy.utils.unet_to_diffusers``) and loaded strictly into a ComfyUI ``BaseModel``, so both frameworks run
identical weights. The SD1.5 UNet is fewstep's tiny pipeline UNet. ComfyUI's SDXL embeds its six size/crop
numbers in 256 dims each, so the SDXL UNet here has SDXL's add-embedding layout (pooled text embedding + 6·256)
around the same tiny body, with a 32-wide pooled embedding (ComfyUI's CLIP-G pools at its own width).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
import comfy.utils
import torch

from fewstep.training.teacher.tiny_models import TINY_IMAGE_SIZE, TINY_LATENT_SIZE, build_tiny_sd15_pipeline

LATENT_SHAPE = (1, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE)
SD15_CONTEXT, SDXL_CONTEXT, SDXL_POOLED = 32, 64, 32


@dataclass
class TinyFamily:
    """One tiny model in both frameworks, with matching conditioning."""

    family: str  # "sd15" or "sdxl"
    pipe: object  # a diffusers StableDiffusion(XL)Pipeline holding ``unet``
    model: object  # the ComfyUI ModelPatcher of the same weights
    positive: list  # ComfyUI CONDITIONING
    negative: list
    pipe_kwargs: dict  # the same conditioning for the diffusers pipeline (prompt_embeds, ...)
    negative_pipe_kwargs: dict
    # Set by the ``student`` fixture: the LoRA file, the ComfyUI model through LoraLoaderModelOnly, its load log.
    lora_file: Path | None = None
    student: object = None
    lora_log: list[str] | None = None


def _comfy_unet_config(unet) -> dict:
    """ComfyUI's UNetModel config for a diffusers UNet built like the tiny ones (attention on the last level only)."""
    config = unet.config
    depth = config.transformer_layers_per_block
    depth = depth[-1] if isinstance(depth, (list, tuple)) else depth
    levels = len(config.block_out_channels)
    heads = config.attention_head_dim
    outputs_per_level = config.layers_per_block + 1
    return {
        "image_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.block_out_channels[0],
        "num_res_blocks": [config.layers_per_block] * levels,
        "channel_mult": [c // config.block_out_channels[0] for c in config.block_out_channels],
        "transformer_depth": [0] * (levels - 1) + [depth],
        "transformer_depth_output": [0] * ((levels - 1) * outputs_per_level) + [depth] * outputs_per_level,
        "transformer_depth_middle": depth,
        "use_linear_in_transformer": config.use_linear_projection,
        "context_dim": config.cross_attention_dim,
        "num_heads": heads[-1] if isinstance(heads, (list, tuple)) else heads,
        "num_head_channels": -1,
        "adm_in_channels": config.projection_class_embeddings_input_dim,
        "num_classes": "sequential" if config.projection_class_embeddings_input_dim else None,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }  # fmt: skip


def comfy_model_from_diffusers(unet, family: str):
    """A ComfyUI ModelPatcher holding exactly ``unet``'s weights (strict load)."""
    unet_config = _comfy_unet_config(unet)
    model_class = comfy.supported_models.SDXL if family == "sdxl" else comfy.supported_models.SD15
    model_config = model_class(dict(unet_config))
    model_config.unet_config.update(num_heads=unet_config["num_heads"], num_head_channels=-1)  # SD15 forces 8 heads
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({})
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    state_dict = unet.state_dict()
    converted = {comfy: state_dict[diffusers] for diffusers, comfy in key_map.items() if diffusers in state_dict}
    assert len(converted) == len(state_dict), "the key map missed some diffusers weights"
    base_model.diffusion_model.load_state_dict(converted, strict=True)
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(base_model, mm.get_torch_device(), mm.unet_offload_device())


def tiny_pipe(family: str):
    """The tiny diffusers pipeline of ``family`` (deterministic weights)."""
    if family == "sd15":
        return build_tiny_sd15_pipeline()
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    sd15 = build_tiny_sd15_pipeline()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=TINY_LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, cross_attention_dim=SDXL_CONTEXT, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=SDXL_POOLED + 6 * 256,
    ).eval()  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=sd15.vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=sd15.scheduler, force_zeros_for_empty_prompt=False,
    )  # fmt: skip


def _embeds(seed: int, width: int, pooled: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 77, width, generator=generator)
    return embeds, (torch.randn(1, pooled, generator=generator) if pooled else None)


def tiny_family(family: str) -> TinyFamily:
    """The tiny model of ``family`` with random prompt embeddings for a positive and a negative prompt."""
    pipe = tiny_pipe(family)
    if family == "sd15":
        (positive, _), (negative, _) = _embeds(10, SD15_CONTEXT), _embeds(11, SD15_CONTEXT)
        return TinyFamily(
            family, pipe, comfy_model_from_diffusers(pipe.unet, family), [[positive, {}]], [[negative, {}]],
            {"prompt_embeds": positive}, {"negative_prompt_embeds": negative},
        )  # fmt: skip
    (positive, pooled), (negative, negative_pooled) = (_embeds(seed, SDXL_CONTEXT, SDXL_POOLED) for seed in (10, 11))
    size = {"width": TINY_IMAGE_SIZE, "height": TINY_IMAGE_SIZE}  # ComfyUI's SDXL size numbers = diffusers' time ids
    return TinyFamily(
        family, pipe, comfy_model_from_diffusers(pipe.unet, family),
        [[positive, {"pooled_output": pooled, **size}]], [[negative, {"pooled_output": negative_pooled, **size}]],
        {"prompt_embeds": positive, "pooled_prompt_embeds": pooled},
        {"negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled},
    )  # fmt: skip


def empty_latent() -> dict:
    return {"samples": torch.zeros(LATENT_SHAPE)}


def tiny_vae():
    """A ComfyUI VAE (TAESD architecture, random weights): decodes latents to images through the real VAE path."""
    generator = torch.Generator().manual_seed(0)
    state_dict = comfy.taesd.taesd.TAESD().state_dict()
    state_dict = {key: 0.1 * torch.randn(value.shape, generator=generator) for key, value in state_dict.items()}
    return comfy.sd.VAE(sd=state_dict)


def tiny_clip(family: str):
    """A ComfyUI CLIP (its real tokenizer and text-encoder code) with tiny random encoders: SD1.5's CLIP-L gives
    the 32-wide context of the tiny SD1.5 UNet, SDXL's CLIP-L + CLIP-G give 32 + 32 and a 32-wide pooled output."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3}
    if family == "sdxl":
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        options = {"clip_l_model_config": tiny, "clip_g_model_config": tiny}
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        options = {"clip_l_model_config": tiny}
    clip = comfy.sd.CLIP(target, model_options=options)
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        key: (0.02 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value)
        for key, value in clip.cond_stage_model.state_dict().items()
    }
    clip.cond_stage_model.load_state_dict(state_dict, strict=True)
    return clip


def fewstep_pipeline(family: TinyFamily):
    """fewstep's diffusers pipeline (``pipelines/``) over the family's components."""
    from fewstep.pipelines.fewstep_sd import FewStepSDPipeline
    from fewstep.pipelines.fewstep_sdxl import FewStepSDXLPipeline

    pipeline_class = FewStepSDXLPipeline if family.family == "sdxl" else FewStepSDPipeline
    pipe = pipeline_class(**family.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def comfy_noise(seed: int) -> torch.Tensor:
    """The initial noise ComfyUI draws for an empty latent and ``seed``."""
    return comfy.sample.prepare_noise(torch.zeros(LATENT_SHAPE), seed)


def model_space(latent: dict, model) -> torch.Tensor:
    """A LATENT's samples in the model's latent space (ComfyUI stores them divided by the VAE scale factor)."""
    return model.model.latent_format.process_in(latent["samples"])


def add_tiny_lora(unet, seed: int = 5):
    """Give a diffusers UNet a fewstep LoRA adapter "generator" (rank 4, alpha 2, random non-zero up weights)."""
    from fewstep.training.loop.networks import lora_config

    torch.manual_seed(seed)
    unet.add_adapter(lora_config(4, 2.0, init_lora_weights=False), adapter_name="generator")
    return unet


def write_tiny_lora(path, family: str):
    """A fewstep-exported kohya LoRA file (``training.lora_io.save_kohya_lora``) for the tiny ``family``."""
    from fewstep.training.publish.lora_files import save_kohya_lora

    return save_kohya_lora(add_tiny_lora(tiny_pipe(family).unet), "generator", path)


# ---------------------------------------------------------------------------------------- headless workflows
@functools.cache
def cached_family(family: str) -> TinyFamily:
    return tiny_family(family)


class TinyCheckpointLoader:
    """Test stand-in for CheckpointLoaderSimple: the tiny MODEL, CLIP and VAE of the family its name implies."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        family = "sdxl" if "xl" in ckpt_name.lower() else "sd15"
        return cached_family(family).model, tiny_clip(family), tiny_vae()


def register_test_nodes(nodes) -> None:
    nodes.NODE_CLASS_MAPPINGS["FewStepTestTinyCheckpoint"] = TinyCheckpointLoader


def tiny_api_prompt(path, loras_dir, latent_size: int = TINY_LATENT_SIZE * 8) -> dict:
    """An API-format workflow made runnable on tiny models: checkpoints → :class:`TinyCheckpointLoader`, each LoRA
    it names written as a tiny fewstep LoRA of the family in its name, latents shrunk to ``latent_size`` pixels."""
    import json

    prompt = json.loads(Path(path).read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "FewStepTestTinyCheckpoint"
        elif node["class_type"] == "LoraLoaderModelOnly" and not (Path(loras_dir) / inputs["lora_name"]).exists():
            write_tiny_lora(Path(loras_dir) / inputs["lora_name"], "sdxl" if "xl" in inputs["lora_name"] else "sd15")
        elif node["class_type"] == "EmptyLatentImage":
            inputs.update(width=latent_size, height=latent_size)
    return prompt


class _Server:
    """What PromptExecutor needs of ComfyUI's PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def validate(prompt: dict) -> tuple:
    """ComfyUI's own prompt validation: (valid, error, outputs, node_errors)."""
    import asyncio

    import execution

    return asyncio.run(execution.validate_prompt("fewstep-test", prompt, None))


def execute(prompt: dict):
    """Validate and run an API-format prompt through ComfyUI's PromptExecutor; returns the executor."""
    import execution

    valid = validate(prompt)
    assert valid[0], f"validation failed: {valid[1]} {valid[3]}"
    executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
    executor.execute(prompt, "fewstep-test", {}, valid[2])
    return executor
