"""Every ComfyUI recipe a fewstep model card states, read from the card and run headless against a real ComfyUI;
and the settings the card warns against, shown to miss the trained timesteps."""

from comfyui_env import require_comfyui

require_comfyui()  # skips this module when COMFYUI_PATH is unset

import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from comfy_tiny import cached_family, execute, model_space, register_test_nodes, write_tiny_lora  # noqa: E402

from fewstep.core.schedule import student_timesteps  # noqa: E402
from fewstep.training.publish.hub import Run  # noqa: E402
from fewstep.training.publish.model_card import KOHYA_WEIGHT_NAME, model_card  # noqa: E402

SEED = 11
STOCK = re.compile(r"\*\*KSampler\*\* with steps `(\d+)`, cfg `([\d.]+)`, sampler `(\w+)`, scheduler `(\w+)`")
FEWSTEP = re.compile(r"\*\*FewStep KSampler\*\*: steps `(\d+)`, first_timestep `(\d+)`")
LORA = re.compile(r"\*\*LoraLoaderModelOnly\*\* `([\w.]+)` \(strength ([\d.]+)\)")


def card_text(family: str, timesteps: list[int]) -> str:
    config = {"teacher": "owner/base", "num_steps": len(timesteps), "timesteps": timesteps, "guidance_scale": 2.0}
    return model_card(Run(None, family, config, None, None), "alice/student", "owner/base", "mit")


def recipe_prompt(lora_name: str, strength: float, sampler_node: dict) -> dict:
    """The graph the card describes: checkpoint → LoraLoaderModelOnly → sampler node → VAEDecode → SaveImage."""
    return {
        "1": {"class_type": "FewStepTestTinyCheckpoint", "inputs": {"ckpt_name": "base.safetensors"}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": sampler_node["class_type"],
              "inputs": {"model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0], **sampler_node["inputs"]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "card_recipe"}},
    }  # fmt: skip


def run_card_recipe(comfyui, text: str, sampler_node: dict):
    register_test_nodes(comfyui["nodes"])
    lora_name, strength = LORA.search(text).groups()
    assert lora_name == KOHYA_WEIGHT_NAME
    if not (comfyui["loras_dir"] / lora_name).exists():
        write_tiny_lora(comfyui["loras_dir"] / lora_name, "sd15")
    executor = execute(recipe_prompt(lora_name, float(strength), sampler_node))
    assert executor.success, [data for event, data in executor.status_messages if event == "execution_error"]
    return executor


def timesteps_of(model, scheduler: str, steps: int) -> list[int]:
    import comfy.samplers

    model_sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)
    return model_sampling.timestep(sigmas[:-1]).tolist()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_stock_ksampler_recipe_of_the_card_runs_headless_at_the_trained_timesteps(comfyui, steps):
    timesteps = student_timesteps(steps)
    stated_steps, cfg, sampler, scheduler = STOCK.search(card_text("sd15", timesteps)).groups()
    node = {"class_type": "KSampler", "inputs": {
        "seed": SEED, "steps": int(stated_steps), "cfg": float(cfg), "sampler_name": sampler, "scheduler": scheduler,
        "negative": ["3", 0], "denoise": 1.0}}  # fmt: skip
    run_card_recipe(comfyui, card_text("sd15", timesteps), node)
    assert timesteps_of(cached_family("sd15").model, scheduler, int(stated_steps)) == timesteps


def test_stock_recipe_at_one_step_equals_the_fewstep_ksampler(comfyui):
    """At one step there is no re-noising: stock lcm + simple and FewStep KSampler give the same latent."""
    import nodes

    family = cached_family("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    stock = nodes.KSampler().sample(family.model, SEED, 1, 1.0, "lcm", "simple", family.positive, family.negative,
                                    latent)[0]  # fmt: skip
    fewstep = comfyui["nodes"].NODE_CLASS_MAPPINGS["FewStepKSampler"]
    ours = fewstep.execute(family.model, SEED, 1, 999, family.positive, latent).result[0]
    torch.testing.assert_close(model_space(stock, family.model), model_space(ours, family.model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [399]])
def test_fewstep_node_recipe_of_the_card_runs_headless(comfyui, timesteps):
    text = card_text("sd15", timesteps)
    steps, first_timestep = FEWSTEP.search(text).groups()
    node = {"class_type": "FewStepKSampler",
            "inputs": {"seed": SEED, "steps": int(steps), "first_timestep": int(first_timestep)}}  # fmt: skip
    run_card_recipe(comfyui, text, node)
    assert student_timesteps(int(steps), first_timestep=int(first_timestep)) == timesteps


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sgm_uniform_lands_within_one_timestep_as_the_card_says(steps):
    assert "`sgm_uniform` lands within one timestep" in card_text("sd15", student_timesteps(steps))
    got = timesteps_of(cached_family("sd15").model, "sgm_uniform", steps)
    assert max(abs(a - b) for a, b in zip(got, student_timesteps(steps))) <= 1


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential"])
def test_schedulers_the_card_warns_against_miss_the_trained_timesteps(scheduler):
    assert f"`{scheduler}`" in card_text("sd15", [999, 749, 499, 249])
    got = timesteps_of(cached_family("sd15").model, scheduler, 4)
    assert max(abs(a - b) for a, b in zip(got, [999, 749, 499, 249])) > 5


def test_model_sampling_discrete_lcm_snaps_the_timesteps_to_a_50_step_grid(comfyui):
    import comfy.samplers

    model = cached_family("sd15").model
    (patched,) = comfyui["nodes"].NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(model, "lcm", False)
    sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "simple", 4)
    timesteps = model.get_model_object("model_sampling").timestep(sigmas[:-1]).tolist()
    assert timesteps != [999, 749, 499, 249] and all((t + 1) % 20 == 0 for t in timesteps)


def test_a_one_step_student_at_399_gets_no_stock_recipe():
    text = card_text("sd15", [399])
    assert STOCK.search(text) is None and "Stock KSampler cannot sample this student" in text
