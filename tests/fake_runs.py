"""Tiny base pipelines and fabricated fewstep run directories for the pipeline, sample and push tests.

A run directory has the trainer's layout: ``config.yaml``, ``lora/pytorch_lora_weights.safetensors`` (diffusers,
adapter config in the metadata), ``lora/fewstep_comfyui.safetensors`` (kohya), ``metrics.json``,
``samples/step-*.png``. The LoRA is random (``init_lora_weights=False``) so that it visibly changes outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from fewstep.training.publish.lora_files import save_diffusers_lora, save_kohya_lora
from fewstep.training.teacher.tiny_models import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline, save_tiny_pipeline

FAMILIES = ["sd15", "sdxl"]

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = {"sd15": REPO / "pipelines" / "fewstep_sd.py", "sdxl": REPO / "pipelines" / "fewstep_sdxl.py"}
PIPELINE_CLASSES = {"sd15": "FewStepSDPipeline", "sdxl": "FewStepSDXLPipeline"}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def build_tiny(family: str):
    return (build_tiny_sdxl_pipeline if family == "sdxl" else build_tiny_sd15_pipeline)()


def add_random_lora(unet, rank: int = 4, alpha: float = 2.0, seed: int = 1, adapter_name: str = "generator"):
    from peft import LoraConfig

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=LORA_TARGETS)
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


def make_base_dir(family: str, directory: Path) -> Path:
    return save_tiny_pipeline(build_tiny(family), directory)


def make_run_dir(family: str, directory: Path, teacher: str, samples: bool = True, metrics: bool = True) -> Path:
    """A fewstep run directory whose LoRA was trained (here: drawn at random) on the tiny ``family`` base."""
    from PIL import Image

    directory = Path(directory)
    unet = add_random_lora(build_tiny(family).unet)
    save_diffusers_lora(unet, "generator", directory / "lora", family=family)
    save_kohya_lora(unet, "generator", directory / "lora" / "fewstep_comfyui.safetensors", family=family)
    config = {
        "teacher": teacher, "output": str(directory), "model_type": None, "num_steps": 4, "timesteps": None,
        "resolution": 32, "max_steps": 10, "lr": 1e-4, "guidance_scale": 1.75, "gen_rank": 4, "gen_alpha": 2.0,
    }  # fmt: skip
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    recipe = {"method": "dmd2", "timesteps": [999, 749, 499, 249], "sampler": "few_step"}  # as the trainer writes it
    (directory / "lora" / "fewstep_recipe.json").write_text(json.dumps(recipe))
    if metrics:
        (directory / "metrics.json").write_text(json.dumps({"fd": 12.5, "accuracy": 0.91}))
    if samples:
        (directory / "samples").mkdir(exist_ok=True)
        for step, color in ((5, "red"), (10, "blue")):
            Image.new("RGB", (70, 36), color).save(directory / "samples" / f"step-{step:07d}.png")
    return directory
