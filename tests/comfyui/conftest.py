"""Fixtures for the ComfyUI integration tests; every test module starts with ``require_comfyui()``, which skips
it when ``COMFYUI_PATH`` is unset (the helpers below import ComfyUI only when a fixture runs)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def comfyui():
    from comfyui_env import require_comfyui

    return require_comfyui()


@pytest.fixture(scope="session")
def node(comfyui):
    """A node class by id, as ComfyUI registered it."""
    return lambda node_id: comfyui["nodes"].NODE_CLASS_MAPPINGS[node_id]


@pytest.fixture(scope="session", params=["sd15", "sdxl"])
def tiny(request, comfyui):
    """A tiny SD1.5- or SDXL-shaped model in diffusers and ComfyUI, without LoRA."""
    from comfy_tiny import tiny_family

    return tiny_family(request.param)


@pytest.fixture(scope="session")
def student(comfyui, tiny):
    """``tiny``'s family with a fewstep LoRA: the diffusers UNet carries the peft adapter, ``lora_file`` is its
    kohya export, ``model`` the ComfyUI base, ``student`` the base through LoraLoaderModelOnly, ``lora_log`` what
    ComfyUI logged while loading it."""
    from comfy_tiny import add_tiny_lora, tiny_family
    from comfyui_env import captured_logs

    from fewstep.training.publish.lora_files import save_kohya_lora

    family = tiny_family(tiny.family)
    add_tiny_lora(family.pipe.unet)
    name = f"fewstep_test_{family.family}.safetensors"
    family.lora_file = save_kohya_lora(family.pipe.unet, "generator", comfyui["loras_dir"] / name)
    with captured_logs() as records:
        loader = comfyui["nodes"].NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
        family.student = loader.load_lora_model_only(family.model, name, 1.0)[0]
    family.lora_log = [record.getMessage() for record in records]
    return family
