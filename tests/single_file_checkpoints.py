"""Write a diffusers SD1.5/SDXL pipeline as one original-layout (ldm) ``.safetensors`` checkpoint, the way
A1111/ComfyUI users hold their models; the inverse of diffusers' single-file conversion
(``diffusers.loaders.single_file_utils``), for the tiny test pipelines (any number of levels and layers).

Layout: UNet under ``model.diffusion_model.`` (input/middle/output blocks), VAE under ``first_stage_model.``,
SD1.5's CLIP under ``cond_stage_model.transformer.``, SDXL's CLIP-L under ``conditioner.embedders.0.transformer.``
and its OpenCLIP-G (fused q/k/v, transposed projection) under ``conditioner.embedders.1.model.``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET.get(name, name)}.{tail}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    layers = unet.config.layers_per_block
    attention_levels = {int(k.split(".")[1]) for k in unet.state_dict() if k.startswith("up_blocks") and ".attentions." in k}
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        module, param = ".".join(parts[:-1]), parts[-1]
        if module in UNET_TOP:
            new = f"{UNET_TOP[module]}.{param}"
        elif parts[0] == "down_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = 1 + level * (layers + 1)
            if kind == "resnets":
                new = f"input_blocks.{block + index}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{block + index}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{block + layers}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{index * 2}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = level * (layers + 1)
            if kind == "resnets":
                new = f"output_blocks.{block + index}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{block + index}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the resnet (and the attention, if the level has one)
                new = f"output_blocks.{block + layers}.{2 if level in attention_levels else 1}.conv.{parts[-1]}"
        else:
            raise KeyError(f"no ldm name for UNet key {key}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        side = parts[0]
        if parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])
            stage = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{stage}.{level}.block.{parts[4]}.{rest}"
            else:  # downsamplers/upsamplers.0.conv.*
                new = f"{side}.{stage}.{level}.{'downsample' if stage == 'down' else 'upsample'}.conv.{parts[-1]}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            new = f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
        elif parts[1] == "mid_block":  # attentions.0.<module>.<param>: 1×1 convolutions in ldm
            module = ".".join(parts[4:-1])
            new = f"{side}.mid.attn_1.{VAE_ATTENTION[module]}.{parts[-1]}"
            value = value[:, :, None, None] if value.dim() == 2 else value
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out[f"first_stage_model.{new}"] = value
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}{'' if key.startswith('text_model.') else 'text_model.'}{key}": value
        for key, value in text_encoder.state_dict().items()
    }


def open_clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection as OpenCLIP's text tower (SDXL's second text encoder)."""
    state = {key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()}
    out = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    for layer in range(text_encoder.config.num_hidden_layers):
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for param in ("weight", "bias"):
            out[f"{target}attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{source}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
            )
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
                out[f"{target}{new}.{param}"] = state.pop(f"{source}{old}.{param}")
    state.pop("embeddings.position_ids", None)
    assert not state, f"unconverted OpenCLIP keys: {sorted(state)}"
    return {prefix + key: value for key, value in out.items()}


def save_single_file(pipe, path: str | Path) -> Path:
    """``pipe`` (a StableDiffusion(XL)Pipeline) as one ldm-layout safetensors checkpoint."""
    checkpoint = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        checkpoint.update(clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        checkpoint.update(open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        checkpoint.update(clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
    path = Path(path)
    save_file({key: value.detach().contiguous() for key, value in checkpoint.items()}, path)
    return path
