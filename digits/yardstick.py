"""The quality yardstick on the digits teacher: FD (an FID analogue), prompt accuracy (a CLIP-score analogue) and
variety (precision, recall, density and coverage).

A small CNN digit classifier is trained on the real train split (cached like the teacher). For each row, N
generated images (N/10 per digit, prompt "a handwritten digit <word>") are scored by:

* **FD**: the Fréchet distance between the Gaussian statistics of the classifier's penultimate features of the
  generated images and of the held-out real images, ``|μ₁−μ₂|² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½)``;
* **accuracy**: the fraction of generated images the classifier reads as the prompted digit;
* **precision / recall** (Kynkäänniemi et al. 2019) and **density / coverage** (Naeem et al. 2020) in the same
  feature space against the same held-out images (``core.metrics``, k = 5): precision and density say how much of
  the generated set looks real, recall and coverage how much of the real digits' variety it reaches, so a
  mode-seeking student shows as high precision with low recall. The k-NN radii depend on the set sizes, so both
  sides are compared at equal size and equal counts per digit (``core.metrics.matched_manifold_metrics``): each
  digit puts min(N/10, its held-out count) images into a chunk, the held-out split (35–37 per digit, 360 in all)
  and the generated set are cut into disjoint chunks, and the four numbers are averaged over the chunks. N = 2,000:
  5 generated chunks of 360 against the whole held-out split (the last 200 images count only in FD and accuracy);
  N < 350: chunks of N held-out images against the generated set. Measured rows: docs/sweeps.md, "Variety on the
  yardstick".

Rows: ``real`` (N real train images vs the held-out ones: the best any generator can expect, i.e. FD's floor and
the ceiling of the other numbers; its accuracy is the classifier's held-out accuracy),
``teacher_50``/``teacher_4``/``teacher_1`` (DDIM, "trailing" timesteps, with CFG), and with
a student LoRA ``student_1``/``student_4`` (DMD2's few-step rule, no CFG) and ``student_distillpp``
(Distillation++: the LoRA-disabled base refines the student's first steps, :class:`DistillppSettings`), and
``student``: the student at the timesteps and with the sampler its LoRA's ``fewstep_recipe.json`` records
(deterministic DDIM for Progressive Distillation's students, whose one step is trained to equal two DDIM steps).
All sampling goes through ``fewstep.core``; every row starts from the same initial noise.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distillpp import DIGITS_TUNED, check_guide_source, check_teacher_guidance, sample_distillpp
from ..core.metrics import frechet_distance, matched_manifold_metrics
from ..core.sampling import Denoiser, cfg, ddim_timesteps, sample_ddim, sample_few_step
from ..core.schedule import NoiseSchedule, student_timesteps, validate_timesteps
from ..training.data.cache import cached_build
from ..training.evaluation.rows import student_lora
from ..training.publish.lora_files import RECIPE_FILE
from .teacher import IMAGE_SIZE, caption, load_digits_split

CLASSIFIER_VERSION = 1
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_RECORD = "fewstep_classifier.json"
DEFAULT_GUIDANCE_SCALE = 2.0  # the scale DMD2 distils the digits teacher at
TEACHER_ROWS = {"teacher_50": 50, "teacher_4": 4, "teacher_1": 1}
STUDENT_ROWS = {"student_1": 1, "student_4": 4}
# "student": the LoRA at its own recipe (fewstep_recipe.json), asked for by name (demo --method, bench methods).
# student_distillpp_control: the same Distillation++ settings with the noise-only guide (core.distillpp's control),
# measured beside every Distillation++ row so a gain from the rule's injected noise is not read as the teacher's.
ROWS = ("real", *TEACHER_ROWS, *STUDENT_ROWS, "student_distillpp", "student_distillpp_control", "student")


# The yardstick's Distillation++ guides → where core.distillpp takes the guiding x̂0 from.
GUIDES = {"teacher": "renoised", "student": "renoised", "noise": "noise_only", "teacher_at_input": "at_student_input"}


@dataclass(frozen=True)
class DistillppSettings:
    """How the ``student_distillpp`` row applies Distillation++ (``core.distillpp``) on the student's own grid.

    The defaults are ``core.distillpp.DIGITS_TUNED``, the first sweep's pick (eps_mix, λ 0.15, one step, teacher at
    the distillation CFG). Re-measured with its control (docs/sweeps.md, issue 26; 4-step DMD2 students, n = 2,000 ×
    3 seeds): FD 71.7 ± 5.2 against the student's own 103.0 ± 3.6, accuracy 0.981 against 0.996; the noise-only
    control (the same injected noise, no teacher) gives 53.0 ± 3.5 at 0.959, so the FD gain is the rule's noise and
    the teacher's part is prompt adherence. The user-facing default is the authors' published setting
    (``RECOMMENDED_*``).
    """

    lam: float = DIGITS_TUNED["lam"]  # the rule's step size λ
    guided_steps: int = DIGITS_TUNED["guided_steps"]  # the first K student steps are refined by the teacher
    rule: str = DIGITS_TUNED["rule"]  # "eps_mix" (the authors' code) or "x0_lerp" (the paper)
    teacher_guidance_scale: float | None = None  # the guiding teacher's CFG; None: the row's (the distillation CFG)
    # Ablations, which separate what the teacher adds from what the rule's own noise does: "student" lets the student
    # guide itself through the same rule (fresh noise, re-noising and all); "noise" is the noise-only control (the
    # same injected noise, no teacher call); "teacher_at_input" calls the teacher at the student's own x_t (no fresh
    # noise). ``teacher_steps`` > 1: the teacher's x̂0 from m DDIM steps instead of one (core.distillpp).
    guide: str = "teacher"
    teacher_steps: int = 1

    def __post_init__(self):
        check_teacher_guidance(self.lam, self.guided_steps, self.rule)
        if self.guide not in GUIDES:
            raise ValueError(f"Distillation++ guide must be one of {', '.join(GUIDES)}, got {self.guide!r}")
        check_guide_source(GUIDES[self.guide], self.teacher_steps)
        if self.teacher_guidance_scale is not None and self.teacher_guidance_scale < 0:
            raise ValueError(f"teacher guidance scale must be ≥ 0, got {self.teacher_guidance_scale}")

    def describe(self, scale: float) -> str:
        cfg_scale = self.teacher_guidance_scale if self.teacher_guidance_scale is not None else scale
        text = f"{self.rule} λ={self.lam:g}, {self.guided_steps} guided step(s), teacher CFG {cfg_scale:g}"
        if self.guide != "teacher" or self.teacher_steps != 1:
            text += f", guide {self.guide}" + (f" ({self.teacher_steps} DDIM steps)" if self.teacher_steps > 1 else "")
        return text + f"; {self.extra_unet_calls(scale)} extra UNet passes per image"

    def extra_unet_calls(self, scale: float) -> int:
        """UNet passes per image beyond the student's own: per guided step, the guide's steps × (2 with CFG)."""
        if self.guide == "noise":
            return 0
        cfg_scale = self.teacher_guidance_scale if self.teacher_guidance_scale is not None else scale
        passes = 1 if self.guide == "student" or cfg_scale == 1 else 2
        return self.guided_steps * self.teacher_steps * passes


# ----------------------------------------------------------------------------------------------- classifier
@dataclass
class DigitClassifierConfig:
    """How the yardstick's classifier is trained (on the train split only)."""

    seed: int = field(default=0, metadata={"help": "random seed"})
    width: int = field(default=16, metadata={"help": "channels of the first conv block (doubled in the second)"})
    features: int = field(default=128, metadata={"help": "penultimate feature size (the FD feature space)"})
    epochs: int = field(default=20, metadata={"help": "passes over the train split"})
    batch_size: int = field(default=128, metadata={"help": "batch size"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (cosine-decayed)"})
    max_shift: int = field(default=2, metadata={"help": "random translation augmentation, in pixels"})


class DigitClassifier(nn.Module):
    """(conv-conv-pool)×2 → linear → ReLU (the FD features) → linear (10 logits); input (B, 3, 32, 32) in [0, 1]."""

    def __init__(self, width: int = 32, features: int = 128):
        super().__init__()
        conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(
            *conv(3, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (IMAGE_SIZE // 4) ** 2, features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, predicted digit) of many images, in eval mode."""
        self.eval()
        features = torch.cat([self.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        return features, self.head(features).argmax(1)


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the white background."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4, value=1.0)
    offsets = torch.randint(2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([p[:, dy : dy + size, dx : dx + size] for p, (dy, dx) in zip(padded, offsets)])


def train_classifier(config: DigitClassifierConfig, progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train on the train split; returns the classifier and its held-out accuracy."""
    from tqdm import tqdm

    data = load_digits_split()
    images, labels = data.train_images / 2 + 0.5, data.train_labels
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = DigitClassifier(config.width, config.features)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    model.train()
    for _ in tqdm(range(config.epochs), desc="yardstick classifier", unit="epoch", disable=not progress):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), config.batch_size):
            index = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(_random_shift(images[index], config.max_shift, generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            decay.step()
    _, predicted = model.embed(data.test_images / 2 + 0.5)
    return model.eval(), (predicted == data.test_labels).float().mean().item()


def digit_classifier(
    config: DigitClassifierConfig | None = None, force: bool = False, progress: bool = True, log: Callable = print
) -> DigitClassifier:
    """The cached yardstick classifier for ``config`` (trained on first use, well under a minute)."""
    from safetensors.torch import load_file, save_file

    config = config or DigitClassifierConfig()

    def build(directory: Path) -> None:
        model, accuracy = train_classifier(config, progress)
        save_file(model.state_dict(), directory / CLASSIFIER_FILE)
        record = {"version": CLASSIFIER_VERSION, "config": asdict(config), "test_accuracy": accuracy}
        (directory / CLASSIFIER_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    entry = cached_build("digits-classifier", CLASSIFIER_VERSION, config, build, force=force, log=log)
    model = DigitClassifier(config.width, config.features)
    model.load_state_dict(load_file(entry / CLASSIFIER_FILE))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- scores
MANIFOLD_KEYS = ("precision", "recall", "density", "coverage")


def feature_scores(
    features: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, reference_labels: torch.Tensor
) -> dict[str, float]:
    """FD and the manifold metrics (equal size, equal counts per digit) of features against the reference's."""
    return {
        "fd": frechet_distance(features, reference),
        **matched_manifold_metrics(reference, reference_labels, features, labels),
    }


def image_scores(
    classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
    reference_labels: torch.Tensor,
) -> dict[str, float]:
    """A generated row's scores: :func:`feature_scores` of its images' features and the classifier's accuracy on the
    digits they were asked for."""
    features, predicted = classifier.embed(images)
    return {**feature_scores(features, labels, reference, reference_labels),
            "acc": (predicted == labels).float().mean().item()}  # fmt: skip


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (sd 0 for a single seed)."""
    import statistics

    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------- models
@dataclass
class StudentInfo:
    """What the yardstick needs to know about a DMD2 student: where its LoRA came from and its run's settings."""

    lora: Path
    num_steps: int = 1
    timesteps: list[int] | None = None
    guidance_scale: float | None = None
    # From the LoRA's ``fewstep_recipe.json``: how it samples. "few_step" = DMD2's re-noising rule (DMD, DMD2);
    # "ddim" = deterministic DDIM (Progressive Distillation trains one student step to equal two DDIM steps).
    sampler: str = "few_step"
    recipe_timesteps: list[int] | None = None

    def sample(self, denoise: Denoiser, noise, timesteps: list[int], schedule, generator):
        if self.sampler == "ddim":
            return sample_ddim(denoise, noise, timesteps, schedule)
        return sample_few_step(denoise, noise, timesteps, schedule, generator)

    def timesteps_for(self, num_steps: int) -> list[int]:
        """The run's own timesteps when it trained for ``num_steps`` steps with a custom list, else DMD2's."""
        if self.timesteps and len(self.timesteps) == num_steps:
            return validate_timesteps(self.timesteps)
        return student_timesteps(num_steps)


@dataclass
class DigitsModel:
    """A digits teacher pipeline (with the student LoRA on its UNet if given) and its cached text conditioning."""

    pipe: Any
    schedule: NoiseSchedule
    digit_embeds: torch.Tensor  # (10, L, D): "a handwritten digit zero" … "nine"
    uncond_embeds: torch.Tensor  # (1, L, D): ""
    student: StudentInfo | None = None


def default_rows(student: StudentInfo | None) -> list[str]:
    """The teacher's rows and a student's at the steps it was trained for; Distillation++ on multi-step students.

    A one-step student is not measured at 4 steps by default: it never trained on those timesteps (ask for
    ``student_4``/``student_distillpp`` by name to see it anyway).
    """
    rows = ["real", *TEACHER_ROWS]
    if student is None:
        return rows
    if student.num_steps == 1:
        return rows + ["student_1"]
    own = f"student_{student.num_steps}"
    return rows + [own if own in STUDENT_ROWS else "student", "student_distillpp", "student_distillpp_control"]


def _resolve_lora(lora: str | Path) -> tuple[Path, Path | None]:
    """(LoRA weights file, run directory or None) from a run dir, its ``lora/`` dir or a .safetensors file."""
    from ..training.publish.lora_files import DIFFUSERS_LORA_WEIGHT_NAME

    path = Path(lora).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"LoRA {path} is not a .safetensors file")
        return path, path.parent.parent if path.parent.name == "lora" else None
    if (path / "lora" / DIFFUSERS_LORA_WEIGHT_NAME).is_file():
        return path / "lora" / DIFFUSERS_LORA_WEIGHT_NAME, path
    if (path / DIFFUSERS_LORA_WEIGHT_NAME).is_file():
        return path / DIFFUSERS_LORA_WEIGHT_NAME, path.parent if path.name == "lora" else None
    raise ValueError(
        f"LoRA {path} is neither a run directory (with lora/{DIFFUSERS_LORA_WEIGHT_NAME}), a LoRA directory nor a "
        ".safetensors file"
    )


def _student_info(weights: Path, run_dir: Path | None) -> StudentInfo:
    """Read the run's ``config.yaml`` (num_steps, timesteps, guidance_scale) when there is one."""
    import yaml

    info = StudentInfo(lora=weights)
    recipe_path = weights.parent / RECIPE_FILE
    if recipe_path.is_file():
        recipe = json.loads(recipe_path.read_text())
        info.sampler = recipe.get("sampler", "few_step")
        info.recipe_timesteps = recipe.get("timesteps")
    config_path = run_dir / "config.yaml" if run_dir is not None else None
    if config_path is not None and config_path.is_file():
        config = yaml.safe_load(config_path.read_text()) or {}
        info.num_steps = int(config.get("num_steps") or 1)
        info.timesteps = config.get("timesteps")
        info.guidance_scale = config.get("guidance_scale")
    return info


@torch.no_grad()
def load_digits_model(teacher_dir: str | Path, lora: str | Path | None = None, device: str = "cpu") -> DigitsModel:
    """Load the teacher with diffusers and, if given, the student LoRA (``pipe.load_lora_weights``) on its UNet."""
    from ..training.teacher.loading import encode_prompts, load_teacher, teacher_schedule

    weights, run_dir = _resolve_lora(lora) if lora is not None else (None, None)
    pipe, family = load_teacher(str(teacher_dir))
    image_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if family != "sd15" or image_size != IMAGE_SIZE:
        raise ValueError(
            f"teacher {teacher_dir} makes {family} {image_size}px images; the yardstick needs the {IMAGE_SIZE}px "
            "digits teacher (`fewstep teacher digits`)"
        )
    pipe.set_progress_bar_config(disable=True)
    student = None
    if weights is not None:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": expected, the LoRA is UNet-only
        try:
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name="student")
        finally:
            diffusers_logging.set_verbosity(verbosity)
        student = _student_info(weights, run_dir)
    pipe.to(device)
    embeds = encode_prompts(pipe, family, [caption(d) for d in range(10)] + [""], IMAGE_SIZE).prompt_embeds.to(device)
    return DigitsModel(pipe, teacher_schedule(pipe), embeds[:10], embeds[10:], student)


def unet_denoiser(
    unet,
    schedule: NoiseSchedule,
    embeds: torch.Tensor,
    uncond_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    lora: bool = False,
) -> Denoiser:
    """A diffusers UNet as the core samplers' ``denoise(x_t, t) -> x0``; CFG in one batched pass if the scale ≠ 1."""
    guided = uncond_embeds is not None and guidance_scale != 1.0

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        batch = x_t.shape[0]
        context = torch.cat([uncond_embeds.expand(batch, -1, -1), embeds]) if guided else embeds
        x_in = torch.cat([x_t, x_t]) if guided else x_t
        with student_lora(unet, lora, "no student LoRA is loaded; pass lora=... to load_digits_model"):
            out = unet(x_in, torch.full((x_in.shape[0],), t, device=x_in.device), encoder_hidden_states=context).sample
        x0 = schedule.to_x0(out, x_in, t)
        return cfg(*x0.chunk(2), guidance_scale) if guided else x0

    return denoise


@torch.no_grad()
def sample_digits(
    model: DigitsModel,
    row: str,
    labels: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    distillpp: DistillppSettings = DistillppSettings(),
) -> torch.Tensor:
    """Images (B, 3, 32, 32) in [0, 1] of ``labels`` for one yardstick row (not ``real``), from latent ``noise``."""
    from ..training.teacher.loading import decode_latents

    unet, schedule = model.pipe.unet, model.schedule.to(model.pipe.unet.device)
    embeds = model.digit_embeds[labels.to(model.digit_embeds.device)]
    noise = noise.to(model.pipe.unet.device)
    teacher = unet_denoiser(unet, schedule, embeds, model.uncond_embeds, guidance_scale)
    if row in TEACHER_ROWS:
        latents = sample_ddim(teacher, noise, ddim_timesteps(TEACHER_ROWS[row], schedule.num_train_timesteps), schedule)
    elif row == "student":  # at the steps, timesteps and sampler the student was trained for
        if model.student is None or not model.student.recipe_timesteps:
            raise ValueError("row student needs a student LoRA with a fewstep_recipe.json (written by fewstep train)")
        student = unet_denoiser(unet, schedule, embeds, lora=True)
        latents = model.student.sample(student, noise, model.student.recipe_timesteps, schedule, generator)
    elif row in STUDENT_ROWS or row.startswith("student_distillpp"):
        if model.student is None:
            raise ValueError(f"row {row} needs a student LoRA")
        student = unet_denoiser(unet, schedule, embeds, lora=True)
        if row in STUDENT_ROWS:
            timesteps = model.student.timesteps_for(STUDENT_ROWS[row])
            latents = model.student.sample(student, noise, timesteps, schedule, generator)
        else:
            # The paper's setting: the student's own multi-step grid (4 steps for a 1-step student).
            timesteps = model.student.timesteps_for(model.student.num_steps if model.student.num_steps > 1 else 4)
            if row == "student_distillpp_control":
                distillpp = replace(distillpp, guide="noise")
            teacher_scale = distillpp.teacher_guidance_scale
            guide = teacher if teacher_scale is None else unet_denoiser(
                unet, schedule, embeds, model.uncond_embeds, teacher_scale
            )  # fmt: skip
            guide = student if distillpp.guide == "student" else guide
            latents = sample_distillpp(
                student, guide, noise, timesteps, schedule, distillpp.lam, distillpp.guided_steps, generator,
                distillpp.rule, GUIDES[distillpp.guide], distillpp.teacher_steps,
            )  # fmt: skip
    else:
        raise ValueError(f"unknown row {row!r}; use one of {', '.join(ROWS[1:])}")
    return decode_latents(model.pipe.vae, latents)


# ----------------------------------------------------------------------------------------------- evaluate
def balanced_labels(n: int) -> torch.Tensor:
    """0, 1, …, 9, 0, 1, … (n/10 of each digit)."""
    if n < 10 or n % 10:
        raise ValueError(f"n must be a positive multiple of 10 (n/10 images per digit), got {n}")
    return torch.arange(n) % 10


def starting_noise(model: DigitsModel, n: int, seed: int) -> torch.Tensor:
    """The latent noise every row starts from at ``seed``: the same for all rows, so rows compare paired."""
    size = IMAGE_SIZE // model.pipe.vae_scale_factor
    shape = (n, model.pipe.unet.config.in_channels, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def fresh_noise_generator(seed: int) -> torch.Generator:
    """The generator of the fresh noise multi-step rows draw between steps (``seed + 1``: apart from the start's)."""
    return torch.Generator().manual_seed(seed + 1)


def _real_row(classifier: DigitClassifier, n: int, seed: int, reference: torch.Tensor) -> dict:
    """n/10 real train images per digit (all of a digit's ~143 if fewer) vs the held-out split.

    Accuracy is the classifier's held-out accuracy. The train images are as real as the held-out ones, so every
    number here is what a generator that draws from the data itself would score.
    """
    data = load_digits_split()
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for digit in range(10):
        pool = (data.train_labels == digit).nonzero().flatten()
        picks.append(pool[torch.randperm(len(pool), generator=generator)[: n // 10]])
    picks = torch.cat(picks)
    features, _ = classifier.embed(data.train_images[picks] / 2 + 0.5)
    _, predicted = classifier.embed(data.test_images / 2 + 0.5)
    return {
        **feature_scores(features, data.train_labels[picks], reference, data.test_labels),
        "acc": (predicted == data.test_labels).float().mean().item(),
    }


def evaluate(
    teacher_dir: str | Path,
    lora: str | Path | None = None,
    n: int = 500,
    guidance_scale: float | None = None,
    seed: int = 0,
    rows: list[str] | None = None,
    distillpp: DistillppSettings = DistillppSettings(),
    batch_size: int = 100,
    classifier: DigitClassifier | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """The yardstick table as a dict: ``{"rows": {name: {"fd", "acc", "precision", "recall", "density", "coverage",
    "seconds"}}, "n", "seed", ...}``.

    ``guidance_scale`` defaults to the student run's (its ``config.yaml``), else 2.0. ``rows`` defaults to
    :func:`default_rows` (the student's only with ``lora``).
    """
    from tqdm import tqdm

    labels = balanced_labels(n)
    model = load_digits_model(teacher_dir, lora, device)
    student_scale = model.student.guidance_scale if model.student is not None else None
    scale = float(guidance_scale if guidance_scale is not None else student_scale or DEFAULT_GUIDANCE_SCALE)
    rows = list(rows or default_rows(model.student))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; use any of {', '.join(ROWS)}")
    classifier = classifier or digit_classifier(progress=progress)
    held_out = load_digits_split()
    reference, _ = classifier.embed(held_out.test_images / 2 + 0.5)

    noise = starting_noise(model, n, seed)
    results: dict[str, dict] = {}
    for row in rows:
        started = time.perf_counter()
        if row == "real":
            results[row] = _real_row(classifier, n, seed, reference)
        else:
            generator = fresh_noise_generator(seed)
            images = []
            batches = tqdm(range(0, n, batch_size), desc=f"eval {row}", unit="batch", disable=not progress, leave=False)
            for start in batches:
                chunk = slice(start, start + batch_size)
                images.append(
                    sample_digits(model, row, labels[chunk], noise[chunk], generator, scale, distillpp)
                )
            results[row] = image_scores(classifier, torch.cat(images), labels, reference, held_out.test_labels)
        results[row]["seconds"] = round(time.perf_counter() - started, 2)
    return {
        "rows": results,
        "n": n,
        "seed": seed,
        "guidance_scale": scale,
        "distillpp": asdict(distillpp),
        "teacher": str(teacher_dir),
        "lora": str(model.student.lora) if model.student is not None else None,
    }


ROW_TITLES = {
    "real": "real train vs held-out (best)",
    "teacher_50": "teacher 50-step DDIM",
    "teacher_4": "teacher 4-step DDIM",
    "teacher_1": "teacher 1-step DDIM",
    "student_1": "student 1-step",
    "student_4": "student 4-step",
    "student_distillpp": "student + Distillation++",
    "student_distillpp_control": "  its noise-only control",
    "student": "student at its own recipe",
}


def format_table(result: dict) -> str:
    """The result of :func:`evaluate` as a fixed-width table."""
    lines = [
        f"yardstick: n={result['n']} ({result['n'] // 10} per digit), CFG {result['guidance_scale']:g}, "
        f"seed {result['seed']}",
        f"{'row':<26}{'':<30}{'FD ↓':>8}{'acc ↑':>7}{'prec ↑':>8}{'recall ↑':>9}{'cover ↑':>8}{'s':>6}",
    ]
    for name, row in result["rows"].items():
        variety = "".join(  # "—" for results written before the yardstick measured variety
            f"{row[key]:>{width}.3f}" if key in row else f"{'—':>{width}}"
            for key, width in (("precision", 8), ("recall", 9), ("coverage", 8))
        )
        title = ROW_TITLES.get(name, "")
        lines.append(f"{name:<26}{title:<30}{row['fd']:>8.2f}{row['acc']:>7.3f}{variety}{row['seconds']:>6.1f}")
    if any(name.startswith("student_distillpp") for name in result["rows"]) and "distillpp" in result:
        distillpp = DistillppSettings(**result["distillpp"])
        lines.append(f"(Distillation++: {distillpp.describe(result['guidance_scale'])})")
    return "\n".join(lines)


def save_digits_grid(
    model: DigitsModel,
    rows: list[str],
    path: str | Path,
    seed: int = 0,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    distillpp: DistillppSettings = DistillppSettings(),
) -> Path:
    """A sample grid: one image row per digit, one column per yardstick row (same noise across columns)."""
    from ..training.loop.images import save_grid

    labels = torch.arange(10)
    noise = starting_noise(model, 10, seed)
    columns = []
    for row in rows:
        generator = fresh_noise_generator(seed)
        columns.append(sample_digits(model, row, labels, noise, generator, guidance_scale, distillpp))
    save_grid(list(torch.stack(columns, dim=1)), path)
    return Path(path)
