"""LoRAs that ``fewstep train --method dmd`` and ``--method progressive`` export load with ComfyUI's stock
LoraLoaderModelOnly, every key, and sample in ComfyUI exactly as fewstep's diffusers pipeline samples them from
their recorded recipe (DMD: DMD2's re-noising rule; Progressive Distillation: deterministic DDIM, every round)."""

from comfyui_env import captured_logs, require_comfyui

require_comfyui()  # skips this module when COMFYUI_PATH is unset

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from comfy_tiny import comfy_noise, empty_latent, fewstep_pipeline, model_space, tiny_family  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fewstep.training.methods.dmd import DMDTrainConfig, train_dmd  # noqa: E402
from fewstep.training.methods.progressive import ProgressiveTrainConfig, train_progressive  # noqa: E402
from fewstep.training.teacher.tiny_models import build_tiny_sd15_pipeline, save_tiny_pipeline  # noqa: E402

SEED = 11


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DMD run and a two-round Progressive Distillation run (2 → 1 steps) on the tiny SD1.5 teacher that
    ``tiny_family("sd15")`` also loads into ComfyUI."""
    root = tmp_path_factory.mktemp("methods")
    teacher = save_tiny_pipeline(build_tiny_sd15_pipeline(), root / "teacher")
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n")
    common = dict(
        teacher=str(teacher), prompts=str(prompts), max_steps=4, gen_rank=4, gen_alpha=4.0, checkpoint_every=0,
        validate_every=0, warmup_steps=1, lr=5e-2, num_pairs=4, pair_steps=2, batch_size=2,
    )  # fmt: skip
    train_dmd(DMDTrainConfig(output=str(root / "dmd"), fake_rank=4, fake_alpha=4.0, **common))
    train_progressive(ProgressiveTrainConfig(output=str(root / "pd"), start_steps=2, end_steps=1, **common))
    return root


@pytest.mark.parametrize("lora", ["dmd/lora", "pd/lora/steps-2", "pd/lora/steps-1"])
def test_method_lora_loads_with_the_stock_loader_and_samples_as_in_diffusers(comfyui, node, trained, lora):
    folder = trained / lora
    recipe = json.loads((folder / "fewstep_recipe.json").read_text())
    name = f"fewstep_{lora.replace('/', '_')}.safetensors"
    shutil.copyfile(folder / "fewstep_comfyui.safetensors", comfyui["loras_dir"] / name)
    family = tiny_family("sd15")
    with captured_logs() as records:
        student = node("LoraLoaderModelOnly")().load_lora_model_only(family.model, name, 1.0)[0]
    assert not [r for r in records if "lora key not loaded" in r.getMessage()]
    lora_modules = sum(k.endswith(".lora_down.weight") for k in load_file(folder / "fewstep_comfyui.safetensors"))
    assert len(student.patches) == lora_modules

    timesteps = recipe["timesteps"]
    sampling = "ddim" if recipe["sampler"] == "ddim" else "dmd2"
    latent = node("FewStepKSampler").execute(
        student, SEED, len(timesteps), timesteps[0], family.positive, empty_latent(), sampling=sampling
    ).result[0]
    pipe = fewstep_pipeline(family)
    pipe.load_lora_weights(str(folder))  # its fewstep_recipe.json sets the timesteps and the sampler
    reference = pipe(
        latents=comfy_noise(SEED), generator=torch.Generator().manual_seed(SEED), output_type="latent",
        **family.pipe_kwargs,
    ).images  # fmt: skip
    torch.testing.assert_close(model_space(latent, student), reference, rtol=0, atol=1e-4)
    base = node("FewStepKSampler").execute(
        family.model, SEED, len(timesteps), timesteps[0], family.positive, empty_latent(), sampling=sampling
    ).result[0]
    assert (model_space(base, family.model) - reference).abs().max() > 1e-3  # the trained LoRA changes the output


@pytest.mark.parametrize("lora", ["pd/lora/steps-2", "pd/lora/steps-1"])
def test_stock_ksampler_recipe_of_a_progressive_card_equals_diffusers(comfyui, node, trained, lora):
    """The model card's stock recipe for Progressive Distillation students: KSampler, sampler ``ddim`` (Euler in σ,
    i.e. deterministic DDIM), scheduler ``simple``, cfg 1, starting from pure noise at t = 999."""
    from fewstep.training.publish.sampling_recipes import SamplingRecipe

    folder = trained / lora
    recipe = json.loads((folder / "fewstep_recipe.json").read_text())
    card = SamplingRecipe(recipe["timesteps"], sampler=recipe["sampler"], method=recipe["method"])
    assert (card.comfyui_stock_sampler, card.comfyui_stock_scheduler) == ("ddim", "simple")
    name = f"fewstep_stock_{lora.replace('/', '_')}.safetensors"
    shutil.copyfile(folder / "fewstep_comfyui.safetensors", comfyui["loras_dir"] / name)
    family = tiny_family("sd15")
    student = node("LoraLoaderModelOnly")().load_lora_model_only(family.model, name, 1.0)[0]
    latent = node("KSampler")().sample(
        student, SEED, card.steps, 1.0, "ddim", "simple", family.positive, family.negative, empty_latent()
    )[0]
    pipe = fewstep_pipeline(family)
    pipe.load_lora_weights(str(folder))
    reference = pipe(latents=comfy_noise(SEED), output_type="latent", **family.pipe_kwargs).images
    torch.testing.assert_close(model_space(latent, student), reference, rtol=0, atol=1e-4)
