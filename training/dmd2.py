"""DMD2 LoRA distillation of an SD1.5- or SDXL-family teacher on one shared base UNet.

Reads top to bottom: config → teacher and cached encodings → adapters and optimizers → resume → loop
(the model-agnostic :class:`~fewstep.training.dmd2_loop.DMD2Loop`) → checkpoints, validation, LoRA files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.sampling import ddim_timesteps, sample_ddim, sample_few_step
from ..core.schedule import student_timesteps, validate_timesteps
from . import interrupts
from .config import build_config, check_config, load_yaml, save_yaml
from .dmd2_loop import DMD2Batch, DMD2Loop, DMD2LoopConfig
from .networks import FAKE_SCORE, GENERATOR, GANHead, SharedUNetNetworks, attach_adapters
from .resume import check_resume, saved_options, set_base_lr
from .run_dir import checkpoint_path, claim_run_dir, clear_run_dir, validation_missed
from .trackers import open_run_logger, resolve_report_to

# Per-family defaults (docs/defaults.md sets each beside the DMD2 reference's value); every one can be overridden.
FAMILY_DEFAULTS = {
    "sd15": dict(guidance_scale=1.75, dfake_gen_update_ratio=10, gan_weight=1e-3, gradient_checkpointing=False),
    "sdxl": dict(guidance_scale=8.0, dfake_gen_update_ratio=5, gan_weight=5e-3, gradient_checkpointing=True),
}
# The reference's effective batch (per-GPU batch × 64 GPUs); far below it the DM gradient is much noisier.
REFERENCE_EFFECTIVE_BATCH = {"sd15": 32 * 64, "sdxl": 2 * 64}
FAR_BELOW_REFERENCE = 16  # warn when the effective batch is under 1/16 of the reference's


class TrainingError(RuntimeError):
    """Training cannot go on: the message says why and what to do."""


@dataclass
class DMD2TrainConfig:
    """``fewstep train --method dmd2`` options. None means "the teacher family's default"."""

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
        default=1000, metadata={"help": "training iterations (fake-score updates)", "min": 1, "on_resume": "may change"}
    )
    num_steps: int = field(
        default=1, metadata={"help": "student sampling steps: 1 = [999], 4 = [999,749,499,249]", "min": 1}
    )
    timesteps: list[int] | None = field(
        default=None, metadata={"help": "custom student timesteps, e.g. 999,499", "max": 999}
    )
    lr: float = field(
        default=5e-5,
        metadata={"help": "AdamW learning rate of the generator adapter", "above": 0, "on_resume": "may change"},
    )
    fake_lr: float | None = field(
        default=None,
        metadata={"help": "AdamW learning rate of the fake-score adapter and the GAN head (default: --lr)", "above": 0,
                  "on_resume": "may change"},
    )  # fmt: skip
    warmup_steps: int = field(
        default=100, metadata={"help": "linear learning-rate warm-up of both optimizers, in iterations"}
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
    dfake_gen_update_ratio: int | None = field(
        default=None, metadata={"help": "fake-score updates per generator update (sd15 10, sdxl 5)", "min": 1}
    )
    gen_rank: int = field(default=64, metadata={"help": "generator LoRA rank", "min": 1})
    gen_alpha: float = field(default=8.0, metadata={"help": "generator LoRA alpha", "above": 0})
    fake_rank: int = field(default=64, metadata={"help": "fake-score LoRA rank", "min": 1})
    fake_alpha: float | None = field(
        default=None, metadata={"help": "fake-score LoRA alpha (default: --fake-rank, i.e. LoRA scale 1)", "above": 0}
    )
    gan_weight: float | None = field(
        default=None, metadata={"help": "generator GAN loss weight (sd15 1e-3, sdxl 5e-3; 0 = no GAN)", "min": 0}
    )
    disc_weight: float = field(default=1e-2, metadata={"help": "discriminator loss weight", "min": 0})
    backward_simulation: bool = field(default=True, metadata={"help": "multi-step: train on the student's own inputs"})
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

    def resolved(self, family: str) -> "DMD2TrainConfig":
        """Every "None = default" filled in: the family's defaults, then the ones derived from other options."""
        defaults = FAMILY_DEFAULTS[family]
        fills = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.fake_lr is None:
            fills["fake_lr"] = self.lr
        if self.fake_alpha is None:
            fills["fake_alpha"] = float(self.fake_rank)
        if self.mixed_precision == "auto":
            fills["mixed_precision"] = auto_mixed_precision()
        return dataclasses.replace(self, **fills)


def auto_mixed_precision() -> str:
    """bf16 (autocast over a bf16 base, fp32 adapters) on a GPU that supports it; full precision elsewhere."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def lr_factor(iteration: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based), for both optimizers.

    Linear warm-up ``min(1, (k + 1) / warmup_steps)``; then constant, or cosine ``½(1 + cos(π·p))`` with
    p = (k − warmup_steps) / (max_steps − warmup_steps). Counted in iterations, as the reference steps both of
    its schedulers every iteration, so a generator that updates every 10th iteration still leaves warm-up.
    """
    warm = min(1.0, (iteration + 1) / max(1, warmup_steps))
    if schedule == "constant":
        return warm
    progress = min(1.0, max(0, iteration - warmup_steps) / max(1, max_steps - warmup_steps))
    return warm * 0.5 * (1 + math.cos(math.pi * progress))


def check_option_combinations(config: "DMD2TrainConfig", use_gan: bool, num_steps: int) -> None:
    """Refuse combinations that are known-bad or that nothing tests, before any model loads."""
    if use_gan and config.disc_weight <= 0:
        raise TrainingError(
            f"--gan-weight {config.gan_weight} with --disc-weight {config.disc_weight}: the generator would chase an "
            "untrained discriminator; set --disc-weight > 0 (default 1e-2) or --gan-weight 0"
        )
    if num_steps > 1 and not config.backward_simulation and not use_gan:
        raise TrainingError(
            "a multi-step student without --backward-simulation trains on noised real images; give --images DIR "
            "or keep backward simulation on (the default)"
        )


def effective_batch_warning(config: "DMD2TrainConfig", family: str, num_processes: int) -> str | None:
    """A one-line warning when the effective batch is far below what the reference validated."""
    effective = config.batch_size * config.gradient_accumulation_steps * num_processes
    reference = REFERENCE_EFFECTIVE_BATCH[family]
    if effective * FAR_BELOW_REFERENCE >= reference:
        return None
    return (
        f"fewstep: warning: effective batch {effective} (batch {config.batch_size} × accumulation "
        f"{config.gradient_accumulation_steps} × {num_processes} process(es)) is far below the DMD2 reference's "
        f"{reference} for {family}; expect noisier distribution-matching gradients: raise --gradient-accumulation-steps "
        "or --batch-size, or lower --lr (docs/defaults.md)"
    )


def make_config(cli: dict, config_file: str | None = None) -> DMD2TrainConfig:
    """YAML then CLI (CLI wins); values typed and checked, unknown keys rejected."""
    layers = (load_yaml(config_file), cli) if config_file else (cli,)
    return build_config(DMD2TrainConfig, *layers, sources=(config_file, None) if config_file else (None,))


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir: Path, state: dict, adapters: dict, gan_head, config, family: str, limit: int) -> Path:
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
        if gan_head is not None:
            save_file({k: v.contiguous().cpu() for k, v in gan_head.state_dict().items()}, tmp / "gan_head.safetensors")
        torch.save(state, tmp / "training_state.pt")
        save_yaml(config, tmp / "config.yaml")
        (tmp / "family").write_text(family)
    except BaseException:  # a full disk (torch reports it as a RuntimeError), a second Ctrl-C: leave no half copy
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))
    for old in checkpoints[: max(0, len(checkpoints) - limit)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ the trainer
@interrupts.handles_stop_signals
def train_dmd2(config: DMD2TrainConfig, resume: bool = False, on_step=None, overwrite: bool = False) -> Path:
    """Run DMD2. ``on_step(step, metrics)`` is called after each iteration; returning True stops the run.

    ``overwrite`` lets a new run replace the run already in ``config.output`` (see :mod:`.run_dir`); SIGINT and
    SIGTERM stop after a checkpoint (see :mod:`.interrupts`).
    """
    from accelerate import Accelerator
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm import tqdm

    from . import teacher as teachers
    from .hf_dataset import read_training_data
    from .lora_io import save_diffusers_lora, save_kohya_lora

    check_config(config)
    if not config.output:
        raise TrainingError("--output is required (the run directory)")
    resolve_report_to(config.report_to)  # an unusable tracker fails before the teacher loads
    run_dir = Path(config.output)
    checkpoint = claim_run_dir(run_dir, resume, overwrite)
    if checkpoint is not None:
        check_resume(config, saved_options(checkpoint), checkpoint)
    if not config.teacher:
        raise TrainingError("--teacher is required (a Hub id, a local diffusers folder or a .safetensors file)")
    if config.timesteps:
        validate_timesteps(config.timesteps)  # before minutes of loading

    # 1. Data first (cheap to check), then the teacher, its family and the family's defaults -----------
    prompts, real_items = read_training_data(config, run_dir)  # --prompts, --images, --dataset
    if config.mixed_precision == "auto":
        config = dataclasses.replace(config, mixed_precision=auto_mixed_precision())
    # Mixed precision is ours, not accelerate's: autocast below, and the loop's per-optimizer GradScalers for fp16
    # (accelerate's scaler needs accelerator.backward, which cannot do the loop's staged backward).
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
    timesteps = (
        validate_timesteps(config.timesteps) if config.timesteps else student_timesteps(config.num_steps)
    )
    if config.gan_weight > 0 and not real_items:
        print("fewstep: no --images given, training without the GAN loss (DMD2 stage 1)")
    use_gan = config.gan_weight > 0 and bool(real_items)
    check_option_combinations(config, use_gan, len(timesteps))
    warning = effective_batch_warning(config, family, accelerator.num_processes)
    if warning:
        accelerator.print(warning)
    device = accelerator.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]

    if overwrite and accelerator.is_main_process:  # once, before any process writes into the directory
        clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
    validation_prompts = prompts[: config.num_validation_prompts]
    validation_cond = teachers.encode_prompts(pipe, family, validation_prompts, resolution)
    unet, vae = pipe.unet, pipe.vae
    pipe.text_encoder = pipe.tokenizer = None
    if family == "sdxl":
        pipe.text_encoder_2 = pipe.tokenizer_2 = None
    vae.encoder = None  # only the decoder is needed, for validation images
    del pipe
    unet.to(device, weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    latent_size = resolution // teachers.vae_scale_factor_of(vae)
    latent_shape = (unet.config.in_channels, latent_size, latent_size)

    # 3. Adapters, GAN head, optimizers ----------------------------------------------------------
    torch.manual_seed(config.seed)
    attach_adapters(unet, config.gen_rank, config.gen_alpha, config.fake_rank, config.fake_alpha)
    gan_head = GANHead(unet.config.block_out_channels[-1]).to(device) if use_gan else None
    networks = SharedUNetNetworks(unet, schedule, uncond, config.guidance_scale, gan_head)

    def adamw(params, lr):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)

    def lr_scheduler(optimizer):  # stepped once per iteration by the loop, for both optimizers
        factor = lambda iteration: lr_factor(iteration, config.warmup_steps, config.max_steps, config.lr_schedule)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    generator_optimizer = adamw(networks.generator_parameters(), config.lr)
    fake_score_optimizer = adamw(networks.fake_score_parameters(), config.fake_lr)
    generator_scheduler = lr_scheduler(generator_optimizer)
    fake_score_scheduler = lr_scheduler(fake_score_optimizer)
    ema = AdapterEMA(networks.generator_parameters(), config.ema_decay) if config.ema_decay > 0 else None

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

    loop = DMD2Loop(
        networks,
        generator_optimizer,
        fake_score_optimizer,
        DMD2LoopConfig(
            student_timesteps=timesteps,
            dfake_gen_update_ratio=config.dfake_gen_update_ratio,
            gan_generator_weight=config.gan_weight if use_gan else 0.0,
            gan_discriminator_weight=config.disc_weight if use_gan else 0.0,
            backward_simulation=config.backward_simulation,
            max_grad_norm=config.max_grad_norm,
        ),
        seed=config.seed,
        rank=accelerator.process_index,
        generator_lr_scheduler=generator_scheduler,
        fake_score_lr_scheduler=fake_score_scheduler,
        clip_grad_norm=clip_grad_norm,
        all_finite=all_finite,
        device=device,
        fp16_loss_scaling=config.mixed_precision == "fp16",
    )
    data_rng = torch.Generator().manual_seed(config.seed * 1000 + 17 + accelerator.process_index)

    # 4. Resume ----------------------------------------------------------------------------------
    if checkpoint is not None:
        for name in (GENERATOR, FAKE_SCORE):
            set_peft_model_state_dict(unet, load_file(checkpoint / f"{name}.safetensors"), adapter_name=name)
        if gan_head is not None:
            gan_head.load_state_dict(load_file(checkpoint / "gan_head.safetensors"))
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        generator_optimizer.load_state_dict(state["generator_optimizer"])
        fake_score_optimizer.load_state_dict(state["fake_score_optimizer"])
        generator_scheduler.load_state_dict(state["generator_scheduler"])
        fake_score_scheduler.load_state_dict(state["fake_score_scheduler"])
        set_base_lr(generator_scheduler, config.lr)  # a new --lr takes effect, not only in config.yaml
        set_base_lr(fake_score_scheduler, config.fake_lr)
        loop.load_state_dict(state["loop"])
        data_rng.set_state(state["data_rng"])
        if ema is not None and (checkpoint / f"{GENERATOR}_ema.safetensors").is_file():
            ema.load_peft_state_dict(unet, load_file(checkpoint / f"{GENERATOR}_ema.safetensors"))
        accelerator.print(f"fewstep: resumed from {checkpoint} at step {loop.step}")

    def checkpoint_now():
        if not accelerator.is_main_process:
            return
        state = {
            "loop": loop.state_dict(),
            "data_rng": data_rng.get_state(),
            "generator_optimizer": generator_optimizer.state_dict(),
            "fake_score_optimizer": fake_score_optimizer.state_dict(),
            "generator_scheduler": generator_scheduler.state_dict(),
            "fake_score_scheduler": fake_score_scheduler.state_dict(),
        }
        adapters = {name: get_peft_model_state_dict(unet, adapter_name=name) for name in (GENERATOR, FAKE_SCORE)}
        if ema is not None:
            with ema.swapped_in():
                adapters[f"{GENERATOR}_ema"] = {k: v.clone() for k, v in get_peft_model_state_dict(unet, adapter_name=GENERATOR).items()}
        save_checkpoint(run_dir, state, adapters, gan_head, config, family, config.checkpoints_total_limit)

    # 5. Validation: teacher images once, student images every validate_every --------------------
    validator = _Validator(run_dir, networks, vae, schedule, validation_cond, latent_shape, timesteps, config, device)

    # 6. The loop --------------------------------------------------------------------------------
    def next_batch() -> DMD2Batch:
        idx = torch.randint(0, prompt_cond.prompt_embeds.shape[0], (config.batch_size,), generator=data_rng)
        cond = prompt_cond.select(idx).to(device)
        batch = DMD2Batch(shape=(config.batch_size, *latent_shape), cond=cond)
        if real_latents is not None:
            ridx = torch.randint(0, len(real_latents), (config.batch_size,), generator=data_rng)
            batch.real_x0 = real_latents.sample(ridx, data_rng).to(device)
            batch.real_cond = real_cond.select(ridx).to(device)
        return batch

    optimizers = {"generator": generator_optimizer, "fake_score": fake_score_optimizer}
    writer = open_run_logger(config.report_to, run_dir, config, optimizers) if accelerator.is_main_process else None
    bar = tqdm(
        total=config.max_steps, initial=loop.step, desc="DMD2", unit="it", disable=not accelerator.is_main_process
    )
    if validation_missed(run_dir, loop.step, config.validate_every) and accelerator.is_main_process:
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # step 0, or a grid a kill lost
            validator.run(loop.step)
    interrupts.arm()
    stopped = False
    shown: dict[str, str] = {}
    while loop.step < config.max_steps and not stopped:
        with torch.autocast(device.type, dtype=weight_dtype, enabled=config.mixed_precision != "no"):
            metrics = loop.train_step([next_batch() for _ in range(config.gradient_accumulation_steps)])
        if ema is not None and "loss_dm" in metrics:
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
                validator.run(step, writer)
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
        _check_replicas_agree(networks, accelerator)

    # 7. Final checkpoint and LoRA files ---------------------------------------------------------
    if accelerator.is_main_process:
        if not config.checkpoint_every or loop.step % config.checkpoint_every:
            checkpoint_now()
        networks.use_adapter(GENERATOR)
        lora_dir = run_dir / "lora"
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():  # users get the EMA weights
            save_diffusers_lora(unet, GENERATOR, lora_dir, family=family)
            save_kohya_lora(unet, GENERATOR, lora_dir / "fewstep_comfyui.safetensors", family=family)
        accelerator.print(f"fewstep: wrote {lora_dir}/pytorch_lora_weights.safetensors and fewstep_comfyui.safetensors")
    if writer is not None:
        writer.close()
    return run_dir


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


def _check_replicas_agree(networks: SharedUNetNetworks, accelerator) -> None:
    """Multi-process runs average gradients by hand: prove every process ends with the same adapter weights."""
    params = networks.generator_parameters() + networks.fake_score_parameters()
    local = torch.stack([p.detach().double().sum() for p in params])
    gathered = accelerator.gather(local[None])  # (world, n)
    spread = float((gathered - gathered[0]).abs().max())
    if spread != 0.0:
        raise TrainingError(f"adapter weights differ across processes (max |Δ| of parameter sums {spread:g})")
    accelerator.print(f"fewstep: adapter weights identical on all {accelerator.num_processes} processes")


class _Validator:
    """Student-vs-teacher grids on fixed prompts and seeds, saved under ``RUN_DIR/samples/``."""

    def __init__(self, run_dir, networks, vae, schedule, cond, latent_shape, timesteps, config, device):
        self.dir = run_dir / "samples"
        self.networks, self.vae, self.schedule = networks, vae, schedule
        self.cond, self.timesteps, self.device = cond.to(device), timesteps, device
        n = cond.prompt_embeds.shape[0]
        self.noise = torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(config.seed)).to(device)
        self.teacher_images = None
        self.n = n

    def _batched_t(self, t):
        return torch.full((self.n,), t, device=self.device)

    @torch.no_grad()
    def run(self, step: int, writer=None) -> Path:
        from .images import save_grid
        from .teacher import decode_latents

        if self.teacher_images is None:
            teacher = sample_ddim(
                lambda x, t: self.networks.real_score(x, self._batched_t(t), self.cond),
                self.noise,
                ddim_timesteps(25),
                self.schedule,
            )
            self.teacher_images = decode_latents(self.vae, teacher)
        student = sample_few_step(
            lambda x, t: self.networks.generator(x, self._batched_t(t), self.cond),
            self.noise,
            self.timesteps,
            self.schedule,
            torch.Generator().manual_seed(0),
        )
        images = decode_latents(self.vae, student)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:07d}.png"
        save_grid([self.teacher_images, images], path)
        if writer is not None:
            writer.add_images("validation/student", images, step)
        return path
