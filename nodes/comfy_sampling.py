"""fewstep's samplers inside ComfyUI's sampling machinery: a KSAMPLER for DMD2's rule and a Distillation++ GUIDER.

Imports ComfyUI; only the node pack's entry point imports this module. The math is ``fewstep.core``'s, reached
through the sigma-space adapter in ``sigma_space``.
"""

from __future__ import annotations

import comfy.hooks
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..core.distillpp import RECOMMENDED_RULE, check_guide_source, check_teacher_guidance, distillpp_refiner
from ..core.schedule import NoiseSchedule
from .sigma_space import sample_sigma_space, schedule_from_sigmas, step_timesteps, vp_denoiser

# The FewStep sampler's noise generator, handed to the Distillation++ guider through model_options so that one
# seeded stream gives the teacher's and the sampler's re-noising, in the order core.sample_distillpp draws them.
GENERATOR_OPTION = "fewstep_generator"


def discrete_schedule(model_sampling) -> NoiseSchedule:
    """ᾱ_t of a discrete-time VP model (SD1.5, SDXL and their fine-tunes, ε or v), from its ``model_sampling``."""
    kinds = comfy.model_sampling
    discrete = isinstance(model_sampling, kinds.ModelSamplingDiscrete)
    discrete &= not isinstance(model_sampling, kinds.ModelSamplingDiscreteEDM)
    variance_preserving = isinstance(model_sampling, kinds.EPS) and not isinstance(model_sampling, kinds.EDM)
    if not (discrete and variance_preserving):
        raise ValueError(
            f"fewstep samples discrete-time diffusion models (SD1.5, SDXL: ε or v prediction); this model's "
            f"sampling is {type(model_sampling).__name__}"
        )
    return schedule_from_sigmas(model_sampling.sigmas)


def model_schedule(model) -> NoiseSchedule:
    """:func:`discrete_schedule` of a MODEL (a ModelPatcher)."""
    return discrete_schedule(model.get_model_object("model_sampling"))


@torch.no_grad()
def sample_fewstep(model, x, sigmas, extra_args=None, callback=None, disable=None, sampler="few_step"):
    """k-diffusion sampler function: DMD2's x0-then-re-noise rule with noise seeded by the run's seed, or
    (``sampler="ddim"``) deterministic DDIM for Progressive Distillation students."""
    extra_args = {} if extra_args is None else extra_args
    if len(sigmas) < 2:
        return x
    schedule = discrete_schedule(model.inner_model.inner_model.model_sampling)
    timesteps = step_timesteps(sigmas, schedule)
    generator = torch.Generator().manual_seed(extra_args.get("seed") or 0)
    extra_args.setdefault("model_options", {})[GENERATOR_OPTION] = generator

    def on_step(i, t, x0):
        if callback is not None:
            callback({"x": x0, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})

    model_x0 = lambda x_sigma, sigma: model(x_sigma, sigma, **extra_args)
    return sample_sigma_space(model_x0, x, sigmas, timesteps, schedule, generator, callback=on_step, sampler=sampler)


class FewStepKSAMPLER(comfy.samplers.KSAMPLER):
    """ComfyUI's KSAMPLER running :func:`sample_fewstep`, started from pure noise on an empty latent.

    ComfyUI scales the initial noise by sqrt(1 + σ0²) (pure noise in x_t) only when σ0 is the schedule's maximum
    and by σ0 otherwise; a student trained from pure noise at a shifted first timestep (DMD2's SDXL one-step
    t = 399) would see noise of std 0.76 instead of 1. With a non-empty latent (img2img) ComfyUI's rule stands.
    """

    def __init__(self, sampler: str = "few_step"):
        super().__init__(sample_fewstep, extra_options={"sampler": sampler})
        self.pure_noise_start = True

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        self.pure_noise_start = latent_image is None or torch.count_nonzero(latent_image) == 0
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def max_denoise(self, model_wrap, sigmas):
        return self.pure_noise_start or super().max_denoise(model_wrap, sigmas)


def model_family(model) -> str:
    """The model's architecture as ComfyUI names it (``SD15``, ``SDXL``, ...)."""
    return type(model.model.model_config).__name__


class _PatchesHook(comfy.hooks.WeightHook):
    """A WeightHook holding ModelPatcher weight patches as they are (any strength, offset or function)."""

    def __init__(self, patches: dict[str, list[tuple]] | None = None):
        super().__init__()
        self.patches = patches or {}

    def add_hook_patches(self, model, model_options, target_dict, registered):
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        for key, key_patches in self.patches.items():
            for strength_patch, value, strength_model, offset, function in key_patches:
                name = key if offset is None and function is None else (key, offset, function)
                model.add_hook_patches(self, {name: value}, strength_patch, strength_model)
        registered.add(self)
        return True

    def clone(self):
        c = super().clone()
        c.patches = self.patches
        return c


def student_patches_hook(student, teacher) -> comfy.hooks.HookGroup | None:
    """The student's weight patches on top of the teacher's, as a hook group (None if it has none).

    A LoRA student is a clone of the teacher's ModelPatcher: both wrap one set of weights, which ComfyUI patches
    in place for whichever is loaded. Sampling the teacher's clone and attaching the student's extra patches to the
    student's conditioning makes ComfyUI swap them in for the student's passes only.
    """
    if student.object_patches.keys() != teacher.object_patches.keys() or any(
        student.object_patches[k] is not teacher.object_patches[k] for k in teacher.object_patches
    ):
        raise ValueError(
            "the student MODEL shares the teacher's weights but has other model patches (e.g. ModelSampling*); "
            "apply them to the teacher before the student's LoRA"
        )
    extra = {}
    for key, patches in student.patches.items():
        base = teacher.patches.get(key, [])
        if len(patches) < len(base) or any(a is not b for a, b in zip(patches, base)):
            raise ValueError(
                f"the student MODEL shares the teacher's weights but not the teacher's patch on {key}; load the "
                "teacher's LoRAs before the student's LoRA so that the student = teacher + its own LoRA"
            )
        if len(patches) > len(base):
            extra[key] = patches[len(base) :]
    missing = [key for key in teacher.patches if key not in student.patches]
    if missing:
        raise ValueError(f"the teacher MODEL has a patch on {missing[0]} that the student lacks; patch both alike")
    if not extra:
        return None
    group = comfy.hooks.HookGroup()
    group.add(_PatchesHook(extra))
    return group


class Guider_DistillationPP(comfy.samplers.CFGGuider):
    """Distillation++ (Park, Lee & Ye 2024): the teacher refines the student's x0 on the first guided steps.

    The student runs at CFG 1 on ``positive``; on each of the first ``guided_steps`` steps its x0 is re-noised to
    the next step's timestep and denoised by the teacher with CFG ``teacher_cfg`` (``fewstep.core.distillpp``),
    and the noise predictions are mixed (rule ``eps_mix``, the default) or ``x0 ← lerp(x0_student, x0_teacher, λ)``
    (``x0_lerp``). ``source`` and ``teacher_steps`` choose where the teacher's x̂0 comes from (the re-noised x̂0,
    the student's own input, or no teacher: the noise-only control) and how many DDIM steps it takes to get there
    (``fewstep.core.distillpp.guide_x0``). The teacher's own weights run even when the student is the teacher plus a LoRA (see
    :func:`student_patches_hook`); a student with separate weights loads next to the teacher.
    """

    def __init__(
        self,
        student,
        teacher,
        teacher_guidance: float,
        guided_steps: int,
        teacher_cfg: float,
        rule: str = RECOMMENDED_RULE,
        source: str = "renoised",
        teacher_steps: int = 1,
    ):
        check_teacher_guidance(teacher_guidance, guided_steps, rule, teacher_cfg)
        check_guide_source(source, teacher_steps)
        self.rule, self.source, self.teacher_steps = rule, source, teacher_steps
        if model_family(student) != model_family(teacher):
            raise ValueError(
                f"the student is {model_family(student)} but the teacher is {model_family(teacher)}: "
                "Distillation++ needs the teacher the student was distilled from"
            )
        for model in (student, teacher):
            model_schedule(model)  # discrete VP models only
        if student.is_clone(teacher):
            self.student_hooks, self.teacher = student_patches_hook(student, teacher), None
            super().__init__(teacher.clone())
        else:
            self.student_hooks, self.teacher = None, teacher
            super().__init__(student.clone())
            self.model_patcher.set_additional_models("fewstep_teacher", [teacher])
        self.teacher_guidance, self.guided_steps, self.teacher_cfg = teacher_guidance, guided_steps, teacher_cfg

    def set_conds(self, positive, negative):
        student_positive = comfy.hooks.set_hooks_for_conditioning(positive, self.student_hooks)
        self.inner_set_conds({"positive": student_positive, "teacher_positive": positive, "teacher_negative": negative})

    def outer_sample(self, *args, **kwargs):
        # A teacher with its own weights is loaded as an additional model; it must be its weights' current patcher.
        if self.teacher is not None:
            self.teacher.pre_run()
        try:
            return super().outer_sample(*args, **kwargs)
        finally:
            if self.teacher is not None:
                self.teacher.cleanup()

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        self.schedule = discrete_schedule(self.inner_model.model_sampling)
        self.timesteps = step_timesteps(sigmas, self.schedule)
        self.run_generator = torch.Generator().manual_seed(seed or 0)
        return super().inner_sample(
            noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed
        )

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        x0 = comfy.samplers.sampling_function(
            self.inner_model, x, timestep, None, self.conds["positive"], 1.0, model_options=model_options, seed=seed
        )
        t = int(self.inner_model.model_sampling.timestep(timestep[:1]).item())
        if t not in self.timesteps:  # a sampler evaluating between the schedule's steps: no refinement there
            return x0
        generator = model_options.get(GENERATOR_OPTION, self.run_generator)
        refine = distillpp_refiner(
            self.teacher_denoiser(model_options, seed), self.timesteps, self.teacher_guidance, self.guided_steps,
            self.schedule, generator, self.rule, self.source, self.teacher_steps,
        )  # fmt: skip
        if refine is None:
            return x0
        alpha_t, _ = self.schedule.coefficients(t, x)  # ComfyUI's x is x_t / α_t (VE scaling); the rule wants x_t
        return refine(x0, self.timesteps.index(t), t, x * alpha_t)

    def teacher_denoiser(self, model_options, seed):
        """The teacher with CFG as fewstep's ``denoise(x_t, t) -> x0``."""
        if self.teacher is None:
            model, options = self.inner_model, model_options
        else:
            model = self.teacher.model
            options = comfy.model_patcher.create_model_options_clone(self.teacher.model_options)

        def teacher_x0(x, sigma):
            return comfy.samplers.sampling_function(
                model, x, sigma, self.conds["teacher_negative"], self.conds["teacher_positive"], self.teacher_cfg,
                model_options=options, seed=seed,
            )  # fmt: skip

        return vp_denoiser(teacher_x0, self.schedule)


def fewstep_sigmas(model, timesteps: list[int]) -> torch.Tensor:
    """SIGMAS for the given timesteps through the model's own ``model_sampling``, ending at 0 (clean)."""
    model_sampling = model.get_model_object("model_sampling")
    num_train_timesteps = len(model_sampling.sigmas)
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(f"timestep {timesteps[0]} is outside this model's [0, {num_train_timesteps - 1}]")
    sigmas = model_sampling.sigma(torch.tensor(timesteps, dtype=torch.float32))
    return torch.cat([sigmas.float().cpu(), sigmas.new_zeros(1).float().cpu()])


def sample_latent(guider, sampler, sigmas, latent: dict, seed: int) -> dict:
    """Sample a LATENT with a guider, a sampler and SIGMAS from seeded noise (what SamplerCustomAdvanced does)."""
    latent_image = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(guider.model_patcher, sigmas.shape[-1] - 1, {})
    samples = guider.sample(
        noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )  # fmt: skip
    return {**latent, "samples": samples.to(comfy.model_management.intermediate_device())}


def student_guider(model, positive):
    """The plain student guider: CFG 1 on ``positive`` (a negative would not be evaluated at CFG 1)."""
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})
    guider.set_cfg(1.0)
    return guider

