"""fewstep's ComfyUI nodes (V3 schema): each is a schema plus a short ``execute`` calling fewstep.

Imports ComfyUI; the pack's ``comfy_entrypoint`` (the repository root's ``__init__.py``) imports this module.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .comfy_sampling import (
    FewStepKSAMPLER,
    Guider_DistillationPP,
    fewstep_sigmas,
    model_schedule,
    sample_latent,
    student_guider,
)
from .sigma_space import scheduler_timesteps
from ..core.distillpp import (GUIDE_SOURCES, RECOMMENDED_GUIDED_STEPS, RECOMMENDED_LAMBDA, RECOMMENDED_RULE,
                              RECOMMENDED_TEACHER_CFG, RULES)  # fmt: skip

CATEGORY = "sampling/fewstep"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _steps_input() -> io.Int.Input:
    return io.Int.Input(
        "steps", default=4, min=1, max=1000,
        tooltip="Student steps at DMD2's spacing: 1 → 999; 2 → 999, 499; 4 → 999, 749, 499, 249; "
        "8 → 999, 874, …, 124. Use the step count the model was distilled for.",
    )  # fmt: skip


def _first_timestep_input() -> io.Int.Input:
    return io.Int.Input(
        "first_timestep", default=999, min=0, max=999,
        tooltip="The first (conditioning) timestep. 999 for most students; 399 for DMD2's SDXL one-step model. "
        "Below 999 the steps are spaced evenly under it (4 steps from 399 → 399, 299, 199, 99).",
    )  # fmt: skip


SAMPLINGS = {"dmd2": "few_step", "ddim": "ddim"}  # the node's choice → fewstep's sampler name (pipelines' ``sampler``)


def _sampling_input() -> io.Combo.Input:
    return io.Combo.Input(
        "sampling", options=list(SAMPLINGS), default="dmd2", optional=True,
        tooltip="dmd2: predict x0, then re-noise it with fresh seeded noise (DMD2 and DMD students). ddim: "
        "deterministic DDIM (Progressive Distillation students). The LoRA's model card and fewstep_recipe.json "
        "say which.",
    )  # fmt: skip


def _timesteps_problem(steps, first_timestep, timesteps="") -> bool | str:
    """Validation shared by the nodes that pick timesteps: True, or the one-line reason they are invalid."""
    if steps is None or first_timestep is None or timesteps is None:
        return True  # linked from another node: checked when the node runs
    try:
        scheduler_timesteps(steps, first_timestep, timesteps)
    except ValueError as error:
        return str(error)
    return True


def _sigmas(model, steps: int, first_timestep: int, timesteps: str = ""):
    num_train_timesteps = model_schedule(model).num_train_timesteps
    return fewstep_sigmas(model, scheduler_timesteps(steps, first_timestep, timesteps, num_train_timesteps))


class FewStepScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepScheduler",
            display_name="FewStep Scheduler",
            category=CATEGORY,
            description="The exact timesteps a few-step student (DMD2, fewstep) was trained on, as SIGMAS through "
            "the model's own noise schedule. Feed FewStep Sampler through SamplerCustom(Advanced).",
            inputs=[
                io.Model.Input("model", tooltip="The student (or its base model): its noise schedule gives σ."),
                _steps_input(),
                _first_timestep_input(),
                io.String.Input(
                    "timesteps", default="", multiline=False, placeholder="e.g. 999,749,499,249",
                    tooltip="Custom timesteps, comma-separated, strictly descending, each in [0, 999]. "
                    "When filled, steps and first_timestep are ignored.",
                ),  # fmt: skip
            ],
            outputs=[io.Sigmas.Output(tooltip="σ of each timestep, then 0.")],
        )

    @classmethod
    def validate_inputs(cls, steps, first_timestep, timesteps) -> bool | str:
        return _timesteps_problem(steps, first_timestep, timesteps)

    @classmethod
    def execute(cls, model, steps, first_timestep, timesteps) -> io.NodeOutput:
        return io.NodeOutput(_sigmas(model, steps, first_timestep, timesteps))


class FewStepSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepSampler",
            display_name="FewStep Sampler",
            category=CATEGORY,
            description="DMD2's few-step rule: predict x0, then re-noise it to the next timestep with seeded noise "
            "(or deterministic DDIM for Progressive Distillation students). Starts from pure noise on an empty "
            "latent, also at a shifted first timestep. Use with FewStep Scheduler.",
            inputs=[_sampling_input()],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, sampling="dmd2") -> io.NodeOutput:
        return io.NodeOutput(FewStepKSAMPLER(SAMPLINGS[sampling]))


class FewStepKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepKSampler",
            display_name="FewStep KSampler",
            category=CATEGORY,
            description="One-node few-step sampling for DMD2/fewstep students (a LoRA on its base checkpoint, or a "
            "distilled checkpoint): FewStep Scheduler + FewStep Sampler at CFG 1.",
            inputs=[
                io.Model.Input("model", tooltip="The few-step student, e.g. the checkpoint with the fewstep LoRA."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seeds the initial noise and the noise added between steps."),
                _steps_input(),
                _first_timestep_input(),
                io.Conditioning.Input("positive", tooltip="The prompt."),
                io.Latent.Input("latent_image", tooltip="An Empty Latent Image (text-to-image)."),
                io.Conditioning.Input(
                    "negative", optional=True,
                    tooltip="Not used: distilled students run at CFG 1. Here so KSampler graphs wire up.",
                ),
                _sampling_input(),
            ],  # fmt: skip
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, steps, first_timestep, **_) -> bool | str:
        return _timesteps_problem(steps, first_timestep)

    @classmethod
    def execute(
        cls, model, seed, steps, first_timestep, positive, latent_image, negative=None, sampling="dmd2"
    ) -> io.NodeOutput:
        sigmas = _sigmas(model, steps, first_timestep)
        guider = student_guider(model, positive)
        return io.NodeOutput(sample_latent(guider, FewStepKSAMPLER(SAMPLINGS[sampling]), sigmas, latent_image, seed))


def _distillpp_inputs() -> list[io.Input]:
    return [
        io.Model.Input("student", tooltip="The few-step student: the teacher + a fewstep LoRA, or a distilled model."),
        io.Model.Input("teacher", tooltip="The base model the student was distilled from (same family: SD1.5, SDXL)."),
        io.Conditioning.Input("positive", tooltip="The prompt, for the student and the teacher."),
        io.Conditioning.Input("negative", tooltip="The teacher's negative prompt (its CFG)."),
        io.Float.Input(
            "teacher_guidance", default=RECOMMENDED_LAMBDA, min=0.0, max=1.0, step=0.01,
            tooltip="λ: how much the teacher corrects the student on the guided steps (see rule). 0 = the student "
            "alone. Default: the authors' published setting for DMD2 students (eps_mix, 0.01, 2 steps, teacher CFG "
            "7.5). eps_mix also injects noise of std ≈ 20.7·λ into the first x0: 0.15 (the digits sweep's pick) adds "
            "variety at a cost in prompt adherence; 0.3 and above broke its samples.",
        ),
        io.Int.Input("guided_steps", default=RECOMMENDED_GUIDED_STEPS, min=0, max=1000,
                     tooltip="How many of the first steps the teacher refines (the authors' DMD2 setting: 2)."),
        io.Float.Input("teacher_cfg", default=RECOMMENDED_TEACHER_CFG, min=0.0, max=100.0, step=0.1,
                       tooltip="The teacher's CFG scale (the authors': 7.5)."),
    ]  # fmt: skip


def _rule_input() -> io.Input:
    return io.Combo.Input(
        "rule", options=list(RULES), default=RECOMMENDED_RULE, optional=True,
        tooltip="eps_mix (default, the authors' code): the noise predictions are mixed, ε ← ε_student + "
        "λ·(ε_teacher − ε_student), and x0 is recomputed from the current latent, which also re-injects noise (more "
        "variety). x0_lerp (the paper): x0 ← (1 − λ)·student + λ·teacher; it made FD worse at every setting tried "
        "on the digits yardstick.",
    )  # fmt: skip


def _guide_inputs() -> list[io.Input]:
    """The ablations (optional, so older workflows load unchanged): where the teacher's x0 comes from, and how many
    DDIM steps the teacher takes to it."""
    return [
        io.Combo.Input(
            "guide", options=list(GUIDE_SOURCES), default="renoised", optional=True,
            tooltip="renoised (default, Distillation++): the teacher denoises the student's x0 re-noised to the next "
            "step. at_student_input: the teacher at the student's own latent and step (no fresh noise). noise_only: "
            "the control, no teacher call, only eps_mix's injected noise: compare with it to see what the teacher "
            "adds.",
        ),
        io.Int.Input(
            "teacher_steps", default=1, min=1, max=50, optional=True,
            tooltip="DDIM steps the teacher takes from its input to its x0 (1: the paper's single call, a blurry "
            "estimate). More steps give a sharper x0 to pull toward, at that many teacher passes per guided step.",
        ),
    ]  # fmt: skip


def _distillpp_guider(student, teacher, positive, negative, teacher_guidance, guided_steps, teacher_cfg, rule,
                      guide, teacher_steps):  # fmt: skip
    rule, guide, teacher_steps = rule or RECOMMENDED_RULE, guide or "renoised", teacher_steps or 1
    guider = Guider_DistillationPP(
        student, teacher, teacher_guidance, guided_steps, teacher_cfg, rule, guide, teacher_steps
    )
    guider.set_conds(positive, negative)
    return guider


class DistillationPPGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DistillationPPGuider",
            display_name="Distillation++ Guider",
            category=CATEGORY,
            description="Distillation++ (Park et al. 2024): on the first steps the teacher, with CFG, refines the "
            "student's x0. Runs the teacher's own weights even when the student is the teacher + a LoRA. "
            "Use with FewStep Sampler and FewStep Scheduler in SamplerCustomAdvanced.",
            inputs=[*_distillpp_inputs(), _rule_input(), *_guide_inputs()],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(
        cls, student, teacher, positive, negative, teacher_guidance, guided_steps, teacher_cfg, rule=None, guide=None,
        teacher_steps=None,
    ) -> io.NodeOutput:  # fmt: skip
        guider = _distillpp_guider(
            student, teacher, positive, negative, teacher_guidance, guided_steps, teacher_cfg, rule, guide,
            teacher_steps,
        )  # fmt: skip
        return io.NodeOutput(guider)


class DistillationPPKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DistillationPPKSampler",
            display_name="Distillation++ KSampler",
            category=CATEGORY,
            description="One-node Distillation++: FewStep KSampler with the teacher refining the first steps.",
            inputs=[
                *_distillpp_inputs(),
                io.Latent.Input("latent_image", tooltip="An Empty Latent Image (text-to-image)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seeds the initial noise and all noise added later."),
                _steps_input(),
                _first_timestep_input(),
                _rule_input(),
                *_guide_inputs(),
            ],  # fmt: skip
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, steps, first_timestep, **_) -> bool | str:
        return _timesteps_problem(steps, first_timestep)

    @classmethod
    def execute(
        cls, student, teacher, positive, negative, teacher_guidance, guided_steps, teacher_cfg, latent_image, seed,
        steps, first_timestep, rule=None, guide=None, teacher_steps=None,
    ) -> io.NodeOutput:  # fmt: skip
        guider = _distillpp_guider(
            student, teacher, positive, negative, teacher_guidance, guided_steps, teacher_cfg, rule, guide,
            teacher_steps,
        )  # fmt: skip
        sigmas = _sigmas(student, steps, first_timestep)
        return io.NodeOutput(sample_latent(guider, FewStepKSAMPLER(), sigmas, latent_image, seed))


NODES = [FewStepScheduler, FewStepSampler, FewStepKSampler, DistillationPPGuider, DistillationPPKSampler]


class FewStepExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
