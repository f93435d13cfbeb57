"""A LoRA exported by fewstep (kohya format) loads with ComfyUI's stock loaders, every key, with exact outputs."""

from comfyui_env import captured_logs, require_comfyui

require_comfyui()  # skips this module when COMFYUI_PATH is unset

import pytest  # noqa: E402
import torch  # noqa: E402
from comfy_tiny import comfy_noise, empty_latent, fewstep_pipeline, model_space, tiny_clip  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

SEED = 7


def _lora_modules(path) -> int:
    return sum(key.endswith(".lora_down.weight") for key in load_file(path))


def test_lora_loader_model_only_patches_every_key(student):
    assert not [message for message in student.lora_log if "lora key not loaded" in message]
    assert len(student.student.patches) == _lora_modules(student.lora_file)


def test_lora_loader_with_clip_patches_every_key(comfyui, student):
    loader = comfyui["nodes"].NODE_CLASS_MAPPINGS["LoraLoader"]()
    with captured_logs() as records:
        model, _ = loader.load_lora(student.model, tiny_clip(student.family), student.lora_file.name, 1.0, 1.0)
    assert not [r for r in records if "lora key not loaded" in r.getMessage()]
    assert len(model.patches) == _lora_modules(student.lora_file)


@pytest.mark.parametrize("steps", [1, 4])
def test_lora_student_equals_the_diffusers_generator(node, student, steps):
    ksampler = node("FewStepKSampler")
    latent = ksampler.execute(student.student, SEED, steps, 999, student.positive, empty_latent()).result[0]
    reference = fewstep_pipeline(student)(
        latents=comfy_noise(SEED), num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED),
        output_type="latent", **student.pipe_kwargs,
    ).images  # fmt: skip
    torch.testing.assert_close(model_space(latent, student.model), reference, rtol=0, atol=1e-4)
    base = ksampler.execute(student.model, SEED, steps, 999, student.positive, empty_latent()).result[0]
    assert (model_space(base, student.model) - reference).abs().max() > 0.1  # the LoRA does change the output
