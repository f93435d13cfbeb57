"""What ``fewstep eval --prompts`` samples: one row of images per setting, on the same prompts and initial noise.

Rows (each a small class with ``name``, ``describe()`` and ``sample(denoisers, noise, generator)``):

- :class:`TeacherRow`: the teacher, N deterministic DDIM steps ("trailing" timesteps) with CFG: the reference;
- :class:`StudentRow`: the student LoRA at the timesteps and with the sampler its ``fewstep_recipe.json`` records
  (DMD2's "predict x0, re-noise" rule, or DDIM for a Progressive Distillation student), CFG 1;
- :class:`DistillppRow`: the student with Distillation++ (Park et al. 2024; ``core.distillpp``): the teacher —
  the same UNet with the LoRA off — refines the first steps; and beside it its noise-only control (the same rule,
  λ and steps with the rule's injected noise and no teacher call), so a gain from ``eps_mix``'s noise is not read
  as the teacher's.

All sampling is ``fewstep.core`` over one UNet that carries the student as LoRA adapter :data:`STUDENT_ADAPTER`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ...core.distillpp import (RECOMMENDED_GUIDED_STEPS, RECOMMENDED_LAMBDA, RECOMMENDED_RULE,
                               RECOMMENDED_TEACHER_CFG, check_guide_source, check_teacher_guidance,
                               distillpp_refiner)  # fmt: skip
from ...core.sampling import Denoiser, Refiner, ddim_timesteps, sample_ddim, sample_few_step
from ..loop.networks import TextConditioning, cfg_x0, unet_x0

STUDENT_ADAPTER = "student"


# ------------------------------------------------------------------------------------------ the UNet as denoisers
@contextlib.contextmanager
def student_lora(unet, enabled: bool, missing: str = "the student row needs a student LoRA; pass --lora"):
    """Run the UNet with the student LoRA on (the student) or off (its base: the teacher); ``missing`` is the error
    when the student is asked for and no LoRA is loaded."""
    if not getattr(unet, "peft_config", None):
        if enabled:
            raise ValueError(missing)
        yield
        return
    if enabled:
        unet.enable_adapters()
    else:
        unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class Denoisers:
    """One batch's ``denoise(x_t, t) -> x0`` callables: the student (LoRA on, no CFG) and the teacher (LoRA off,
    CFG ``u + w(c − u)`` in x0 space, both halves in one UNet call)."""

    def __init__(self, unet, schedule, cond: TextConditioning, uncond: TextConditioning):
        self.unet, self.schedule, self.cond, self.uncond = unet, schedule, cond, uncond

    def _x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        return unet_x0(self.unet, self.schedule, x_t, t, cond)

    def student(self) -> Denoiser:
        def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
            with student_lora(self.unet, True):
                return self._x0(x_t, torch.full((x_t.shape[0],), t, device=x_t.device), self.cond)

        return denoise

    def teacher(self, guidance_scale: float) -> Denoiser:
        def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
            timestep = torch.full((x_t.shape[0],), t, device=x_t.device)
            with student_lora(self.unet, False):
                return cfg_x0(self._x0, x_t, timestep, self.cond, self.uncond, guidance_scale)

        return denoise


# ------------------------------------------------------------------------------------------ rows
@dataclass(frozen=True)
class TeacherRow:
    steps: int
    guidance_scale: float

    @property
    def name(self) -> str:
        return f"teacher_{self.steps}"

    def describe(self) -> str:
        return f"teacher, {self.steps} DDIM steps, CFG {self.guidance_scale:g}"

    def sample(self, nets: Denoisers, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        timesteps = ddim_timesteps(self.steps, nets.schedule.num_train_timesteps)
        return sample_ddim(nets.teacher(self.guidance_scale), noise, timesteps, nets.schedule)


@dataclass(frozen=True)
class StudentRow:
    timesteps: tuple[int, ...]
    sampler: str = "few_step"  # core.sampling.SAMPLERS
    name: str = "student"

    def describe(self) -> str:
        rule = "DDIM" if self.sampler == "ddim" else "DMD2's re-noising rule"
        return f"student, timesteps {list(self.timesteps)}, {rule}, CFG 1"

    def sample(self, nets: Denoisers, noise: torch.Tensor, generator: torch.Generator,
               refine: Refiner | None = None) -> torch.Tensor:  # fmt: skip
        timesteps, student = list(self.timesteps), nets.student()
        if self.sampler == "ddim":
            return sample_ddim(student, noise, timesteps, nets.schedule, refine=refine)
        return sample_few_step(student, noise, timesteps, nets.schedule, generator, refine=refine)


DISTILLPP_KEYS = {"lam": "lam", "lambda": "lam", "steps": "guided_steps", "guided_steps": "guided_steps",
                  "rule": "rule", "cfg": "teacher_guidance_scale", "teacher_cfg": "teacher_guidance_scale",
                  "teacher_steps": "teacher_steps"}  # fmt: skip
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class DistillppSpec:
    """One ``--distillpp NAME:key=value,...`` (defaults: the authors' published DMD2 setting, ``RECOMMENDED_*``)."""

    name: str = "distillpp"
    lam: float = RECOMMENDED_LAMBDA  # the rule's step size λ
    guided_steps: int = RECOMMENDED_GUIDED_STEPS  # the first K student steps are refined
    rule: str = RECOMMENDED_RULE  # "eps_mix" (the authors' code) or "x0_lerp" (the paper)
    teacher_guidance_scale: float = RECOMMENDED_TEACHER_CFG  # the guiding teacher's CFG
    teacher_steps: int = 1  # DDIM steps of the teacher from x_s to its x̂0 (1: the paper's single call)

    def describe(self) -> str:
        text = f"{self.rule} λ={self.lam:g} on {self.guided_steps} step(s)"
        text += f", teacher CFG {self.teacher_guidance_scale:g}"
        return text + (f", teacher {self.teacher_steps} DDIM steps" if self.teacher_steps > 1 else "")


def parse_distillpp(spec: str, default_name: str = "distillpp") -> DistillppSpec:
    """``NAME:lam=0.01,steps=2,rule=eps_mix,cfg=7.5,teacher_steps=1`` (every part optional) → :class:`DistillppSpec`;
    errors quote the spec."""
    name, _, settings = spec.partition(":") if ":" in spec or "=" not in spec else ("", "", spec)
    name = name.strip() or default_name
    if not ROW_NAME.fullmatch(name):
        raise ValueError(f"--distillpp {spec!r}: the row name {name!r} must be letters, digits, '_', '-' or '.'")
    values: dict = {}
    for item in filter(None, (part.strip() for part in settings.split(","))):
        key, equals, value = item.partition("=")
        if not equals or key.strip() not in DISTILLPP_KEYS:
            raise ValueError(f"--distillpp {spec!r}: {item!r} is not one of {', '.join(DISTILLPP_KEYS)} = value")
        field_name = DISTILLPP_KEYS[key.strip()]
        try:
            values[field_name] = value.strip() if field_name == "rule" else _number(field_name, value)
        except ValueError:
            raise ValueError(f"--distillpp {spec!r}: {key.strip()} must be a number, got {value.strip()!r}") from None
    parsed = DistillppSpec(name, **values)
    try:
        check_teacher_guidance(parsed.lam, parsed.guided_steps, parsed.rule, parsed.teacher_guidance_scale)
        check_guide_source("renoised", parsed.teacher_steps)
    except ValueError as error:
        raise ValueError(f"--distillpp {spec!r}: {error}") from None
    return parsed


def _number(field_name: str, text: str):
    return int(text) if field_name in ("guided_steps", "teacher_steps") else float(text)


@dataclass(frozen=True)
class DistillppRow:
    spec: DistillppSpec
    student: StudentRow
    control: bool = False  # the noise-only guide (core.distillpp's "noise_only"): no teacher call

    @property
    def name(self) -> str:
        return f"{self.spec.name}_control" if self.control else self.spec.name

    def describe(self) -> str:
        if self.control:
            return f"control of {self.spec.name}: the same rule's noise, no teacher call"
        return f"student + Distillation++ ({self.spec.describe()})"

    def sample(self, nets: Denoisers, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = self.spec
        refine = distillpp_refiner(
            nets.teacher(s.teacher_guidance_scale), list(self.student.timesteps), s.lam, s.guided_steps,
            nets.schedule, generator, s.rule, "noise_only" if self.control else "renoised", s.teacher_steps,
        )  # fmt: skip
        return self.student.sample(nets, noise, generator, refine)


def distillpp_rows(specs: list[DistillppSpec], student: StudentRow) -> list[DistillppRow]:
    """Each Distillation++ row, its noise-only control beside it."""
    return [DistillppRow(spec, student, control) for spec in specs for control in (False, True)]


# ------------------------------------------------------------------------------------------ sampling a row
@dataclass
class SDModels:
    """A teacher pipeline (the student LoRA on its UNet as :data:`STUDENT_ADAPTER`, if any) as the rows use it."""

    pipe: object
    family: str  # "sd15" or "sdxl"
    resolution: int
    schedule: object = field(init=False)
    uncond: TextConditioning = field(init=False)

    def __post_init__(self):
        from ..teacher import loading as teachers

        self.schedule = teachers.teacher_schedule(self.pipe).to(self.pipe.unet.device)
        self.uncond = teachers.unconditional(self.pipe, self.family, self.resolution)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        from ..teacher.loading import vae_scale_factor

        side = self.resolution // vae_scale_factor(self.pipe)
        return (self.pipe.unet.config.in_channels, side, side)

    def denoisers(self, prompts: list[str]) -> Denoisers:
        from ..teacher.loading import encode_prompts

        cond = encode_prompts(self.pipe, self.family, prompts, self.resolution)
        device = self.pipe.unet.device
        return Denoisers(self.pipe.unet, self.schedule, cond.to(device), self.uncond.to(device))


@torch.no_grad()
def sample_batches(models: SDModels, row, prompts: list[str], images_per_prompt: int, seed: int,
                   batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:  # fmt: skip
    """A row's images, batch by batch: ``(prompt index of each image, images (B, 3, H, W) in [0, 1])``.

    Image i shows prompt ``i // images_per_prompt``. Every row draws the same initial noise (one generator seeded
    with ``seed``, drawn batch after batch), and its re-noising from a second generator seeded with ``seed + 1``.
    """
    from ..teacher.loading import decode_latents

    noise_generator, generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    total = len(prompts) * images_per_prompt
    for start in range(0, total, batch_size):
        indices = [i // images_per_prompt for i in range(start, min(start + batch_size, total))]
        noise = torch.randn((len(indices), *models.latent_shape), generator=noise_generator)
        nets = models.denoisers([prompts[i] for i in indices])
        latents = row.sample(nets, noise.to(models.pipe.unet.device), generator)
        yield indices, decode_latents(models.pipe.vae, latents)
