"""fewstep's few-step Stable Diffusion 1.x/2.x pipeline: DMD2 sampling and Distillation++ teacher guidance.

    pipe = DiffusionPipeline.from_pretrained(BASE, custom_pipeline="<this file or a fewstep Hub repo>",
                                             trust_remote_code=True)
    pipe.load_lora_weights(RUN_DIR)            # a fewstep run, its lora/ folder, a .safetensors file or a Hub id
    image = pipe("a photo of a cat", num_inference_steps=1).images[0]
    image = pipe("a photo of a cat", num_inference_steps=4, teacher_guidance=0.01).images[0]   # Distillation++

Sampling is fewstep's math layer (``fewstep.core.sample_few_step``): x0 = G(x_t, t_i), then re-noise x0 to
t_{i+1} with fresh noise (DMD2's rule, the same as LCMScheduler's at these timesteps); a Progressive Distillation
student samples with deterministic DDIM (``sampler="ddim"``). A fewstep LoRA's ``fewstep_recipe.json`` sets both
defaults (timesteps, sampler) when it is loaded. The pipeline's scheduler only supplies ᾱ_t and the prediction
type (ε or v). This file is uploaded to the Hub as ``pipeline.py`` by
``fewstep push``, with the fewstep modules it imports copied next to it and the imports made relative, so
the pushed repo works without fewstep installed. It holds exactly one ``DiffusionPipeline`` subclass, as
diffusers requires; what both pipelines share lives in ``common.py``, and the few blocks that must stay inline are
marked ``# [in-step: NAME]`` and kept identical in both files by tests/test_pipelines_in_step.py.
"""

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput, StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from fewstep.core.distillpp import (RECOMMENDED_GUIDED_STEPS, RECOMMENDED_RULE, RECOMMENDED_TEACHER_CFG,
                                    check_guide_source, check_teacher_guidance, distillpp_refiner)  # fmt: skip
from fewstep.core.sampling import resolve_sampling
from fewstep.core.schedule import NoiseSchedule
from fewstep.pipelines.common import (
    FewStepLoraMixin,
    batch_size_of,
    initial_noise,
    run_student,
    step_hook,
    teacher_unet_and_context,
    unet_denoiser,
    uses_teacher,
)

logger = logging.get_logger(__name__)


class FewStepSDPipeline(FewStepLoraMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline that samples a DMD2 few-step student and can refine it with its teacher.

    Components are StableDiffusionPipeline's plus an optional ``teacher_unet`` (for a full-UNet student; a LoRA
    student needs none: its teacher is the same UNet with the LoRA disabled).
    """

    family = "sd15"
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->teacher_unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "teacher_unet"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        teacher_unet: UNet2DConditionModel | None = None,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder,
            requires_safety_checker,
        )  # fmt: skip
        self.register_modules(teacher_unet=teacher_unet)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        teacher_guidance: float = 0.0,
        teacher_guided_steps: int = RECOMMENDED_GUIDED_STEPS,
        teacher_guidance_scale: float = RECOMMENDED_TEACHER_CFG,
        teacher_guidance_rule: str = RECOMMENDED_RULE,
        teacher_guidance_source: str = "renoised",
        teacher_refinement_steps: int = 1,
        sampler: str | None = None,
    ):
        """Generate images with the few-step student.

        Args:
            num_inference_steps: student steps; DMD2's timesteps ``range(999, 0, -1000 // N)`` (1 → [999],
                4 → [999, 749, 499, 249]). Ignored when ``timesteps`` is given. Default: the timesteps recorded
                with the loaded fewstep LoRA (its ``fewstep_recipe.json``), else 1 step.
            timesteps: explicit, strictly descending student timesteps, e.g. ``[399]`` for a shifted one-step start.
            guidance_scale: CFG of the *student*; DMD2 students are distilled with guidance and run at 1 (off).
            negative_prompt: used by whichever CFG runs (the student's when ``guidance_scale > 1``, the teacher's
                under Distillation++); ignored with a warning when neither does.
            latents: the initial noise (unit variance; it is not scaled by the scheduler's ``init_noise_sigma``).
            teacher_guidance: Distillation++ λ in [0, 1]; 0 = off. What it weighs depends on the rule. The authors'
                published DMD2 setting is 0.01 (with the defaults below: 2 guided steps, teacher CFG 7.5, the
                negative prompt as the teacher's unconditional branch).
            teacher_guided_steps: the first K student steps get teacher guidance (default 2, the authors').
            teacher_guidance_scale: the teacher's CFG scale w (default 7.5, the authors').
            teacher_guidance_rule: "eps_mix" (default; the authors' code: ε ← ε_student + λ·(ε_teacher −
                ε_student), x̂0 recomputed from x_t) or "x0_lerp" (the paper: x̂0 ← lerp(x̂0_student, x̂0_teacher,
                λ)). eps_mix also injects noise of std ≈ 20.7·λ into the first x̂0 (core/distillpp.py): on the
                digits yardstick λ = 0.15 on one step lowered a 4-step student's FD by 30% at 0.02 less accuracy,
                mostly through that noise; x0_lerp made FD worse at every setting (docs/sweeps.md).
            teacher_guidance_source: where the teacher's x̂0 comes from: "renoised" (default, Distillation++: the
                teacher denoises the student's x̂0 re-noised to the next timestep), "at_student_input" (the teacher at
                the student's own x_t and t, no fresh noise: then eps_mix is exactly a lerp) or "noise_only" (the
                control: the rule's fresh noise and no teacher call, to tell what the teacher adds from what eps_mix's
                injected noise does).
            teacher_refinement_steps: m ≥ 1 deterministic DDIM teacher steps from its input to its x̂0 (default 1, the
                paper's single call, which gives the teacher's blurry one-step estimate; m > 1 costs m teacher
                passes per guided step and gives a sharper x̂0 to pull toward).
            sampler: "few_step" (DMD2's rule: x0, then fresh noise to the next timestep; DMD and DMD2 students) or
                "ddim" (deterministic DDIM; Progressive Distillation students). Default: the loaded fewstep LoRA's
                recorded sampler, else "few_step".
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` after each step; ``tensors["latents"]``
                is the step's x0 estimate and a returned ``"latents"`` replaces it.
        Returns:
            ``StableDiffusionPipelineOutput`` (or a tuple when ``return_dict=False``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        schedule = NoiseSchedule.from_config(dict(self.scheduler.config))

        # 1. Check inputs; find the teacher before any work is done
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds, None, None,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        # [in-step: settings]
        settings = resolve_sampling(
            num_inference_steps, timesteps, sampler, getattr(self, "fewstep_recipe", None), schedule.num_train_timesteps
        )
        check_teacher_guidance(teacher_guidance, teacher_guided_steps, teacher_guidance_rule, teacher_guidance_scale)
        check_guide_source(teacher_guidance_source, teacher_refinement_steps)
        teacher = uses_teacher(teacher_guidance, teacher_guided_steps)
        teacher_unet, teacher_context = teacher_unet_and_context(self) if teacher else (None, None)
        # [/in-step: settings]
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._num_timesteps = len(settings.timesteps)
        self._interrupt = False
        student_cfg = guidance_scale > 1.0
        if negative_prompt is not None and not (student_cfg or teacher):
            logger.warning(
                "negative_prompt is ignored: the student runs at CFG 1 (guidance_scale=%s) and no teacher guidance "
                "is on", guidance_scale,
            )  # fmt: skip

        # 2. Define call parameters
        batch_size = batch_size_of(prompt, prompt_embeds)
        device = self._execution_device

        # 3. Encode input prompt (the unconditional half only when some CFG needs it)
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, student_cfg or teacher, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=clip_skip,
        )  # fmt: skip
        cond = {"encoder_hidden_states": prompt_embeds, "cross_attention_kwargs": cross_attention_kwargs}
        uncond = None
        if negative_prompt_embeds is not None:
            uncond = {"encoder_hidden_states": negative_prompt_embeds, "cross_attention_kwargs": cross_attention_kwargs}

        # 4. Prepare timesteps (already done: ``settings.timesteps``)

        # 5. Prepare the initial noise: unit variance at the first student timestep, as in DMD2's training
        latents = initial_noise(
            self, batch_size * num_images_per_prompt, height, width, generator, latents, device, prompt_embeds.dtype
        )

        # 6. Denoisers: the student, and the teacher of Distillation++ (base UNet with the LoRA off, or teacher_unet)
        # [in-step: denoisers]
        student = unet_denoiser(self.unet, schedule, cond, uncond, guidance_scale)
        refine = None
        if teacher:
            teacher_denoise = unet_denoiser(teacher_unet, schedule, cond, uncond, teacher_guidance_scale, teacher_context)
            refine = distillpp_refiner(
                teacher_denoise, settings.timesteps, float(teacher_guidance), teacher_guided_steps, schedule,
                generator, teacher_guidance_rule, teacher_guidance_source, teacher_refinement_steps,
            )
        # [/in-step: denoisers]

        # 7. Few-step sampling loop (fewstep.core)
        tensors = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        # [in-step: loop]
        with self.progress_bar(total=len(settings.timesteps)) as progress_bar:
            hook = step_hook(self, refine, callback_on_step_end, callback_on_step_end_tensor_inputs, tensors, progress_bar)
            latents = run_student(settings.sampler, student, latents, settings.timesteps, schedule, generator, hook)
        # [/in-step: loop]

        # 8. Decode, safety check, post-process
        has_nsfw_concept = None
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not nsfw for nsfw in has_nsfw_concept]
        if output_type != "latent":
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # 9. Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
