"""The trainer every distillation method shares, on one shared base UNet.

:func:`train` reads top to bottom: options and the run directory → data → teacher, family and the family's defaults
→ cached encodings → the method's adapters, optimizers and loop (``method.build``) → resume → the iterations →
the final checkpoint and LoRA files. A method (``training/methods/``) says only what is particular to it: its
config fields and checks, which adapters it adds, its optimizers and its loop (``train_step``). Teacher loading,
caches, accelerate, checkpoints + resume, EMA, validation, export, progress and NaN handling live in this room
(``training/loop/``), once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ...core.schedule import validate_timesteps
from ..data.run_data import TrainingData, read_training_data
from ..data.summary import read_summary
from ..evaluation.in_training import TrainingEvaluation
from ..evaluation.metric_models import DEFAULT_CLIP_MODEL, DEFAULT_METRIC_MODEL
from ..teacher.style_lora import parse_style_spec
from ..publish.lora_files import RECIPE_FILE
from ..teacher import loading as teachers
from . import interrupts
from .checkpoints import TrainingState
from .config import build_config, check_config, load_yaml, save_yaml
from .distributed import ProcessGroup, check_replicas_agree, make_accelerator
from .ema import AdapterEMA, ema_weights
from .encodings import EncodedTeacher, encode_teacher
from .errors import TrainingError
from .iterations import Progress, Throughput, stop_on_signal, train_iteration
from .networks import GENERATOR, TextConditioning
from .precision import auto_mixed_precision, autocast
from .resume import check_resume, check_resume_defaults
from .run_dir import RunLock, claim_run_dir, clear_run_dir, validation_missed
from .trackers import resolve_report_to
from .validation import Validator

# Per-family defaults every method shares (docs/defaults.md); the methods add their own.
FAMILY_DEFAULTS = {
    "sd15": dict(guidance_scale=1.75, gradient_checkpointing=False),
    "sdxl": dict(guidance_scale=8.0, gradient_checkpointing=True),
}


@dataclass
class TrainConfig:
    """Options of ``fewstep train`` that every method has. None means "the teacher family's default"."""

    teacher: str = field(
        default="",
        metadata={"help": "Hub id, local diffusers folder or single-file .safetensors checkpoint",
                  "required": "required for a new run"},
    )  # fmt: skip
    output: str = field(
        default="",
        metadata={"help": "run directory (config, checkpoints, samples, lora)", "required": "required",
                  "on_resume": "may change"},
    )  # fmt: skip
    model_type: str | None = field(
        default=None, metadata={"help": "override the detected family", "choices": ["sd15", "sdxl"]}
    )
    prompts: str | None = field(
        default=None, metadata={"help": "prompts file: .txt (one per line), .jsonl, .json, .csv or .tsv"}
    )
    images: str | None = field(
        default=None, metadata={"help": "real images with captions (metadata.jsonl or same-name .txt) for the GAN"}
    )
    resolution: int | None = field(
        default=None, metadata={"help": "image size (default: the UNet's native size)", "min": 1}
    )
    batch_size: int = field(
        default=1, metadata={"help": "samples per process and micro-batch (on --resume at another process count: the "
                                     "one that keeps the run's global batch)", "min": 1, "on_resume": "may change"},
    )  # fmt: skip
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "micro-batches per update (effective batch = batch × this × processes)", "min": 1},
    )
    max_steps: int = field(
        default=1000,
        metadata={"help": "training iterations (all rounds together for progressive)", "min": 1,
                  "on_resume": "may change"},
    )  # fmt: skip
    lr: float = field(
        default=5e-5,
        metadata={"help": "AdamW learning rate of the generator adapter", "above": 0, "on_resume": "may change"},
    )
    warmup_steps: int = field(
        default=100, metadata={"help": "linear learning-rate warm-up of every optimizer, in iterations"}
    )
    lr_schedule: str = field(
        default="constant", metadata={"help": "after warm-up: constant (reference) or cosine decay to 0 at --max-steps",
                                      "choices": ["constant", "cosine"]},
    )  # fmt: skip
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "EMA of the generator adapter, exported and validated (0 = off, e.g. 0.99)", "min": 0,
                  "below": 1},
    )  # fmt: skip
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay", "min": 0, "on_resume": "may change"}
    )
    max_grad_norm: float = field(
        default=10.0, metadata={"help": "gradient-norm clip", "above": 0, "on_resume": "may change"}
    )
    guidance_scale: float | None = field(default=None, metadata={"help": "teacher CFG (sd15 1.75, sdxl 8)", "min": 0})
    gen_rank: int = field(default=64, metadata={"help": "generator LoRA rank", "min": 1})
    gen_alpha: float = field(default=8.0, metadata={"help": "generator LoRA alpha", "above": 0})
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "base UNet precision and autocast, LoRA stays fp32: auto = bf16 on a GPU that has it, else "
                          "no; fp16 scales its losses", "choices": ["auto", "no", "fp16", "bf16"],
                  "on_resume": "may change"},
    )  # fmt: skip
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "trade compute for activation memory (sd15 off, sdxl on)", "on_resume": "may change"},
    )
    checkpoint_every: int = field(
        default=500,
        metadata={"help": "iterations between checkpoints (0 = only at the end)", "on_resume": "may change"},
    )
    checkpoints_total_limit: int = field(
        default=3, metadata={"help": "checkpoints kept (oldest deleted)", "min": 1, "on_resume": "may change"}
    )
    validate_every: int = field(
        default=500, metadata={"help": "iterations between validation grids (0 = off)", "on_resume": "may change"}
    )
    num_validation_prompts: int = field(default=4, metadata={"help": "prompts in each validation grid", "min": 1})
    # The metrics of `fewstep eval` during training (training/evaluation/in_training.py, docs/eval.md).
    eval_every: int = field(
        default=0, metadata={"help": "iterations between evaluations of the student on --eval-prompts (FD_DINOv2, "
                                     "FD_CLIP, CLIP score, precision/recall vs the teacher), logged as "
                                     "eval/<row>/<metric> and written to RUN_DIR/eval/ (0 = off)",
                             "on_resume": "may change"},
    )  # fmt: skip
    eval_prompts: str | None = field(
        default=None, metadata={"help": "prompts file of --eval-every (keep it to a few prompts: every evaluation "
                                        "samples them all)", "on_resume": "may change"},
    )  # fmt: skip
    eval_images_per_prompt: int = field(
        default=2, metadata={"help": "images per --eval-prompts prompt", "min": 1, "on_resume": "may change"}
    )
    eval_teacher_steps: int = field(
        default=25, metadata={"help": "DDIM steps of the evaluation's teacher images (the reference)", "min": 1,
                              "on_resume": "may change"},
    )  # fmt: skip
    eval_metric_model: str = field(
        default=DEFAULT_METRIC_MODEL, metadata={"help": "DINOv2 (or CLIP) Hub id or folder of the evaluation's FD "
                                                        "features", "on_resume": "may change"},
    )  # fmt: skip
    eval_clip_model: str = field(
        default=DEFAULT_CLIP_MODEL, metadata={"help": "CLIP Hub id or folder of the evaluation's CLIP score",
                                              "on_resume": "may change"},
    )  # fmt: skip
    max_nan_steps: int = field(
        default=10, metadata={"help": "skipped non-finite steps before the run stops", "on_resume": "may change"}
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    # Teachers from single files and style LoRAs, Hugging Face datasets, experiment trackers.
    teacher_config: str | None = field(
        default=None, metadata={"help": "with a single-file --teacher (.safetensors): a diffusers folder or Hub id of "
                                        "the same architecture, for the component configs and tokenizers"},
    )  # fmt: skip
    teacher_lora: list[str] | None = field(
        default=None, metadata={"help": "style LoRA FILE[:SCALE] fused into the teacher before distillation "
                                        "(kohya or diffusers format; repeatable)"},
    )  # fmt: skip
    dataset: str | None = field(
        default=None, metadata={"help": "webdataset tar shards ('shards/{00000..00099}.tar' or a folder of .tar, as img2dataset "
                                "writes them) or a Hugging Face dataset (a local folder, a saved dataset or a Hub id)"}
    )
    image_column: str | None = field(default=None, metadata={"help": "dataset image column (default: 'image')"})
    caption_column: str | None = field(
        default=None, metadata={"help": "dataset caption column (default: 'text', 'caption' or 'prompt')"}
    )
    dataset_split: str = field(default="train", metadata={"help": "dataset split"})
    streaming: bool = field(default=False, metadata={"help": "stream the dataset (large ones): read --max-train-samples"})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "use at most this many dataset examples (streaming default: 10000)", "min": 1}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "where encoded prompts and image latents are kept and shared by runs (default: "
                                        "$FEWSTEP_ENCODING_CACHE, else ~/.cache/fewstep/encodings)",
                                "on_resume": "may change"},
    )  # fmt: skip
    text_encoding: str = field(
        default="cache", metadata={"help": "the prompts' text conditioning: encoded once into --cache-dir (cache), or "
                                           "by the text encoders kept loaded, each batch (on-the-fly, as the DMD2 "
                                           "reference does; needs --prompts FILE)", "choices": ["cache", "on-the-fly"],
                                   "on_resume": "may change"},
    )  # fmt: skip
    max_bad_fraction: float = field(
        default=0.01, metadata={"help": "share of unreadable images skipped (and logged in the cache) before encoding "
                                        "stops with an error", "min": 0, "max": 1, "on_resume": "may change"},
    )  # fmt: skip
    collective_timeout: float = field(
        default=30.0, metadata={"help": "minutes a process waits for the others at a collective (encoding, teacher "
                                        "pairs, checkpoints) before the run fails; the slowest process's share of a "
                                        "first encoding must fit (or run fewstep prepare first)", "above": 0,
                                "on_resume": "may change"},
    )  # fmt: skip
    report_to: str | None = field(
        default=None, metadata={"help": "experiment tracker (default: tensorboard when installed)",
                                "choices": ["none", "tensorboard", "wandb"], "on_resume": "may change"},
    )  # fmt: skip

    # Per-family defaults of this config class; subclasses extend it.
    family_defaults = FAMILY_DEFAULTS

    def resolved(self, family: str):
        """Every "None = default" filled in: the family's defaults, then the ones derived from other options."""
        defaults = self.family_defaults[family]
        fills = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.mixed_precision == "auto":
            fills["mixed_precision"] = auto_mixed_precision()
        return dataclasses.replace(self, **fills, **self._derived_defaults())

    def _derived_defaults(self) -> dict:
        """Defaults that follow from other options (a method's config overrides this)."""
        return {}


def lr_factor(iteration: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based), for every optimizer.

    Linear warm-up ``min(1, (k + 1) / warmup_steps)``; then constant, or cosine ``½(1 + cos(π·p))`` with
    p = (k − warmup_steps) / (max_steps − warmup_steps). Counted in iterations, as the DMD2 reference steps both
    of its schedulers every iteration, so a generator that updates every 10th iteration still leaves warm-up.
    """
    warm = min(1.0, (iteration + 1) / max(1, warmup_steps))
    if schedule == "constant":
        return warm
    progress = min(1.0, max(0, iteration - warmup_steps) / max(1, max_steps - warmup_steps))
    return warm * 0.5 * (1 + math.cos(math.pi * progress))


def make_config(cls, cli: dict, config_file: str | None = None):
    """YAML then CLI (CLI wins); values typed and checked, unknown keys rejected."""
    layers = (load_yaml(config_file), cli) if config_file else (cli,)
    return build_config(cls, *layers, sources=(config_file, None) if config_file else (None,))


# ------------------------------------------------------------------------------------------ what a method gives
@dataclass
class TrainingContext:
    """Everything a method needs to build its networks and loop, prepared by the trainer."""

    config: Any
    family: str
    run_dir: Path
    device: torch.device
    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: Any
    prompt_cond: TextConditioning
    uncond: TextConditioning
    latent_shape: tuple[int, ...]
    real_latents: Any  # the real images' posteriors (encodings.CachedLatents), or None
    real_cond: TextConditioning | None
    data_rng: torch.Generator  # the same on every process: draws are made for the global batch (.distributed)
    is_main_process: bool
    num_processes: int
    process_index: int
    wait_for_everyone: Callable[[], None]
    processes: ProcessGroup  # the draws' slices, the skip decision and the gradient average the loops share
    export_lora: Callable[[str, Path, dict], None]  # (adapter, directory, recipe metadata) → LoRA files
    teacher_fingerprint: dict

    def draw_indices(self, count: int, batch_size: int) -> torch.Tensor:
        """This process's ``batch_size`` rows of a uniform draw (with replacement) of ``count`` items for the global
        batch: the same run at any process count."""
        return self.processes.randint(0, count, batch_size, self.data_rng)

    def draw_noise(self, shape) -> torch.Tensor:
        """This process's rows of a Gaussian draw for the global batch (``shape[0]`` rows per process)."""
        return self.processes.randn(shape, self.data_rng)

    def adamw(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=self.config.weight_decay)

    def lr_scheduler(self, optimizer, factor: Callable[[int], float] | None = None):
        """A per-iteration schedule (stepped once per iteration by the loop), by default :func:`lr_factor`."""
        c = self.config
        factor = factor or (lambda iteration: lr_factor(iteration, c.warmup_steps, c.max_steps, c.lr_schedule))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MethodLoop(Protocol):
    """A method's loop (an :class:`~fewstep.training.loop.update_loop.AdapterUpdateLoop`)."""

    step: int
    skipped_steps: int
    optimizers: dict
    lr_schedulers: dict

    def train_step(self, batches: list) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class MethodRun:
    """What ``method.build`` returns: the loop and what the trainer checkpoints, validates and exports."""

    loop: MethodLoop
    adapters: list[str]  # peft adapter names checkpointed (the generator first)
    next_batch: Callable[[], Any]  # one micro-batch of the method's data
    sample_student: Callable[[torch.Tensor, TextConditioning], torch.Tensor]  # (noise, cond) → x0, for validation
    teacher: Callable  # (x_t, t (B,), cond) → x0: the base UNet with CFG, for the validation grids' top row
    recipe: Callable[[], dict]  # the exported LoRA's sampling recipe (timesteps, sampler), for its metadata
    ema_parameters: list[torch.nn.Parameter] | None = None  # averaged when --ema-decay > 0
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # checkpointed extras (the GAN head)
    updated_generator: Callable[[dict], bool] = lambda metrics: "loss_dm" in metrics  # when the EMA updates
    on_finish: Callable[[], None] | None = None  # after the final LoRA files (PD: the last round's own folder)


class Method(Protocol):
    """A distillation method, chosen by name (``fewstep train --method NAME``)."""

    name: str  # progress-bar label
    key: str  # its --method name, recorded in RUN_DIR/method so that --resume finds it
    config_class: type

    def check(self, config, family: str, use_gan: bool, num_processes: int) -> None:
        """Refuse known-bad option combinations (after the family's defaults are filled in)."""
        ...

    def wants_real_images(self, config) -> bool: ...

    def build(self, ctx: TrainingContext) -> MethodRun: ...


# ------------------------------------------------------------------------------------------ the trainer
def holds_the_run_dir(train_function):
    """``train`` with the run directory's lock held throughout (:class:`.run_dir.RunLock`): a second ``fewstep
    train`` into a directory a live process is training into is refused, naming that process."""

    @functools.wraps(train_function)
    def locked(method, config, *args, **kwargs):
        if not config.output:  # refused by check_start
            return train_function(method, config, *args, **kwargs)
        with RunLock(Path(config.output)) as run_lock:
            return train_function(method, config, *args, run_lock=run_lock, **kwargs)

    return locked


@interrupts.handles_stop_signals
@holds_the_run_dir
def train(method: Method, config, resume: bool = False, on_step=None, overwrite: bool = False, run_lock=None) -> Path:
    """Run ``method``. ``on_step(step, metrics)`` is called after each iteration; returning True stops the run.

    ``overwrite`` lets a new run replace the run already in ``config.output``; one process at a time trains into a
    run directory (``run_lock``: :func:`holds_the_run_dir`); SIGINT and SIGTERM stop after a checkpoint.
    """
    # 0. Options, the run directory and a resume: refused before anything loads -------------------
    run_dir, checkpoint, config = check_start(method, config, resume, overwrite)

    # 1. Data first (cheap to check), then the teacher, its family and the family's defaults -----------
    data = read_run_data(config, run_dir, checkpoint)  # --prompts, --images, --dataset; a resume: the same data
    # No mixed precision for accelerate: it is the trainer's own (see .precision).
    accelerator = make_accelerator(config.collective_timeout)
    pipe, family = teachers.load_teacher(config.teacher, config.model_type, config.teacher_config, config.teacher_lora)
    config = fill_family_defaults(config, pipe, family, checkpoint)
    if checkpoint is not None:
        check_global_batch(checkpoint, config, accelerator.num_processes)
    use_gan = uses_gan(method, config, data)
    method.check(config, family, use_gan, accelerator.num_processes)
    device, is_main = accelerator.device, accelerator.is_main_process
    evaluation = TrainingEvaluation.prepare(config, pipe, family, device) if is_main else None  # before encoding
    start_run_dir(run_dir, method, config, overwrite, is_main)

    # 2. Encodings from the on-disk cache (each process encodes its share of what is missing) ---------
    processes = ProcessGroup(accelerator.num_processes, device, accelerator.process_index)
    encoded = encode_teacher(pipe, family, data, use_gan, config, device, processes)
    if is_main:
        data_summary(data, encoded).write(run_dir)
    prompts_identity = (data.prompts or data.images).digest()
    del pipe, data

    # 3. The method: adapters, optimizers, loop ---------------------------------------------------
    torch.manual_seed(config.seed)
    data_rng = torch.Generator().manual_seed(config.seed * 1000 + 17)  # alike on all: each takes its slice
    ctx = method_context(config, family, run_dir, encoded, prompts_identity, data_rng, accelerator, processes)
    with autocast(device, config.mixed_precision):
        run = method.build(ctx)
    loop = run.loop
    ema = AdapterEMA(run.ema_parameters, config.ema_decay) if config.ema_decay > 0 and run.ema_parameters else None
    state = TrainingState(run_dir, config, family, encoded.unet, loop, run.adapters, run.modules, data_rng, ema,
                          run.recipe, run_lock, accelerator.num_processes)  # fmt: skip

    # 4. Resume ----------------------------------------------------------------------------------
    if checkpoint is not None:
        state.load(checkpoint)
        accelerator.print(f"fewstep: resumed from {checkpoint} at step {loop.step}")

    # 5. Validation: teacher images once, student images every validate_every --------------------
    validator = Validator(run_dir, run.sample_student, run.teacher, encoded.vae, encoded.schedule,
                          encoded.validation_cond, encoded.latent_shape, config.seed, device, ema)  # fmt: skip
    evaluation = evaluation.start(run_dir, run, encoded, ema) if evaluation is not None else None

    # 6. The loop --------------------------------------------------------------------------------
    progress = Progress(method.name, config, run_dir, loop, is_main)
    if validation_missed(run_dir, loop.step, config.validate_every) and is_main:
        validator.run(loop.step)  # step 0, or a grid a kill lost
    interrupts.arm()
    stopped, throughput = False, Throughput(loop, ctx.processes, config)
    while loop.step < config.max_steps and not stopped:
        metrics = train_iteration(run, config, ema, device)
        progress.update(loop.step, metrics)
        step = loop.step
        if config.checkpoint_every and step % config.checkpoint_every == 0 and is_main:
            state.save()
        if config.validate_every and step % config.validate_every == 0 and is_main:
            validator.run(step, progress.writer)
        if evaluation is not None and step % config.eval_every == 0:
            evaluation.run(step, progress.writer)
        stopped = on_step is not None and bool(on_step(step, metrics))
        if interrupts.stop_requested(accelerator.num_processes, device) and step < config.max_steps:
            stop_on_signal(state, progress, step, is_main)  # a checkpoint, then RunInterrupted; a last step ends anyway
    progress.bar.close()
    accelerator.wait_for_everyone()
    accelerator.print(throughput.line() or "fewstep: no iteration left to run")
    check_replicas_agree(loop.optimizers, ctx.processes, accelerator.print)

    # 7. Final checkpoint and LoRA files ---------------------------------------------------------
    if is_main:
        if not config.checkpoint_every or loop.step % config.checkpoint_every:
            state.save()
        lora_dir = run_dir / "lora"
        with ema_weights(ema):  # users get the EMA weights
            ctx.export_lora(GENERATOR, lora_dir, {**run.recipe(), "step": loop.step})
            if run.on_finish is not None:
                run.on_finish()
        if evaluation is not None and evaluation.last_step != loop.step:
            evaluation.run(loop.step, progress.writer)  # the final LoRA's numbers, for the model card
        accelerator.print(f"fewstep: wrote {lora_dir}/pytorch_lora_weights.safetensors and fewstep_comfyui.safetensors")
    progress.close()
    return run_dir


def check_start(method: Method, config, resume: bool, overwrite: bool):
    """Refuse what can be refused before minutes of loading: bad options, a run directory this run may not take, a
    resume of another method's run or with options it cannot change. Returns the run directory, the checkpoint to
    resume from (None for a new run) and the options with their local paths made absolute."""
    check_config(config)
    if not config.output:
        raise TrainingError("--output is required (the run directory)")
    config = with_absolute_paths(config)
    resolve_report_to(config.report_to)  # an unusable tracker fails before the teacher loads
    run_dir = Path(config.output)
    checkpoint = claim_run_dir(run_dir, resume, overwrite)
    if checkpoint is not None:
        check_method(run_dir, method)
        check_resume(config, checkpoint)
    if not config.teacher:
        raise TrainingError("--teacher is required (a Hub id, a local diffusers folder or a .safetensors file)")
    if getattr(config, "timesteps", None):
        validate_timesteps(config.timesteps)  # before minutes of loading
    check_evaluation(config)
    return run_dir, checkpoint, config


def check_evaluation(config) -> None:
    """``--eval-every N`` needs a readable ``--eval-prompts`` file of enough images for the metrics."""
    from ..data.prompts import read_prompts

    if not config.eval_every:
        return
    if not config.eval_prompts:
        raise TrainingError("--eval-every needs --eval-prompts FILE (a few prompts; docs/eval.md)")
    if len(read_prompts(config.eval_prompts)) * config.eval_images_per_prompt < 2:
        raise TrainingError(
            f"--eval-prompts {config.eval_prompts} holds 1 prompt: the metrics need at least 2 images; add "
            "--eval-images-per-prompt 2"
        )


def with_absolute_paths(config):
    """Local files and folders (teacher, prompts, images, dataset, style LoRAs) resolved against the directory the
    run starts in, so that ``config.yaml`` names them wherever ``--resume`` is run from. Hub ids stay as they are."""

    def absolute(value):
        path = Path(value).expanduser() if value else None
        return str(path.resolve()) if path is not None and path.exists() else value

    def absolute_style(spec: str) -> str:
        style = parse_style_spec(spec)
        return f"{absolute(str(style.path))}:{style.scale:g}" if style.path.exists() else spec

    names = ("teacher", "teacher_config", "prompts", "images", "dataset", "eval_prompts", "eval_metric_model",
             "eval_clip_model")  # fmt: skip
    fields = {name: absolute(getattr(config, name)) for name in names if hasattr(config, name)}
    styles = config.teacher_lora
    if styles:
        fields["teacher_lora"] = [absolute_style(spec) for spec in ([styles] if isinstance(styles, str) else styles)]
    return dataclasses.replace(config, **fields)


def read_run_data(config, run_dir: Path, checkpoint: Path | None) -> TrainingData:
    """The training data's sources; a resumed run's must be those the run started with (their recorded identity)."""
    data = read_training_data(config)
    if config.text_encoding == "on-the-fly" and (data.prompts is None or data.prompts.texts is None):
        raise TrainingError(
            "--text-encoding on-the-fly needs --prompts FILE (prompts read by index); this run's prompts are the "
            f"{'captions of its images' if data.prompts is None else data.prompts_from}: drop --text-encoding to "
            "encode them into the cache"
        )
    saved = (read_summary(run_dir) or {}).get("fingerprint", {}) if checkpoint is not None else {}
    now = data.identity()
    changed = [kind for kind in ("prompts", "images") if "sources" in saved and saved["sources"].get(kind) != now[kind]]
    if changed:
        raise TrainingError(
            f"--resume: the run's data changed since it started (its {' and '.join(changed)}: another file, folder, "
            "dataset or contents); restore the run's data, or start a new run in another --output"
        )
    return data


def data_summary(data: TrainingData, encoded: EncodedTeacher):
    """What the run trains on, once encoded (counts, and what readers and the encoder skipped): printed and recorded
    in ``RUN_DIR/data_summary.json``."""
    skips = {report.kind: report.skipped for report in encoded.reports}
    images = len(encoded.real_latents) if encoded.real_latents is not None else 0
    summary = data.summary(len(encoded.prompt_cond), images, skips.get("prompts", {}), skips.get("images", {}))
    print(summary.line())
    return summary


def fill_family_defaults(config, pipe, family: str, checkpoint: Path | None):
    """The options with the teacher family's defaults, "auto" mixed precision and the teacher's native resolution
    filled in. A resume must be of a run of this family, and its options filled here are checked now."""
    if checkpoint is not None:
        saved_family = (checkpoint / "family").read_text().strip()
        if saved_family != family:
            raise TrainingError(
                f"checkpoint {checkpoint} is from an {saved_family} run and cannot resume on this {family} teacher; "
                f"use the {saved_family} teacher or start a new --output"
            )
    filled = config.resolved(family)
    resolution = filled.resolution or teachers.default_resolution(pipe)
    teachers.check_resolution(pipe, resolution)
    filled = dataclasses.replace(filled, resolution=resolution)
    if checkpoint is not None:
        check_resume_defaults(filled, config, checkpoint)
    return filled


def check_global_batch(checkpoint: Path, config, num_processes: int) -> None:
    """A resume at another process count keeps the run's global batch (processes × --batch-size): its draws then
    continue exactly (.distributed). Anything else is refused, naming the --batch-size that keeps it."""
    from .checkpoints import PROCESSES_FILE

    saved_file = checkpoint / PROCESSES_FILE
    saved_processes = int(saved_file.read_text()) if saved_file.is_file() else 1
    saved_batch = int(load_yaml(checkpoint / "config.yaml").get("batch_size", config.batch_size))
    saved, now = saved_processes * saved_batch, num_processes * config.batch_size
    if saved == now:
        return
    fix = (f"resume with --batch-size {saved // num_processes}" if saved % num_processes == 0
           else f"resume on a process count that divides {saved}, with --batch-size {saved} / processes")
    raise TrainingError(
        f"--resume: the run's global batch is {saved} ({saved_processes} process(es) × --batch-size {saved_batch}); "
        f"{num_processes} process(es) × --batch-size {config.batch_size} would make it {now}: {fix}"
    )


def uses_gan(method: Method, config, data: TrainingData) -> bool:
    """Does the run train with the GAN loss? When the method wants real images and the data has them."""
    wants_gan = method.wants_real_images(config)
    if wants_gan and data.images is None:
        print("fewstep: no --images given, training without the GAN loss (DMD2 stage 1)")
    return wants_gan and data.images is not None


def start_run_dir(run_dir: Path, method: Method, config, overwrite: bool, is_main_process: bool) -> None:
    """Every input is checked: now the run may write into its directory (its method and its full options)."""
    if overwrite and is_main_process:  # once, before any process writes into the directory
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process:
        (run_dir / METHOD_FILE).write_text(method.key + "\n")
    save_yaml(config, run_dir / "config.yaml")


def method_context(config, family: str, run_dir: Path, encoded: EncodedTeacher, prompts_identity: str,
                   data_rng: torch.Generator, accelerator, group: ProcessGroup) -> TrainingContext:  # fmt: skip
    """What ``method.build`` gets: the encoded teacher, this process's place in the run, and the trainer's services."""
    return TrainingContext(
        config=config, family=family, run_dir=run_dir, device=accelerator.device, unet=encoded.unet, vae=encoded.vae,
        schedule=encoded.schedule, prompt_cond=encoded.prompt_cond, uncond=encoded.uncond,
        latent_shape=encoded.latent_shape, real_latents=encoded.real_latents, real_cond=encoded.real_cond,
        data_rng=data_rng, is_main_process=accelerator.is_main_process, num_processes=accelerator.num_processes,
        process_index=accelerator.process_index, wait_for_everyone=accelerator.wait_for_everyone,
        processes=group,
        export_lora=LoraExport(encoded.unet, family, accelerator.is_main_process),
        teacher_fingerprint=teacher_fingerprint(config, family, prompts_identity),
    )  # fmt: skip


METHOD_FILE = "method"


def check_method(run_dir: Path, method: Method) -> None:
    """A resumed run continues with the method it was started with (recorded in ``RUN_DIR/method``)."""
    saved = run_dir / METHOD_FILE
    if saved.is_file() and saved.read_text().strip() != method.key:
        raise TrainingError(
            f"{run_dir} is a --method {saved.read_text().strip()} run; resume it with that method or start a new "
            "--output"
        )


def write_recipe(directory: Path, recipe: dict) -> None:
    """Record how the exported LoRA samples (its timesteps, sampler, method) next to its files."""
    import json

    Path(directory, RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")


def teacher_fingerprint(config, family: str, prompts_identity: str) -> dict:
    """What makes a teacher's outputs what they are: caches of teacher outputs (ODE pairs) are keyed by it."""
    teacher = config.teacher
    if os.path.exists(teacher):
        teacher = str(Path(teacher).resolve())
    return {
        "teacher": teacher,
        "teacher_lora": list(config.teacher_lora or []),
        "family": family,
        "guidance_scale": float(config.guidance_scale),
        "resolution": int(config.resolution),
        "prompts": prompts_identity,
    }


@dataclass
class LoraExport:
    """Writes an adapter's diffusers and ComfyUI (kohya) LoRA files, with its sampling recipe; on the main process."""

    unet: torch.nn.Module
    family: str
    is_main_process: bool

    def __call__(self, adapter: str, directory: Path, recipe: dict) -> None:
        from ..publish.lora_files import save_diffusers_lora, save_kohya_lora

        if not self.is_main_process:
            return
        save_diffusers_lora(self.unet, adapter, directory, family=self.family)
        save_kohya_lora(self.unet, adapter, directory / "fewstep_comfyui.safetensors", family=self.family)
        write_recipe(directory, recipe)
