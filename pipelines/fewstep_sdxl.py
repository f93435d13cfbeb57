"""fewstep's few-step Stable Diffusion XL pipeline: DMD2 sampling and Distillation++ teacher guidance.

    pipe = DiffusionPipeline.from_pretrained(BASE, custom_pipeline="<this file or a fewstep Hub repo>",
                                             trust_remote_code=True)
    pipe.load_lora_weights(RUN_DIR)            # a fewstep run, its lora/ folder, a .safetensors file or a Hub id
    image = pipe("a photo of a cat", num_inference_steps=4).images[0]
    image = pipe("a photo of a cat", timesteps=[399]).images[0]      # DMD2's one-step SDXL start
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

from typing import Callable

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

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


class FewStepSDXLPipeline(FewStepLoraMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline that samples a DMD2 few-step student and can refine it with its teacher.

    Components are StableDiffusionXLPipeline's plus an optional ``teacher_unet`` (for a full-UNet student, such as
    DMD2's one-step SDXL UNet; a LoRA student needs none: its teacher is the same UNet with the LoRA disabled).
    """

    family = "sdxl"
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->teacher_unet->vae"
    _optional_components = [
        "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder", "feature_extractor",
        "teacher_unet",
    ]  # fmt: skip

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        teacher_unet: UNet2DConditionModel | None = None,
    ):
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
            feature_extractor, force_zeros_for_empty_prompt, add_watermarker,
        )  # fmt: skip
        self.register_modules(teacher_unet=teacher_unet)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode; SDXL's fp16 VAE overflows, so it runs in fp32 when its config asks (``force_upcast``)."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        vae_dtype = next(iter(self.vae.post_quant_conv.parameters())).dtype
        has_mean = getattr(self.vae.config, "latents_mean", None) is not None
        has_std = getattr(self.vae.config, "latents_std", None) is not None
        if has_mean and has_std:
            mean = torch.tensor(self.vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(self.vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(vae_dtype), return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return image

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
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
            timesteps: explicit, strictly descending student timesteps, e.g. ``[399]`` for DMD2's one-step SDXL UNet.
            guidance_scale: CFG of the *student*; DMD2 students are distilled with guidance and run at 1 (off).
            negative_prompt: used by whichever CFG runs (the student's when ``guidance_scale > 1``, the teacher's
                under Distillation++); ignored with a warning when neither does. Without one the unconditional
                input is all zeros (``force_zeros_for_empty_prompt``), as in DMD2's SDXL training.
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
            ``StableDiffusionXLPipelineOutput`` (or a tuple when ``return_dict=False``).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        schedule = NoiseSchedule.from_config(dict(self.scheduler.config))

        # 1. Check inputs; find the teacher before any work is done
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, None, None,
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
        self._guidance_rescale = 0.0
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = None
        self._denoising_end = None
        self._num_timesteps = len(settings.timesteps)
        self._interrupt = False
        student_cfg = guidance_scale > 1.0
        if (negative_prompt is not None or negative_prompt_2 is not None) and not (student_cfg or teacher):
            logger.warning(
                "negative_prompt is ignored: the student runs at CFG 1 (guidance_scale=%s) and no teacher guidance "
                "is on", guidance_scale,
            )  # fmt: skip

        # 2. Define call parameters
        batch_size = batch_size_of(prompt, prompt_embeds)
        device = self._execution_device

        # 3. Encode input prompt (the unconditional half only when some CFG needs it)
        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, student_cfg or teacher, negative_prompt,
            negative_prompt_2, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip,
        )  # fmt: skip
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )  # fmt: skip
        add_time_ids = add_time_ids.to(device).repeat(prompt_embeds.shape[0], 1)
        cond = {
            "encoder_hidden_states": prompt_embeds,
            "added_cond_kwargs": {"text_embeds": pooled_prompt_embeds, "time_ids": add_time_ids},
        }
        uncond = None
        if negative_prompt_embeds is not None:
            uncond = {
                "encoder_hidden_states": negative_prompt_embeds,
                "added_cond_kwargs": {"text_embeds": negative_pooled_prompt_embeds, "time_ids": add_time_ids},
            }

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
        tensors = {"prompt_embeds": prompt_embeds, "add_text_embeds": pooled_prompt_embeds, "add_time_ids": add_time_ids}
        # [in-step: loop]
        with self.progress_bar(total=len(settings.timesteps)) as progress_bar:
            hook = step_hook(self, refine, callback_on_step_end, callback_on_step_end_tensor_inputs, tensors, progress_bar)
            latents = run_student(settings.sampler, student, latents, settings.timesteps, schedule, generator, hook)
        # [/in-step: loop]

        # 8. Decode, watermark, post-process
        if output_type == "latent":
            image = latents
        else:
            image = self._decode(latents)
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)
            image = self.image_processor.postprocess(image, output_type=output_type)

        # 9. Offload all models
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)
