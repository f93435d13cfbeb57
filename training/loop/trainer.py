"""The trainer every distillation method shares, on one shared base UNet.

Reads top to bottom: config → teacher and cached encodings → the method's adapters, optimizers and loop
(``method.build``) → resume → loop → checkpoints, validation, LoRA files. A method (``training/methods/``) says
only what is particular to it: its config fields and checks, which adapters it adds, its optimizers and its loop
(``train_step``). Teacher loading, caches, accelerate, checkpoints + resume, EMA, validation, export, progress and
NaN handling live here, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ...core.sampling import ddim_timesteps, sample_ddim
from ...core.schedule import validate_timesteps
from . import interrupts
from .config import build_config, check_config, load_yaml, save_yaml
from ..publish.lora_files import RECIPE_FILE
from .networks import GENERATOR, TextConditioning
from .resume import check_resume, saved_options, set_base_lr
from .run_dir import checkpoint_path, checkpoints_of, claim_run_dir, clear_run_dir, validation_missed
from .trackers import open_run_logger, resolve_report_to

# Per-family defaults every method shares (docs/defaults.md); the methods add their own.
FAMILY_DEFAULTS = {
    "sd15": dict(guidance_scale=1.75, gradient_checkpointing=False),
    "sdxl": dict(guidance_scale=8.0, gradient_checkpointing=True),
}


class TrainingError(RuntimeError):
    """Training cannot go on: the message says why and what to do."""


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
    prompts: str | None = field(default=None, metadata={"help": "prompts file: .txt (one per line) or .jsonl"})
    images: str | None = field(
        default=None, metadata={"help": "real images with captions (metadata.jsonl or same-name .txt) for the GAN"}
    )
    resolution: int | None = field(
        default=None, metadata={"help": "image size (default: the UNet's native size)", "min": 1}
    )
    batch_size: int = field(default=1, metadata={"help": "samples per process and micro-batch", "min": 1})
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
        default=None, metadata={"help": "a Hugging Face dataset: a local folder, a saved dataset or a Hub id"}
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


def auto_mixed_precision() -> str:
    """bf16 (autocast over a bf16 base, fp32 adapters) on a GPU that supports it; full precision elsewhere."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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
    real_latents: Any  # LatentPosteriors of --images, or None
    real_cond: TextConditioning | None
    data_rng: torch.Generator
    is_main_process: bool
    num_processes: int
    process_index: int
    wait_for_everyone: Callable[[], None]
    all_finite: Callable[[torch.Tensor], bool]
    clip_grad_norm: Callable[[list, float], torch.Tensor]
    export_lora: Callable[[str, Path, dict], None]  # (adapter, directory, recipe metadata) → LoRA files
    teacher_fingerprint: dict

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


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir: Path, state: dict, adapters: dict, modules: dict, config, family: str, limit: int) -> Path:
    """Write ``checkpoints/step-NNNNNNN`` atomically (temp dir + rename), keeping the last ``limit``."""
    from safetensors.torch import save_file

    step = state["loop"]["step"]
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, tensors in adapters.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
        for name, module in modules.items():
            save_file({k: v.contiguous().cpu() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
        torch.save(state, tmp / "training_state.pt")
        save_yaml(config, tmp / "config.yaml")
        (tmp / "family").write_text(family)
    except BaseException:  # a full disk (torch reports it as a RuntimeError), a second Ctrl-C: leave no half copy
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    checkpoints = checkpoints_of(run_dir)
    for old in checkpoints[: max(0, len(checkpoints) - limit)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ the trainer
@interrupts.handles_stop_signals
def train(method: Method, config, resume: bool = False, on_step=None, overwrite: bool = False) -> Path:
    """Run ``method``. ``on_step(step, metrics)`` is called after each iteration; returning True stops the run.

    ``overwrite`` lets a new run replace the run already in ``config.output`` (see :mod:`.run_dir`); SIGINT and
    SIGTERM stop after a checkpoint (see :mod:`.interrupts`).
    """
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm import tqdm

    from ..teacher import loading as teachers
    from ..data.hf_dataset import read_training_data
    from ..publish.lora_files import save_diffusers_lora, save_kohya_lora

    check_config(config)
    if not config.output:
        raise TrainingError("--output is required (the run directory)")
    resolve_report_to(config.report_to)  # an unusable tracker fails before the teacher loads
    run_dir = Path(config.output)
    checkpoint = claim_run_dir(run_dir, resume, overwrite)
    if checkpoint is not None:
        check_method(run_dir, method)
        check_resume(config, saved_options(checkpoint), checkpoint)
    if not config.teacher:
        raise TrainingError("--teacher is required (a Hub id, a local diffusers folder or a .safetensors file)")
    if getattr(config, "timesteps", None):
        validate_timesteps(config.timesteps)  # before minutes of loading

    # 1. Data first (cheap to check), then the teacher, its family and the family's defaults -----------
    prompts, real_items = read_training_data(config, run_dir)  # --prompts, --images, --dataset
    if config.mixed_precision == "auto":
        config = dataclasses.replace(config, mixed_precision=auto_mixed_precision())
    # Mixed precision is ours, not accelerate's: autocast below, and the loop's per-optimizer GradScalers for fp16
    # (accelerate's scaler needs accelerator.backward, which cannot do the loops' staged backward).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    pipe, family = teachers.load_teacher(config.teacher, config.model_type, config.teacher_config, config.teacher_lora)
    if checkpoint is not None:
        saved_family = (checkpoint / "family").read_text().strip()
        if saved_family != family:
            raise TrainingError(
                f"checkpoint {checkpoint} is from an {saved_family} run and cannot resume on this {family} teacher; "
                f"use the {saved_family} teacher or start a new --output"
            )
    config = config.resolved(family)
    resolution = config.resolution or teachers.default_resolution(pipe)
    teachers.check_resolution(pipe, resolution)
    config = dataclasses.replace(config, resolution=resolution)
    if checkpoint is not None:
        check_resume(config, saved_options(checkpoint), checkpoint)  # now with the family's defaults too
    wants_gan = method.wants_real_images(config)
    if wants_gan and not real_items:
        print("fewstep: no --images given, training without the GAN loss (DMD2 stage 1)")
    use_gan = wants_gan and bool(real_items)
    method.check(config, family, use_gan, accelerator.num_processes)
    device = accelerator.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]

    if overwrite and accelerator.is_main_process:  # once, before any process writes into the directory
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (run_dir / METHOD_FILE).write_text(method.key + "\n")
    save_yaml(config, run_dir / "config.yaml")

    # 2. Cached encodings; then only the UNet (and the VAE decoder) stay --------------------------
    pipe.to(device)
    schedule = teachers.teacher_schedule(pipe).to(device)
    prompt_cond = teachers.encode_prompts(pipe, family, prompts, resolution)
    uncond = teachers.unconditional(pipe, family, resolution)
    real_latents = teachers.encode_images(pipe, real_items, resolution) if use_gan else None
    real_cond = (
        teachers.encode_prompts(pipe, family, [i.caption for i in real_items], resolution) if use_gan else None
    )
    validation_cond = teachers.encode_prompts(pipe, family, prompts[: config.num_validation_prompts], resolution)
    unet, vae = pipe.unet, pipe.vae
    pipe.text_encoder = pipe.tokenizer = None
    if family == "sdxl":
        pipe.text_encoder_2 = pipe.tokenizer_2 = None
    vae.encoder = None  # only the decoder is needed, for validation images
    del pipe
    unet.to(device)
    if unet.dtype != weight_dtype:  # diffusers warns on any dtype cast, even a no-op one (the full-precision runs)
        unet.to(dtype=weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    latent_size = resolution // teachers.vae_scale_factor_of(vae)
    latent_shape = (unet.config.in_channels, latent_size, latent_size)

    world = accelerator.num_processes

    def all_finite(loss: torch.Tensor) -> bool:
        # Every process must take the same decision, or the gradient all-reduce below deadlocks.
        flag = torch.tensor([float(torch.isfinite(loss).all())], device=device)
        if world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def clip_grad_norm(params, max_norm):
        # The UNet is not wrapped in DDP (several adapter passes per backward); average LoRA grads by hand.
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def export_lora(adapter: str, directory: Path, recipe: dict) -> None:
        """The diffusers and ComfyUI (kohya) LoRA files of ``adapter``, with its sampling recipe recorded."""
        if not accelerator.is_main_process:
            return
        save_diffusers_lora(unet, adapter, directory, family=family)
        save_kohya_lora(unet, adapter, directory / "fewstep_comfyui.safetensors", family=family)
        write_recipe(directory, recipe)

    # 3. The method: adapters, optimizers, loop ---------------------------------------------------
    torch.manual_seed(config.seed)
    data_rng = torch.Generator().manual_seed(config.seed * 1000 + 17 + accelerator.process_index)
    ctx = TrainingContext(
        config=config, family=family, run_dir=run_dir, device=device, unet=unet, vae=vae, schedule=schedule,
        prompt_cond=prompt_cond, uncond=uncond, latent_shape=latent_shape, real_latents=real_latents,
        real_cond=real_cond, data_rng=data_rng, is_main_process=accelerator.is_main_process, num_processes=world,
        process_index=accelerator.process_index, wait_for_everyone=accelerator.wait_for_everyone,
        all_finite=all_finite, clip_grad_norm=clip_grad_norm, export_lora=export_lora,
        teacher_fingerprint=teacher_fingerprint(config, family, prompts),
    )  # fmt: skip
    with torch.autocast(device.type, dtype=weight_dtype, enabled=config.mixed_precision != "no"):
        run = method.build(ctx)
    loop = run.loop
    ema = AdapterEMA(run.ema_parameters, config.ema_decay) if config.ema_decay > 0 and run.ema_parameters else None

    # 4. Resume ----------------------------------------------------------------------------------
    if checkpoint is not None:
        for name in run.adapters:
            set_peft_model_state_dict(unet, load_file(checkpoint / f"{name}.safetensors"), adapter_name=name)
        for name, module in run.modules.items():
            module.load_state_dict(load_file(checkpoint / f"{name}.safetensors"))
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        for name, optimizer in loop.optimizers.items():
            optimizer.load_state_dict(state[f"{name}_optimizer"])
        for name, scheduler in loop.lr_schedulers.items():
            configured = list(scheduler.base_lrs)  # this run's rates (--lr, --fake-lr), as the method set them
            scheduler.load_state_dict(state[f"{name}_scheduler"])
            set_base_lr(scheduler, configured)  # a new --lr takes effect, not only in config.yaml
        loop.load_state_dict(state["loop"])
        data_rng.set_state(state["data_rng"])
        if ema is not None and (checkpoint / f"{GENERATOR}_ema.safetensors").is_file():
            ema.load_peft_state_dict(unet, load_file(checkpoint / f"{GENERATOR}_ema.safetensors"))
        accelerator.print(f"fewstep: resumed from {checkpoint} at step {loop.step}")

    def checkpoint_now():
        if not accelerator.is_main_process:
            return
        state = {"loop": loop.state_dict(), "data_rng": data_rng.get_state()}
        state.update({f"{name}_optimizer": o.state_dict() for name, o in loop.optimizers.items()})
        state.update({f"{name}_scheduler": s.state_dict() for name, s in loop.lr_schedulers.items()})
        adapters = {name: get_peft_model_state_dict(unet, adapter_name=name) for name in run.adapters}
        if ema is not None:
            with ema.swapped_in():
                ema_state = get_peft_model_state_dict(unet, adapter_name=GENERATOR)
                adapters[f"{GENERATOR}_ema"] = {k: v.clone() for k, v in ema_state.items()}
        save_checkpoint(run_dir, state, adapters, run.modules, config, family, config.checkpoints_total_limit)

    # 5. Validation: teacher images once, student images every validate_every --------------------
    validator = Validator(run_dir, run.sample_student, vae, schedule, validation_cond, latent_shape, config, device)

    # 6. The loop --------------------------------------------------------------------------------
    writer = open_run_logger(config.report_to, run_dir, config, loop.optimizers) if accelerator.is_main_process else None
    bar = tqdm(
        total=config.max_steps, initial=loop.step, desc=method.name, unit="it",
        disable=not accelerator.is_main_process,
    )  # fmt: skip
    teacher_x0 = run.teacher
    if validation_missed(run_dir, loop.step, config.validate_every) and accelerator.is_main_process:
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # step 0, or a grid a kill lost
            validator.run(loop.step, teacher_x0)
    interrupts.arm()
    stopped = False
    shown: dict[str, str] = {}
    while loop.step < config.max_steps and not stopped:
        with torch.autocast(device.type, dtype=weight_dtype, enabled=config.mixed_precision != "no"):
            metrics = loop.train_step([run.next_batch() for _ in range(config.gradient_accumulation_steps)])
        if ema is not None and run.updated_generator(metrics):
            ema.update()
        if loop.skipped_steps > config.max_nan_steps:
            raise TrainingError(
                f"the loss was NaN/inf in {loop.skipped_steps} steps (limit --max-nan-steps {config.max_nan_steps}); "
                "lower --lr, or use --mixed-precision bf16 instead of fp16"
            )
        bar.update(1)
        shown.update({k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss")})  # latest of each
        bar.set_postfix(shown)
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"train/{key}", value, loop.step)
        step = loop.step
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoint_now()
        if config.validate_every and step % config.validate_every == 0 and accelerator.is_main_process:
            with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                validator.run(step, teacher_x0, writer)
        if on_step is not None and on_step(step, metrics):
            stopped = True
        if interrupts.stop_requested(world, device) and step < config.max_steps:  # else the run ends now anyway
            if not checkpoint_path(run_dir, step).is_dir():
                checkpoint_now()
            bar.close()
            if writer is not None:
                writer.close()
            raise interrupts.interrupted(run_dir, step)
    bar.close()
    accelerator.wait_for_everyone()
    if world > 1:
        _check_replicas_agree(run.loop.optimizers, accelerator)

    # 7. Final checkpoint and LoRA files ---------------------------------------------------------
    if accelerator.is_main_process:
        if not config.checkpoint_every or loop.step % config.checkpoint_every:
            checkpoint_now()
        lora_dir = run_dir / "lora"
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # users get the EMA weights
            export_lora(GENERATOR, lora_dir, run.recipe())
            if run.on_finish is not None:
                run.on_finish()
        accelerator.print(f"fewstep: wrote {lora_dir}/pytorch_lora_weights.safetensors and fewstep_comfyui.safetensors")
    if writer is not None:
        writer.close()
    return run_dir


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


def teacher_fingerprint(config, family: str, prompts: list[str]) -> dict:
    """What makes a teacher's outputs what they are: caches of teacher outputs (ODE pairs) are keyed by it."""
    import hashlib

    teacher = config.teacher
    if os.path.exists(teacher):
        teacher = str(Path(teacher).resolve())
    return {
        "teacher": teacher,
        "teacher_lora": list(config.teacher_lora or []),
        "family": family,
        "guidance_scale": float(config.guidance_scale),
        "resolution": int(config.resolution),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
    }


class AdapterEMA:
    """Exponential moving average of the generator adapter (updated after each generator step)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the adapter (for validation, checkpoints and export)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def load_peft_state_dict(self, unet, state_dict: dict) -> None:
        from peft import set_peft_model_state_dict

        backup = [p.detach().clone() for p in self.params]
        set_peft_model_state_dict(unet, state_dict, adapter_name=GENERATOR)
        self.shadow = [p.detach().clone().float() for p in self.params]
        with torch.no_grad():
            for p, b in zip(self.params, backup):
                p.copy_(b)


def _check_replicas_agree(optimizers: dict, accelerator) -> None:
    """Multi-process runs average gradients by hand: prove every process ends with the same adapter weights."""
    params = [p for optimizer in optimizers.values() for group in optimizer.param_groups for p in group["params"]]
    local = torch.stack([p.detach().double().sum() for p in params])
    gathered = accelerator.gather(local[None])  # (world, n)
    spread = float((gathered - gathered[0]).abs().max())
    if spread != 0.0:
        raise TrainingError(f"adapter weights differ across processes (max |Δ| of parameter sums {spread:g})")
    accelerator.print(f"fewstep: adapter weights identical on all {accelerator.num_processes} processes")


class Validator:
    """Student-vs-teacher grids on fixed prompts and seeds, saved under ``RUN_DIR/samples/``."""

    def __init__(self, run_dir, sample_student, vae, schedule, cond, latent_shape, config, device):
        self.dir = run_dir / "samples"
        self.sample_student, self.vae, self.schedule = sample_student, vae, schedule
        self.cond, self.device = cond.to(device), device
        n = cond.prompt_embeds.shape[0]
        self.noise = torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(config.seed)).to(device)
        self.teacher_images = None
        self.n = n

    @torch.no_grad()
    def run(self, step: int, teacher_x0, writer=None) -> Path:
        from .images import save_grid
        from ..teacher.loading import decode_latents

        if self.teacher_images is None:
            batched = lambda x, t: teacher_x0(x, torch.full((self.n,), t, device=self.device), self.cond)
            teacher = sample_ddim(batched, self.noise, ddim_timesteps(25), self.schedule)
            self.teacher_images = decode_latents(self.vae, teacher)
        images = decode_latents(self.vae, self.sample_student(self.noise, self.cond))
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:07d}.png"
        save_grid([self.teacher_images, images], path)
        if writer is not None:
            writer.add_images("validation/student", images, step)
        return path
