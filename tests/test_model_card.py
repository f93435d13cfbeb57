"""The model card states how to sample this student in diffusers, ComfyUI and A1111 (and what not to do)."""

from pathlib import Path

import pytest

from fewstep.training.publish.hub import Run
from fewstep.training.publish.model_card import model_card
from fewstep.training.publish.sampling_recipes import SamplingRecipe, comfyui_simple_timesteps

BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def card(tmp_path, **config):
    from huggingface_hub import ModelCard

    run = Run(tmp_path, "sd15", {"teacher": BASE, "guidance_scale": 1.75, **config}, None, None)
    path = tmp_path / "README.md"
    path.write_text(model_card(run, "alice/student", BASE, "creativeml-openrail-m"))
    return ModelCard.load(path)


def test_card_parses_and_states_base_method_timesteps_cfg_and_lora_scale(tmp_path):
    parsed = card(tmp_path, num_steps=4)
    assert parsed.data.base_model == BASE and parsed.data.license == "creativeml-openrail-m"
    text = parsed.text
    assert f"| base model | [{BASE}]" in text
    assert "| method | DMD2 (distribution matching, no GAN) |" in text
    assert "| steps | 4 |" in text and "| timesteps | `[999, 749, 499, 249]`" in text
    assert "| CFG | 1 (guidance is distilled in; the teacher used CFG 1.75) |" in text
    assert "| LoRA scale | 1 |" in text and "| style LoRAs fused into the teacher | none |" in text


def test_card_has_the_diffusers_recipes_custom_pipeline_and_stock_lcm(tmp_path):
    text = card(tmp_path, num_steps=4).text
    assert 'custom_pipeline="alice/student", trust_remote_code=True' in text
    assert "num_inference_steps=4" in text and "teacher_guidance=0.01" in text
    assert "LCMScheduler.from_config" in text and "guidance_scale=0, timesteps=[999, 749, 499, 249]" in text


def test_card_has_the_comfyui_recipes_and_the_settings_to_avoid(tmp_path):
    text = card(tmp_path, num_steps=4).text
    assert "**FewStep KSampler**: steps `4`, first_timestep `999`" in text
    assert "**KSampler** with steps `4`, cfg `1.0`, sampler `lcm`, scheduler `simple`" in text
    assert "`sgm_uniform` lands within one timestep" in text
    assert "schedulers `normal`, `karras`, `exponential`" in text
    assert "**ModelSamplingDiscrete** with sampling `lcm`" in text and "50-step grid" in text


def test_card_has_the_a1111_recipe(tmp_path):
    text = card(tmp_path, num_steps=1).text
    assert "<lora:fewstep_comfyui:1>" in text and "sampler **LCM**" in text and "1 step(s), CFG scale 1" in text


def test_a_shifted_one_step_student_gets_no_stock_comfyui_recipe(tmp_path):
    text = card(tmp_path, num_steps=1, timesteps=[399]).text
    assert "scheduler `simple`" not in text
    assert "**FewStep KSampler**: steps `1`, first_timestep `399`" in text
    assert "Stock KSampler cannot sample this student" in text
    assert "timesteps=[399]" in text


def test_custom_timesteps_use_the_fewstep_scheduler_node(tmp_path):
    text = card(tmp_path, num_steps=3, timesteps=[999, 500, 100]).text
    assert "**FewStep Scheduler** with timesteps `999,500,100`" in text
    assert "No stock ComfyUI scheduler hits these timesteps" in text


def test_card_names_the_style_loras_and_how_to_load_them(tmp_path):
    text = card(tmp_path, num_steps=4, teacher_lora=["/home/me/loras/ghibli.safetensors:0.8"]).text
    assert "| style LoRAs fused into the teacher | `ghibli.safetensors` at scale 0.8 |" in text
    assert 'pipe.load_lora_weights("ghibli.safetensors", adapter_name="style_ghibli")' in text
    assert "**LoraLoaderModelOnly** `ghibli.safetensors` (strength 0.8)" in text
    assert "<lora:ghibli:0.8> <lora:fewstep_comfyui:1>" in text
    assert "/home/me" not in text  # no local paths


@pytest.mark.parametrize("steps, stock", [(1, "simple"), (2, "simple"), (4, "simple"), (6, None), (8, "simple")])
def test_stock_comfyui_scheduler_only_where_simple_hits_dmd2_timesteps(steps, stock):
    from fewstep.core.schedule import student_timesteps

    recipe = SamplingRecipe(student_timesteps(steps))
    assert recipe.comfyui_stock_scheduler == stock
    assert (comfyui_simple_timesteps(steps) == recipe.timesteps) == (stock is not None)


def test_public_config_drops_local_data_paths(tmp_path):
    text = card(tmp_path, num_steps=1, prompts=str(Path("/data/me/prompts.txt")), dataset="/data/me/ds").text
    assert "/data/me" not in text and "prompts: prompts.txt" in text and "dataset: ds" in text
