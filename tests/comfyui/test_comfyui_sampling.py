"""FewStep Scheduler / Sampler / KSampler on tiny SD1.5 and SDXL models, against fewstep's diffusers pipelines."""

from comfyui_env import require_comfyui

require_comfyui()  # skips this module when COMFYUI_PATH is unset

import pytest  # noqa: E402
import torch  # noqa: E402
from comfy_tiny import comfy_noise, empty_latent, fewstep_pipeline, model_space  # noqa: E402

from fewstep.core.schedule import NoiseSchedule  # noqa: E402
from fewstep.pipelines.common import unet_denoiser  # noqa: E402

ATOL = 1e-4
SEED = 123


def _out(node_class, *args):
    return node_class.execute(*args).result[0]


def _sampler_custom(node, model, positive, sigmas, latent, seed=SEED):
    """The stock SamplerCustom node with the FewStep Sampler: the composable path."""
    sampler = _out(node("FewStepSampler"))
    return node("SamplerCustom")().sample(model, True, seed, 1.0, positive, [], sampler, sigmas, latent)[0]


def test_scheduler_returns_dmd2_sigmas_for_four_steps(node, tiny):
    sigmas = _out(node("FewStepScheduler"), tiny.model, 4, 999, "")
    model_sampling = tiny.model.get_model_object("model_sampling")
    expected = torch.cat([model_sampling.sigma(torch.tensor([999.0, 749.0, 499.0, 249.0])), torch.zeros(1)])
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=0)
    torch.testing.assert_close(sigmas, torch.tensor([14.6146, 4.0817, 1.6129, 0.6932, 0.0]), rtol=0, atol=1e-4)
    assert model_sampling.timestep(sigmas[:-1]).tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize(
    "steps, first_timestep, custom, timesteps",
    [
        (1, 999, "", [999]),
        (2, 999, "", [999, 499]),
        (8, 999, "", [999, 874, 749, 624, 499, 374, 249, 124]),
        (1, 399, "", [399]),
        (4, 399, "", [399, 299, 199, 99]),
        (4, 999, "999, 500, 100", [999, 500, 100]),
    ],
)
def test_scheduler_timesteps(node, tiny, steps, first_timestep, custom, timesteps):
    sigmas = _out(node("FewStepScheduler"), tiny.model, steps, first_timestep, custom)
    model_sampling = tiny.model.get_model_object("model_sampling")
    assert sigmas[-1] == 0 and model_sampling.timestep(sigmas[:-1]).tolist() == timesteps


@pytest.mark.parametrize("steps", [1, 4])
def test_fewstep_sampler_equals_the_diffusers_pipeline(node, tiny, steps):
    sigmas = _out(node("FewStepScheduler"), tiny.model, steps, 999, "")
    latent = _sampler_custom(node, tiny.model, tiny.positive, sigmas, empty_latent())
    reference = fewstep_pipeline(tiny)(
        latents=comfy_noise(SEED), num_inference_steps=steps, generator=torch.Generator().manual_seed(SEED),
        output_type="latent", **tiny.pipe_kwargs,
    ).images  # fmt: skip
    torch.testing.assert_close(model_space(latent, tiny.model), reference, rtol=0, atol=ATOL)


def test_fewstep_ksampler_is_scheduler_plus_sampler(node, tiny):
    sigmas = _out(node("FewStepScheduler"), tiny.model, 4, 999, "")
    composed = _sampler_custom(node, tiny.model, tiny.positive, sigmas, empty_latent())
    one_node = _out(node("FewStepKSampler"), tiny.model, SEED, 4, 999, tiny.positive, empty_latent(), tiny.negative)
    torch.testing.assert_close(one_node["samples"], composed["samples"], rtol=0, atol=0)


def test_shifted_one_step_starts_from_pure_noise(node, tiny):
    # DMD2's SDXL one-step model: t = 399, input = the unit-variance noise itself.
    sigmas = _out(node("FewStepScheduler"), tiny.model, 1, 399, "")
    latent = _sampler_custom(node, tiny.model, tiny.positive, sigmas, empty_latent())
    reference = fewstep_pipeline(tiny)(
        latents=comfy_noise(SEED), timesteps=[399], output_type="latent", **tiny.pipe_kwargs
    ).images
    torch.testing.assert_close(model_space(latent, tiny.model), reference, rtol=0, atol=ATOL)
    # ComfyUI's stock rule would have scaled the noise by σ(399) instead (std 0.76): a different image.
    import comfy.samplers

    stock = node("SamplerCustom")().sample(
        tiny.model, True, SEED, 1.0, tiny.positive, [], comfy.samplers.sampler_object("lcm"), sigmas, empty_latent()
    )[0]  # fmt: skip
    assert (model_space(stock, tiny.model) - reference).abs().max() > 0.1


def test_img2img_keeps_comfyuis_noising_of_the_latent(node, tiny):
    # A non-empty latent at σ(499): x_t = sqrt(ᾱ)·latent + sqrt(1 − ᾱ)·noise, then one student step.
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    sigmas = _out(node("FewStepScheduler"), tiny.model, 1, 999, "499")
    latent = _sampler_custom(node, tiny.model, tiny.positive, sigmas, {"samples": start})
    schedule = NoiseSchedule.from_config(dict(tiny.pipe.scheduler.config))
    denoise = unet_denoiser(tiny.pipe.unet, schedule, _unet_kwargs(tiny))
    x_t = schedule.add_noise(tiny.model.model.latent_format.process_in(start), comfy_noise(SEED), 499)
    torch.testing.assert_close(model_space(latent, tiny.model), denoise(x_t, 499), rtol=0, atol=ATOL)


def _unet_kwargs(tiny) -> dict:
    if tiny.family == "sd15":
        return {"encoder_hidden_states": tiny.pipe_kwargs["prompt_embeds"]}
    size = [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]  # original size, crop, target size: the tiny 32-pixel image
    added = {"text_embeds": tiny.pipe_kwargs["pooled_prompt_embeds"], "time_ids": torch.tensor([size])}
    return {"encoder_hidden_states": tiny.pipe_kwargs["prompt_embeds"], "added_cond_kwargs": added}
