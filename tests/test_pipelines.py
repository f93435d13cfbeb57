"""fewstep's diffusers pipelines on tiny offline SD1.5/SDXL models: loading as ``custom_pipeline``, exact agreement
with the math layer's sampler, Distillation++ with the teacher = the base UNet with the LoRA disabled, LoRA
sources and formats, ``fewstep sample`` and one-line errors for bad input."""

import logging

import pytest
import torch
from fake_runs import (
    PIPELINE_CLASSES,
    PIPELINE_FILES,
    add_random_lora,
    build_tiny,
    make_base_dir,
)

from fewstep.cli import main
from fewstep.core.sampling import sample_ddim, sample_few_step
from fewstep.core.schedule import NoiseSchedule, student_timesteps

FAMILIES = ["sd15", "sdxl"]
PROMPT = "a photo of a cat"





def load(base, family, **components):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        str(base), custom_pipeline=str(PIPELINE_FILES[family]), trust_remote_code=True, **components
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def students(bases, runs):
    """Each family's pipeline with the run's LoRA loaded from the run directory."""
    pipes = {}
    for family in FAMILIES:
        pipe = load(bases[family], family)
        pipe.load_lora_weights(str(runs[family]))
        pipes[family] = pipe
    return pipes


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def conditioning(pipe, family, prompt=PROMPT):
    """The UNet's keyword arguments for ``prompt`` (no CFG), computed with the pipeline's own encoders."""
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return {"encoder_hidden_states": embeds}


def direct_sample(pipe, family, timesteps, seed=0, sampler="few_step"):
    """The math layer's sampler called directly on the UNet, decoded like the pipeline: the reference."""
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    kwargs = conditioning(pipe, family)
    generator = seeded(seed)
    size = pipe.unet.config.sample_size
    noise = torch.randn((1, 4, size, size), generator=generator)

    def denoise(x_t, t):
        return schedule.to_x0(pipe.unet(x_t, t, **kwargs).sample, x_t, t)

    with torch.no_grad():
        if sampler == "ddim":
            x0 = sample_ddim(denoise, noise, timesteps, schedule)
        else:
            x0 = sample_few_step(denoise, noise, timesteps, schedule, generator)
        image = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", FAMILIES)
def test_custom_pipeline_file_loads_the_family_class(bases, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = load(bases[family], family)
    assert type(pipe).__name__ == PIPELINE_CLASSES[family]
    assert isinstance(pipe, StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline)
    assert pipe.teacher_unet is None


def test_custom_pipeline_needs_trust_remote_code(bases):
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(str(bases["sd15"]), custom_pipeline=str(PIPELINE_FILES["sd15"]))


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("steps", [1, 2, 4, [399]], ids=["1-step", "2-step", "4-step", "t399"])
def test_pipeline_equals_math_layer_sampler(students, family, steps):
    pipe = students[family]
    if isinstance(steps, list):
        timesteps, kwargs = steps, {"timesteps": steps}
    else:
        timesteps, kwargs = student_timesteps(steps), {"num_inference_steps": steps}
    images = pipe(PROMPT, generator=seeded(), output_type="pt", **kwargs).images
    reference = direct_sample(pipe, family, timesteps)
    assert images.shape == reference.shape == (1, 3, 32, 32)
    assert (images - reference).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------ recipes
def run_with_recipe(run, tmp_path, recipe: dict):
    """A copy of a fake run whose LoRA records ``recipe`` (as fewstep train writes lora/fewstep_recipe.json)."""
    import json
    import shutil

    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "lora" / "fewstep_recipe.json").write_text(json.dumps(recipe))
    return copy


@pytest.mark.parametrize("family", FAMILIES)
def test_progressive_lora_samples_with_ddim_at_its_recorded_timesteps(bases, runs, family, tmp_path):
    run = run_with_recipe(runs[family], tmp_path, {"method": "progressive", "timesteps": [999, 499], "sampler": "ddim"})
    pipe = load(bases[family], family)
    pipe.load_lora_weights(str(run))
    images = pipe(PROMPT, generator=seeded(), output_type="pt").images
    assert (images - direct_sample(pipe, family, [999, 499], sampler="ddim")).abs().max().item() <= 1e-5
    renoised = pipe(PROMPT, generator=seeded(), output_type="pt", sampler="few_step").images
    assert (renoised - direct_sample(pipe, family, [999, 499])).abs().max().item() <= 1e-5
    assert (renoised - images).abs().max().item() > 1e-3  # the two samplers differ at 2 steps


def test_recorded_timesteps_are_the_default_and_explicit_steps_win(bases, runs, tmp_path):
    run = run_with_recipe(runs["sd15"], tmp_path, {"method": "dmd2", "timesteps": [399], "sampler": "few_step"})
    pipe = load(bases["sd15"], "sd15")
    pipe.load_lora_weights(str(run / "lora"))
    assert pipe(PROMPT, generator=seeded(), output_type="pt").images.allclose(direct_sample(pipe, "sd15", [399]))
    one_step = pipe(PROMPT, generator=seeded(), output_type="pt", num_inference_steps=1).images
    assert one_step.allclose(direct_sample(pipe, "sd15", [999]))


def test_unloading_the_lora_forgets_its_recipe(bases, runs, tmp_path):
    run = run_with_recipe(runs["sd15"], tmp_path, {"method": "progressive", "timesteps": [999, 499], "sampler": "ddim"})
    pipe = load(bases["sd15"], "sd15")
    pipe.load_lora_weights(str(run))
    assert pipe.fewstep_recipe["sampler"] == "ddim"
    pipe.unload_lora_weights()
    assert pipe.fewstep_recipe is None


def test_a_broken_recipe_is_a_one_line_error(bases, runs, tmp_path):
    run = run_with_recipe(runs["sd15"], tmp_path, {"timesteps": [999], "sampler": "karras"})
    one_line_error(lambda: load(bases["sd15"], "sd15").load_lora_weights(str(run)), "is not a fewstep sampling recipe")


def test_decodes_with_a_tiny_autoencoder(bases, runs):
    """``vae=AutoencoderTiny(...)`` (TAESD-style fast decoding) is used as given, scaling factor included."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), scaling_factor=1.0,
    ).eval()  # fmt: skip
    pipe = load(bases["sd15"], "sd15", vae=tiny)
    pipe.load_lora_weights(str(runs["sd15"]))
    assert pipe.vae_scale_factor == 2
    images = pipe(PROMPT, num_inference_steps=1, generator=seeded(), output_type="pt").images
    reference = direct_sample(pipe, "sd15", student_timesteps(1))
    assert images.shape == reference.shape == (1, 3, 32, 32)
    assert (images - reference).abs().max().item() <= 1e-5


def test_lora_changes_the_output(bases, students):
    base = load(bases["sd15"], "sd15")
    plain = base(PROMPT, generator=seeded(), output_type="pt").images
    student = students["sd15"](PROMPT, generator=seeded(), output_type="pt").images
    assert (plain - student).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_one_generator_per_image(students, family):
    """Image i of a batch depends only on generator i: the same image as a batch of one with that generator."""
    pipe = students[family]
    batch = pipe(
        ["a photo of a dog", PROMPT], num_inference_steps=2, generator=[seeded(1), seeded(2)], output_type="pt"
    ).images
    single = pipe([PROMPT], num_inference_steps=2, generator=[seeded(2)], output_type="pt").images
    assert batch.shape[0] == 2
    assert (batch[1] - single[0]).abs().max().item() <= 1e-5
    assert (batch[0] - batch[1]).abs().max().item() > 1e-4


def test_num_images_per_prompt_and_output_types(students):
    pipe = students["sd15"]
    out = pipe([PROMPT, "a dog"], num_images_per_prompt=2, num_inference_steps=2, generator=seeded(), output_type="np")
    assert out.images.shape == (4, 32, 32, 3)
    assert len(pipe(PROMPT, output_type="pil").images) == 1
    assert pipe(PROMPT, output_type="latent").images.shape == (1, 4, 16, 16)


def test_callback_on_step_end_sees_and_replaces_the_x0_estimate(students):
    pipe = students["sd15"]
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, timestep, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 1 else {}

    latents = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="latent", callback_on_step_end=callback)
    assert seen == [(0, 999, (1, 4, 16, 16)), (1, 499, (1, 4, 16, 16))]
    assert torch.count_nonzero(latents.images) == 0


def test_negative_prompt_is_ignored_with_a_warning_at_cfg_1(students, caplog):
    pipe = students["sd15"]
    with caplog.at_level(logging.WARNING):
        with_negative = pipe(PROMPT, negative_prompt="blurry", generator=seeded(), output_type="pt").images
    assert "negative_prompt is ignored" in caplog.text
    assert torch.equal(with_negative, pipe(PROMPT, generator=seeded(), output_type="pt").images)


# ------------------------------------------------------------------------------------------ Distillation++
class UNetCalls:
    """Forward hook recording every UNet call's inputs and output, and whether its LoRA layers were active."""

    def __init__(self, unet):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.calls = []
        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        sample, timestep = args[0], args[1]
        disabled = bool(self.layers) and all(layer.disable_adapters for layer in self.layers)
        self.calls.append((sample.clone(), timestep, dict(kwargs), output[0].clone(), disabled))

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_distillpp_lambda_zero_is_plain_sampling_and_lambda_positive_differs(students, family):
    pipe = students[family]
    plain = pipe(PROMPT, num_inference_steps=4, generator=seeded(), output_type="pt").images
    zero = pipe(PROMPT, num_inference_steps=4, generator=seeded(), teacher_guidance=0.0, output_type="pt").images
    guided = pipe(PROMPT, num_inference_steps=4, generator=seeded(), teacher_guidance=0.3, output_type="pt").images
    assert torch.equal(plain, zero)
    assert (plain - guided).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_distillpp_eps_mix_rule_differs_from_x0_lerp_and_unknown_rules_are_refused(students, family):
    pipe = students[family]
    run = lambda rule: pipe(PROMPT, num_inference_steps=4, generator=seeded(), teacher_guidance=0.3,
                            teacher_guidance_rule=rule, output_type="pt").images  # fmt: skip
    assert (run("eps_mix") - run("x0_lerp")).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match=r"Distillation\+\+ rule must be one of"):
        run("lerp")


def _teacher_and_student_calls(pipe, **settings):
    hook = UNetCalls(pipe.unet)
    try:
        images = pipe(PROMPT, num_inference_steps=4, generator=seeded(), teacher_guidance=0.3, output_type="latent",
                      **settings).images  # fmt: skip
    finally:
        hook.remove()
    teacher = [call for call in hook.calls if call[4]]
    return images, [int(call[1]) for call in teacher], len(hook.calls) - len(teacher)


@pytest.mark.parametrize("family", FAMILIES)
def test_distillpp_guide_sources_and_teacher_steps_reach_the_teacher_calls(students, family):
    """The control calls no teacher, the teacher at the student's input runs at the student's own timesteps, and m
    teacher steps are m teacher calls per guided step on a grid from the next student timestep."""
    pipe = students[family]
    plain, _, _ = _teacher_and_student_calls(pipe, teacher_guidance_rule="eps_mix")
    control, control_calls, student_calls = _teacher_and_student_calls(pipe, teacher_guidance_source="noise_only")
    assert control_calls == [] and student_calls == 4
    assert (control - plain).abs().max().item() > 1e-4  # the same injected noise, without the teacher's pull
    _, at_input_calls, _ = _teacher_and_student_calls(pipe, teacher_guidance_source="at_student_input")
    assert at_input_calls == [999, 749]  # the first 2 guided steps, at x_t and t
    stronger, stronger_calls, _ = _teacher_and_student_calls(pipe, teacher_refinement_steps=2)
    assert stronger_calls == [749, 374, 499, 250]  # from s = t_{i+1}: DDIM on round(s·(1 − k/2)), half to even
    assert (stronger - plain).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="guide source must be one of"):
        pipe(PROMPT, num_inference_steps=4, teacher_guidance=0.3, teacher_guidance_source="teacher")
    with pytest.raises(ValueError, match="teacher steps must be an integer ≥ 1"):
        pipe(PROMPT, num_inference_steps=4, teacher_guidance=0.3, teacher_refinement_steps=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_distillpp_teacher_is_the_base_unet_with_the_lora_disabled(bases, students, family):
    """Every teacher call runs with the adapters off and returns exactly the base UNet's x0; the student calls
    around it run with the LoRA on, and the LoRA's requires_grad flags are left as they were."""
    pipe = students[family]
    grads = {name: p.requires_grad for name, p in pipe.unet.named_parameters()}
    schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
    base_unet = build_tiny(family).unet
    hook = UNetCalls(pipe.unet)
    try:
        pipe(PROMPT, num_inference_steps=2, generator=seeded(), teacher_guidance=0.5, teacher_guided_steps=2,
             teacher_guidance_scale=3.0, output_type="latent")  # fmt: skip
    finally:
        hook.remove()
    teacher_calls = [call for call in hook.calls if call[4]]
    student_calls = [call for call in hook.calls if not call[4]]
    assert len(student_calls) == 2 and len(teacher_calls) == 2
    for sample, timestep, kwargs, output, _ in teacher_calls:
        assert sample.shape[0] == 2  # unconditional + conditional in one batch (teacher CFG)
        kwargs.pop("return_dict", None)
        with torch.no_grad():
            base_output = base_unet(sample, timestep, **kwargs).sample
        t = int(timestep)
        teacher_x0 = schedule.to_x0(output, sample, t)
        assert (teacher_x0 - schedule.to_x0(base_output, sample, t)).abs().max().item() <= 1e-5
    sample, timestep, kwargs, output, _ = student_calls[0]
    kwargs.pop("return_dict", None)
    with torch.no_grad():
        assert (base_unet(sample, timestep, **kwargs).sample - output).abs().max().item() > 1e-3
    assert {name: p.requires_grad for name, p in pipe.unet.named_parameters()} == grads


def test_distillpp_with_a_teacher_unet_component(bases):
    """A full-UNet student: the teacher is the ``teacher_unet`` component, called by Distillation++ only."""
    student_unet = add_random_lora(build_tiny("sd15").unet)
    student_unet.fuse_lora()
    student_unet.unload_lora()
    teacher_unet = build_tiny("sd15").unet
    pipe = load(bases["sd15"], "sd15", unet=student_unet, teacher_unet=teacher_unet)
    assert pipe.teacher_unet is teacher_unet
    hook = UNetCalls(teacher_unet)
    try:
        plain = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="pt").images
        assert hook.calls == []
        guided = pipe(PROMPT, num_inference_steps=2, generator=seeded(), teacher_guidance=0.5, output_type="pt").images
    finally:
        hook.remove()
    assert len(hook.calls) == 2  # the default: the authors' 2 guided steps
    assert (plain - guided).abs().max().item() > 1e-4


def test_distillpp_refuses_a_fused_lora(bases, runs):
    pipe = load(bases["sd15"], "sd15")
    pipe.load_lora_weights(str(runs["sd15"]))
    pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"fused .*unfuse_lora\(\)") as error:
        pipe(PROMPT, teacher_guidance=0.1)
    assert "\n" not in str(error.value)
    pipe.unfuse_lora()
    pipe(PROMPT, teacher_guidance=0.1, output_type="latent")


def test_distillpp_without_a_teacher_is_a_one_line_error(bases):
    pipe = load(bases["sd15"], "sd15")
    with pytest.raises(ValueError, match="needs a teacher") as error:
        pipe(PROMPT, teacher_guidance=0.1)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ LoRA sources and formats
@pytest.mark.parametrize("where", ["run", "lora-dir", "diffusers-file", "kohya-file"])
def test_lora_from_a_run_its_folder_or_either_file(bases, runs, students, where):
    run = runs["sd15"]
    source = {
        "run": run,
        "lora-dir": run / "lora",
        "diffusers-file": run / "lora" / "pytorch_lora_weights.safetensors",
        "kohya-file": run / "lora" / "fewstep_comfyui.safetensors",
    }[where]
    pipe = load(bases["sd15"], "sd15")
    pipe.load_lora_weights(str(source))
    expected = students["sd15"](PROMPT, num_inference_steps=2, generator=seeded(), output_type="pt").images
    images = pipe(PROMPT, num_inference_steps=2, generator=seeded(), output_type="pt").images
    assert (images - expected).abs().max().item() <= 1e-5


def test_ddim_sampler_equals_the_model_cards_stock_ddim_scheduler_recipe(bases, runs):
    """The card's plain-diffusers recipe for Progressive Distillation students: stock StableDiffusionPipeline +
    DDIMScheduler (trailing spacing, set_alpha_to_one=True) at guidance 0 samples as ``sampler="ddim"`` does."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    students = load(bases["sd15"], "sd15")
    students.load_lora_weights(str(runs["sd15"]))
    stock = StableDiffusionPipeline.from_pretrained(str(bases["sd15"]), safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(runs["sd15"] / "lora"), weight_name="pytorch_lora_weights.safetensors")
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    latents = torch.randn(1, 4, 16, 16, generator=seeded(3))
    for steps in (2, 4):
        ours = students(PROMPT, num_inference_steps=steps, sampler="ddim", latents=latents, output_type="pt").images
        theirs = stock(PROMPT, num_inference_steps=steps, guidance_scale=0, latents=latents, output_type="pt").images
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_dmd2_authors_kohya_lora_matches_lcm_scheduler_pipeline(tmp_path):
    """A LoRA in the format of DMD2's published SDXL LoRAs (diffusers' ``convert_state_dict_to_kohya``: kohya keys,
    alpha = rank, no metadata) loads through ``load_lora_weights``, and fewstep's pipeline then equals diffusers'
    StableDiffusionXLPipeline + LCMScheduler at DMD2's recommended settings."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet = add_random_lora(build_tiny("sdxl").unet, rank=4, alpha=4)
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name="generator").items()}
    save_file(convert_state_dict_to_kohya(peft_state), tmp_path / "dmd2_sdxl_4step_lora.safetensors")

    base = make_base_dir("sdxl", tmp_path / "base")
    pipe = load(base, "sdxl")
    pipe.load_lora_weights(str(tmp_path), weight_name="dmd2_sdxl_4step_lora.safetensors")
    reference = StableDiffusionXLPipeline.from_pretrained(str(base))
    reference.load_lora_weights(str(tmp_path), weight_name="dmd2_sdxl_4step_lora.safetensors")
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    for timesteps in ([999, 749, 499, 249], [399]):
        ours = pipe(PROMPT, timesteps=timesteps, generator=seeded(), output_type="pt").images
        theirs = reference(PROMPT, timesteps=timesteps, guidance_scale=0, generator=seeded(), output_type="pt").images
        assert (ours - theirs).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------ bad input
def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_lora_of_the_wrong_family_is_refused(bases, runs):
    sd15 = load(bases["sd15"], "sd15")
    message = one_line_error(lambda: sd15.load_lora_weights(str(runs["sdxl"])), "is for SDXL but this pipeline is SD1.5")
    assert str(runs["sdxl"]) in message
    sdxl = load(bases["sdxl"], "sdxl")
    one_line_error(lambda: sdxl.load_lora_weights(str(runs["sd15"] / "lora" / "fewstep_comfyui.safetensors")), "SD1.5")


def test_missing_lora_is_refused(bases, tmp_path):
    pipe = load(bases["sd15"], "sd15")
    missing = tmp_path / "no-such-run"
    one_line_error(lambda: pipe.load_lora_weights(str(missing)), f"LoRA '{missing}' does not exist")
    one_line_error(lambda: pipe.load_lora_weights(str(tmp_path)), "has no .safetensors file")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_inference_steps": 0}, "num_steps must be ≥ 1, got 0"),
        ({"timesteps": [499, 999]}, r"strictly descending"),
        ({"timesteps": [1000]}, r"\[1000\] must lie in"),
        ({"teacher_guidance": 1.5}, r"must be in \[0, 1\], got 1.5"),
        ({"teacher_guidance": -0.1}, r"got -0.1"),
        ({"teacher_guided_steps": -1}, r"Distillation\+\+ guided steps must be ≥ 0, got -1"),
        ({"sampler": "euler"}, "sampler must be one of few_step, ddim, got 'euler'"),
    ],
)
def test_bad_call_arguments_are_one_line_errors(students, kwargs, match):
    one_line_error(lambda: students["sd15"](PROMPT, **kwargs), match)


# ------------------------------------------------------------------------------------------ fewstep sample
def test_sample_command_writes_pngs(runs, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "out"
    code = main(["sample", "--lora", str(runs["sd15"]), "--prompt", PROMPT, "--prompt", "a dog", "--steps", "2",
                 "--num-images", "2", "--seed", "3", "--distillpp", "0.1", "--out", str(out)])  # fmt: skip
    assert code == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 4
    assert Image.open(written[0]).size == (32, 32)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(written[-1])


def test_sample_command_samples_a_lora_at_its_recorded_recipe(runs, tmp_path, capsys):
    run = run_with_recipe(runs["sd15"], tmp_path, {"method": "progressive", "timesteps": [999, 499], "sampler": "ddim"})
    code = main(["sample", "--lora", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "out")])
    assert code == 0
    assert "timesteps [999, 499], sampler ddim" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be ≥ 1, got 0"),
        (["--distillpp", "2"], "must be in [0, 1], got 2.0"),
        (["--timesteps", "999,abc"], "could not parse timesteps '999,abc'"),
    ],
)
def test_sample_command_bad_input(bases, runs, tmp_path, capsys, extra, message):
    args = ["sample", "--teacher", str(bases["sd15"]), "--lora", str(runs["sd15"]), "--prompt", PROMPT]
    assert main([*args, *extra, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_sample_command_missing_lora(bases, tmp_path, capsys):
    missing = tmp_path / "missing"
    args = ["sample", "--teacher", str(bases["sd15"]), "--lora", str(missing), "--prompt", PROMPT, "--out", str(tmp_path)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert f"LoRA '{missing}' does not exist" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("module, name", [("fewstep_sd", "FewStepSDPipeline"), ("fewstep_sdxl", "FewStepSDXLPipeline")])
def test_distillpp_rule_default_is_the_digits_sweeps_pick(module, name):
    """The pipelines, `fewstep sample` and the yardstick default to the rule the sweep chose (docs/sweeps.md)."""
    import importlib
    import inspect

    from fewstep.cli import build_parser
    from fewstep.digits.yardstick import DistillppSettings

    pipeline = getattr(importlib.import_module(f"fewstep.pipelines.{module}"), name)
    default_rule = inspect.signature(pipeline.__call__).parameters["teacher_guidance_rule"].default
    sample_args = build_parser().parse_args(["sample", "--lora", "x", "--prompt", "p"])
    assert default_rule == sample_args.distillpp_rule == DistillppSettings().rule == "eps_mix"
