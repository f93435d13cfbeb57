"""Distillation++ in ComfyUI: the teacher's own weights refine a LoRA student, exactly as fewstep's pipelines do."""

from comfyui_env import require_comfyui

require_comfyui()  # skips this module when COMFYUI_PATH is unset

import pytest  # noqa: E402
import torch  # noqa: E402
from comfy_tiny import (  # noqa: E402
    comfy_model_from_diffusers,
    comfy_noise,
    empty_latent,
    fewstep_pipeline,
    model_space,
    tiny_pipe,
)

from fewstep.core.schedule import NoiseSchedule  # noqa: E402

SEED = 11
ATOL = 1e-4


def _distillpp(node, family, lam, guided_steps=1, teacher_cfg=3.0, steps=4, student=None, rule=None, **guide):
    student = family.student if student is None else student
    return node("DistillationPPKSampler").execute(
        student, family.model, family.positive, family.negative, lam, guided_steps, teacher_cfg, empty_latent(), SEED,
        steps, 999, rule=rule, **guide,
    ).result[0]  # fmt: skip


def _fewstep(node, model, positive, steps=4):
    return node("FewStepKSampler").execute(model, SEED, steps, 999, positive, empty_latent()).result[0]


def test_lambda_zero_equals_the_fewstep_sampler(node, student):
    off = _distillpp(node, student, 0.0)
    plain = _fewstep(node, student.student, student.positive)
    torch.testing.assert_close(off["samples"], plain["samples"], rtol=0, atol=1e-5)


def test_lambda_above_zero_changes_the_sample(node, student):
    on = _distillpp(node, student, 0.3)
    assert (on["samples"] - _fewstep(node, student.student, student.positive)["samples"]).abs().max() > 1e-2


@pytest.mark.parametrize("guided_steps", [1, 2])
def test_distillpp_equals_the_diffusers_pipeline(node, student, guided_steps):
    latent = _distillpp(node, student, 0.3, guided_steps)
    reference = fewstep_pipeline(student)(
        latents=comfy_noise(SEED), num_inference_steps=4, generator=torch.Generator().manual_seed(SEED),
        teacher_guidance=0.3, teacher_guided_steps=guided_steps, teacher_guidance_scale=3.0, output_type="latent",
        **student.pipe_kwargs, **student.negative_pipe_kwargs,
    ).images  # fmt: skip
    torch.testing.assert_close(model_space(latent, student.model), reference, rtol=0, atol=ATOL)


def test_eps_mix_rule_equals_the_diffusers_pipeline_and_differs_from_x0_lerp(node, student):
    latent = _distillpp(node, student, 0.1, 2, rule="eps_mix")
    reference = fewstep_pipeline(student)(
        latents=comfy_noise(SEED), num_inference_steps=4, generator=torch.Generator().manual_seed(SEED),
        teacher_guidance=0.1, teacher_guided_steps=2, teacher_guidance_scale=3.0, teacher_guidance_rule="eps_mix",
        output_type="latent", **student.pipe_kwargs, **student.negative_pipe_kwargs,
    ).images  # fmt: skip
    torch.testing.assert_close(model_space(latent, student.model), reference, rtol=0, atol=ATOL)
    assert (latent["samples"] - _distillpp(node, student, 0.1, 2, rule="x0_lerp")["samples"]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "guide, teacher_steps", [("noise_only", 1), ("at_student_input", 1), ("renoised", 2), ("at_student_input", 3)]
)
def test_guide_sources_and_teacher_steps_equal_the_diffusers_pipeline(node, student, guide, teacher_steps):
    latent = _distillpp(node, student, 0.2, 2, rule="eps_mix", guide=guide, teacher_steps=teacher_steps)
    reference = fewstep_pipeline(student)(
        latents=comfy_noise(SEED), num_inference_steps=4, generator=torch.Generator().manual_seed(SEED),
        teacher_guidance=0.2, teacher_guided_steps=2, teacher_guidance_scale=3.0, teacher_guidance_rule="eps_mix",
        teacher_guidance_source=guide, teacher_refinement_steps=teacher_steps, output_type="latent",
        **student.pipe_kwargs, **student.negative_pipe_kwargs,
    ).images  # fmt: skip
    torch.testing.assert_close(model_space(latent, student.model), reference, rtol=0, atol=ATOL)
    assert (latent["samples"] - _distillpp(node, student, 0.2, 2, rule="eps_mix")["samples"]).abs().max() > 1e-3


class _FixedNoise:
    """A NOISE input that hands the sampler a given x_t (the FewStep sampler starts from it as pure noise)."""

    def __init__(self, x_t):
        self.x_t, self.seed = x_t, SEED

    def generate_noise(self, latent):
        return self.x_t


def _one_step_from(node, model, positive, x_t):
    """x0 of ``model`` (CFG 1) at t = 999 from the model-space input ``x_t``, as a LATENT."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})
    sigmas = node("FewStepScheduler").execute(model, 1, 999, "").result[0]
    sampler = node("FewStepSampler").execute().result[0]
    return node("SamplerCustomAdvanced")().sample(_FixedNoise(x_t), guider, sampler, sigmas, empty_latent())[0]


def test_teacher_pass_runs_the_base_weights_not_the_lora(node, student):
    # x0_lerp, λ = 1 on a one-step run: the output *is* the teacher's x0 (CFG 1) at the student's x0 re-noised to
    # t = 999.
    out = _distillpp(node, student, 1.0, teacher_cfg=1.0, steps=1, rule="x0_lerp")
    x0_student = model_space(_fewstep(node, student.student, student.positive, steps=1), student.model)
    schedule = NoiseSchedule.from_config(dict(student.pipe.scheduler.config))
    eps = torch.randn(x0_student.shape, generator=torch.Generator().manual_seed(SEED))  # the guider's first draw
    x_s = schedule.add_noise(x0_student, eps, 999)
    teacher = _one_step_from(node, student.model, student.positive, x_s)
    lora = _one_step_from(node, student.student, student.positive, x_s)
    in_model_space = lambda latent: model_space(latent, student.model)
    torch.testing.assert_close(in_model_space(out), in_model_space(teacher), rtol=0, atol=ATOL)
    assert (in_model_space(out) - in_model_space(lora)).abs().max() > 0.1


def test_a_student_with_its_own_weights_gives_the_same_result(node, comfyui, student):
    # The student's LoRA on a separate copy of the base weights (like a distilled full checkpoint): the teacher
    # is then loaded as an additional model instead of being swapped in by hooks.
    copy = comfy_model_from_diffusers(tiny_pipe(student.family).unet, student.family)
    separate = comfyui["nodes"].NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(
        copy, student.lora_file.name, 1.0
    )[0]  # fmt: skip
    assert not separate.is_clone(student.model)
    torch.testing.assert_close(
        _distillpp(node, student, 0.3, student=separate)["samples"], _distillpp(node, student, 0.3)["samples"],
        rtol=0, atol=1e-5,
    )  # fmt: skip


def test_guider_in_sampler_custom_advanced_equals_the_ksampler_node(node, student):
    guider = node("DistillationPPGuider").execute(
        student.student, student.model, student.positive, student.negative, 0.3, 1, 3.0
    ).result[0]  # fmt: skip
    sigmas = node("FewStepScheduler").execute(student.student, 4, 999, "").result[0]
    sampler = node("FewStepSampler").execute().result[0]
    noise = node("RandomNoise")().get_noise(SEED)[0]
    latent = node("SamplerCustomAdvanced")().sample(noise, guider, sampler, sigmas, empty_latent())[0]
    torch.testing.assert_close(latent["samples"], _distillpp(node, student, 0.3)["samples"], rtol=0, atol=0)


def test_a_teacher_patched_beyond_the_student_is_refused(node, student):
    # Swapped inputs: the "teacher" carries a LoRA the "student" (sharing its weights) lacks.
    with pytest.raises(ValueError, match="the teacher MODEL has a patch on .* that the student lacks"):
        node("DistillationPPGuider").execute(student.model, student.student, student.positive, student.negative, 0.3, 1, 3.0)
