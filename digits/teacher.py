"""The embedded default teacher: a small Stable Diffusion model of scikit-learn's handwritten digits.

``build_digits_teacher`` trains, on the CPU in minutes, a ``StableDiffusionPipeline`` folder that loads like SD1.5:
an ``AutoencoderKL`` (32×32 RGB ↔ 4×8×8 latents scaled to unit std), a frozen random ``CLIPTextModel`` with an
offline tokenizer, and a ``UNet2DConditionModel`` trained with ε-prediction on the DDPM ``scaled_linear`` schedule
and 10% caption dropout (so classifier-free guidance works). Captions read "a handwritten digit seven".
``digits_teacher`` makes it once per config in the user cache (``training/cache.py``) and reuses it; the default
config's teacher ships with the package in fp16 (``digits/shipped.py``) and is unpacked instead of trained.

The data split is fixed (80/20, stratified, ``SPLIT_SEED``) and independent of the teacher's seed: the teacher and
the yardstick's classifier train on ``train`` only; the yardstick compares generated digits with ``test``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.schedule import SD_TRAINING_SCHEDULE
from ..training.data.cache import cache_root, cached_build, config_hash
from ..training.teacher.loading import BUILD_RECORD_FILE

VERSION = 1  # bump when the build procedure changes, so old cache entries are not reused
TEACHER_CONFIG_FILE = BUILD_RECORD_FILE  # the build's record beside the weights
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SIZE = 32


def caption(digit: int) -> str:
    """The teacher's prompt for a digit: ``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 3, 32, 32) in [-1, 1] (dark ink on white) and their labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@functools.lru_cache(maxsize=1)
def load_digits_split() -> DigitsSplit:
    """scikit-learn's 1,797 8×8 digits, bicubic-upsampled to 32×32 RGB, split 80/20 stratified (fixed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    ink = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8), 1 = ink
    ink = F.interpolate(ink, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    images = (1.0 - 2.0 * ink).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION, stratify=labels.numpy(), random_state=SPLIT_SEED
    )
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return DigitsSplit(images[train], labels[train], images[test], labels[test])


def write_digits_folder(directory: str | Path, split: str = "train") -> Path:
    """PNG files plus ``metadata.jsonl`` captions (``fewstep.training.data.prompts.read_image_folder``'s format)."""
    from ..training.loop.images import to_pil

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits_split()
    if split == "train":
        images, labels = data.train_images, data.train_labels
    else:
        images, labels = data.test_images, data.test_labels
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        name = f"{split}-{i:04d}-{label}.png"
        to_pil(image / 2 + 0.5).save(directory / name)
        lines.append(json.dumps({"file_name": name, "text": caption(label)}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def cached_train_images() -> Path:
    """The train split as a captioned image folder (the GAN's real images), written once under the user cache."""
    directory = cache_root() / "digits-train-images"
    if not (directory / "metadata.jsonl").is_file():
        write_digits_folder(directory, "train")
    return directory


def write_digit_prompts(path: str | Path) -> Path:
    """A prompts file with one caption per digit (what the demo and the benchmarks distil on)."""
    path = Path(path)
    path.write_text("\n".join(caption(d) for d in range(10)) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- config
@dataclass
class DigitsTeacherConfig:
    """How the digits teacher is built. Recorded in ``fewstep_teacher.json``; the cache key hashes all of it."""

    seed: int = field(default=0, metadata={"help": "random seed of every stage (the data split is fixed)"})
    vae_blocks: list[int] = field(
        default_factory=lambda: [32, 64, 64], metadata={"help": "VAE block widths (3 blocks: 32 px → 8×8 latents)"}
    )
    vae_iterations: int = field(default=300, metadata={"help": "VAE training iterations"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE AdamW learning rate"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "VAE KL weight (small: near-deterministic latents)"})
    text_hidden: int = field(default=64, metadata={"help": "CLIP text encoder width (frozen at random init)"})
    text_layers: int = field(default=2, metadata={"help": "CLIP text encoder layers"})
    unet_blocks: list[int] = field(
        default_factory=lambda: [64, 128], metadata={"help": "UNet block widths (cross-attention: last and mid block)"}
    )
    unet_layers_per_block: int = field(default=1, metadata={"help": "resnets per UNet block"})
    unet_iterations: int = field(
        default=1400, metadata={"help": "UNet training iterations (prompt-following appears after ~1,100)"}
    )
    batch_size: int = field(default=64, metadata={"help": "batch size of both stages"})
    lr: float = field(default=5e-4, metadata={"help": "UNet AdamW learning rate"})
    warmup: int = field(default=100, metadata={"help": "UNet linear learning-rate warm-up iterations"})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the UNet weights (the EMA is saved)"})
    caption_dropout: float = field(default=0.1, metadata={"help": "fraction of captions replaced by '' (for CFG)"})

    def __post_init__(self):
        if len(self.vae_blocks) != 3:
            raise ValueError(f"vae_blocks needs 3 widths (32 px → 8×8 latents), got {self.vae_blocks}")
        if len(self.unet_blocks) != 2:
            raise ValueError(f"unet_blocks needs 2 widths, got {self.unet_blocks}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if min(self.vae_iterations, self.unet_iterations, self.batch_size) < 1:
            raise ValueError("vae_iterations, unet_iterations and batch_size must be ≥ 1")


# ----------------------------------------------------------------------------------------------- models
def _group_norm_groups(widths: list[int]) -> int:
    """The largest GroupNorm group count (≤ 32) that divides every width."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))


def _vae(config: DigitsTeacherConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=list(config.vae_blocks),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=_group_norm_groups(config.vae_blocks),
        sample_size=IMAGE_SIZE,
    )


def _text_encoder(config: DigitsTeacherConfig, tokenizer):
    from transformers import CLIPTextModel

    from ..training.teacher.tiny_models import clip_text_config

    text_config = clip_text_config(
        tokenizer, hidden_size=config.text_hidden, intermediate_size=4 * config.text_hidden, num_attention_heads=4,
        num_hidden_layers=config.text_layers,
    )  # fmt: skip
    return CLIPTextModel(text_config).eval().requires_grad_(False)


def _unet(config: DigitsTeacherConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    # Cross-attention only at the 4×4 level and the mid block: at 8×8 it doubled the step time for no gain.
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(config.unet_blocks),
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=config.text_hidden,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=_group_norm_groups(config.unet_blocks),
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # SD1.5's training schedule; "trailing" spacing so that the stock pipeline's 1-step sampling starts at t = 999.
    return DDIMScheduler(
        **SD_TRAINING_SCHEDULE, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="trailing",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- training
def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, dynamic_ncols=True)


def _train_vae(vae, images: torch.Tensor, config: DigitsTeacherConfig, generator: torch.Generator, progress: bool):
    """Reconstruction MSE + a small KL term on the train images."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    vae.train()
    with _progress(config.vae_iterations, "teacher 1/2: VAE ", progress) as bar:
        for _ in range(config.vae_iterations):
            batch = images[torch.randint(len(images), (config.batch_size,), generator=generator).to(images.device)]
            posterior = vae.encode(batch).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(batch.device)
            reconstruction = vae.decode(z).sample
            mse = F.mse_loss(reconstruction, batch)
            loss = mse + config.vae_kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(mse=f"{mse.item():.4f}", refresh=False)
            bar.update(1)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def _encode(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of all images."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _train_unet(
    unet,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    config: DigitsTeacherConfig,
    generator: torch.Generator,
    progress: bool,
):
    """ε-prediction MSE on the DDPM schedule with caption dropout; returns the EMA of the weights.

    ``latent_*`` are already multiplied by the scaling factor; ``text`` holds the 11 caption encodings
    (digits 0–9, then ""), so the frozen text encoder runs once.
    """
    from ..core.schedule import NoiseSchedule

    schedule = NoiseSchedule.from_config(dict(_scheduler().config))
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup)))
    empty = len(DIGIT_WORDS)
    device = latent_mean.device  # random numbers come from the CPU generator on any device: one stream per seed
    labels = labels.to(device)
    unet.train()
    with _progress(config.unet_iterations, "teacher 2/2: UNet", progress) as bar:
        for _ in range(config.unet_iterations):
            index = torch.randint(len(labels), (config.batch_size,), generator=generator).to(device)
            x0 = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator).to(device)
            dropped = (torch.rand(config.batch_size, generator=generator) < config.caption_dropout).to(device)
            prompt = torch.where(dropped, empty, labels[index])
            t = torch.randint(schedule.num_train_timesteps, (config.batch_size,), generator=generator).to(device)
            eps = torch.randn(x0.shape, generator=generator).to(device)
            prediction = unet(schedule.add_noise(x0, eps, t), t, encoder_hidden_states=text[prompt]).sample
            loss = F.mse_loss(prediction, eps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            warmup.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1.0 - config.ema_decay)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update(1)
    return ema.eval()


def build_digits_teacher(
    config: DigitsTeacherConfig, directory: str | Path, progress: bool = True, device: str = "cpu"
) -> Path:
    """Train the digits teacher and save it as a ``StableDiffusionPipeline`` folder (plus its build config)."""
    from diffusers import StableDiffusionPipeline

    from ..training.teacher.tiny_models import save_tiny_pipeline, write_offline_clip_tokenizer

    started = time.perf_counter()
    directory = Path(directory)
    data = load_digits_split()
    generator = torch.Generator().manual_seed(config.seed)

    torch.manual_seed(config.seed)
    images = data.train_images.to(device)
    vae = _train_vae(_vae(config).to(device), images, config, generator, progress)
    latent_mean, latent_std = _encode(vae, images)
    # SD's convention: latents · scaling_factor have unit std; the factor lives in the VAE config.
    noise = torch.randn(latent_mean.shape, generator=generator).to(device)
    scaling_factor = float(1.0 / (latent_mean + latent_std * noise).std())
    vae.register_to_config(scaling_factor=scaling_factor)

    words = ["a", "handwritten", "digit", *DIGIT_WORDS]
    tokenizer = write_offline_clip_tokenizer(directory / "tokenizer", extra_words=words)
    torch.manual_seed(config.seed + 1)
    text_encoder = _text_encoder(config, tokenizer)
    with torch.no_grad():
        tokens = tokenizer([caption(d) for d in range(10)] + [""], padding="max_length", return_tensors="pt")
        text = text_encoder(tokens.input_ids).last_hidden_state

    torch.manual_seed(config.seed + 2)
    unet = _unet(config, latent_size=IMAGE_SIZE // 4).to(device)
    latent_mean, latent_std = latent_mean * scaling_factor, latent_std * scaling_factor
    unet = _train_unet(unet, latent_mean, latent_std, data.train_labels, text.to(device), config, generator, progress)
    vae, unet = vae.cpu(), unet.cpu()

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_tiny_pipeline(pipe, directory)
    record = {
        "kind": "digits-teacher",
        "version": VERSION,
        "config_hash": config_hash(config),
        "config": dataclasses.asdict(config),
        "split": {
            "seed": SPLIT_SEED,
            "test_fraction": TEST_FRACTION,
            "train": len(data.train_labels),
            "test": len(data.test_labels),
        },
        "build_seconds": round(time.perf_counter() - started, 1),
        "device": torch.device(device).type,
        "torch": torch.__version__,
    }
    (directory / TEACHER_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def read_teacher_config(directory: str | Path) -> DigitsTeacherConfig:
    """The config a digits teacher folder was built from (to rebuild it)."""
    path = Path(directory) / TEACHER_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} has no {TEACHER_CONFIG_FILE}; it was not built by `fewstep teacher digits`")
    return DigitsTeacherConfig(**json.loads(path.read_text())["config"])


def teacher_config_from_file(path: str | Path | None = None, seed: int | None = None) -> DigitsTeacherConfig:
    """A config from a YAML file of fields or a recorded ``fewstep_teacher.json`` (unknown keys rejected)."""
    from ..training.loop.config import build_config, load_yaml

    fields = {}
    if path is not None:
        fields = load_yaml(path)
        if fields.get("kind") == "digits-teacher":
            fields = fields["config"]
    seeds = {} if seed is None else {"seed": seed}
    return build_config(DigitsTeacherConfig, fields, seeds, sources=(None if path is None else str(path), None))


def ships(config: DigitsTeacherConfig) -> bool:
    """Whether the teacher shipped in the package was built from ``config`` with the current build procedure."""
    from .shipped import shipped_record

    record = shipped_record()
    return record is not None and record["version"] == VERSION and record["config_hash"] == config_hash(config)


def digits_teacher(
    config: DigitsTeacherConfig | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> Path:
    """The cached digits teacher folder for ``config`` (default config if None), made on first use.

    The default config's teacher is unpacked from the one shipped in the package (seconds; ``digits/shipped.py``);
    any other config, or ``force``, trains one from its config.
    """
    from .shipped import unpack_teacher

    config = config or DigitsTeacherConfig()

    def build(directory: Path) -> None:
        if not force and ships(config):
            log("fewstep: unpacking the digits teacher shipped with fewstep (the default build, stored in fp16)")
            unpack_teacher(directory)
            return
        log(
            f"fewstep: building the digits teacher (seed {config.seed}; VAE {config.vae_iterations} + UNet "
            f"{config.unet_iterations} iterations, about 15 minutes on 2 CPU cores); it is cached for next time"
        )
        build_digits_teacher(config, directory, progress=progress, device=device)

    return cached_build("digits-teacher", VERSION, config, build, force=force, log=log)
