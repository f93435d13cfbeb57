"""The networks whose features the metrics compare: DINOv2 (the Fréchet distance's feature space) and CLIP (the CLIP
score, and a second FD), from transformers, loaded from a Hub id or a folder saved with ``save_pretrained``.

Stein et al. 2023 ("Exposing flaws of generative model evaluation metrics") found the Inception features of FID
blind to much of what people see, and DINOv2-ViT features to rank generators as people do: FD_DINOv2 is the
Fréchet distance in the CLS embedding of ``facebook/dinov2-base`` here. The preprocessing is written in torch (no
torchvision, whose PyPI build breaks beside the CPU torch): the shorter side resized to the network's input size
(bicubic, antialiased), a centre crop, and the network's normalization — DINOv2 at 224 px with ImageNet's mean and
std (as dgm-eval and the DINOv2 image processor), CLIP at its ``vision_config.image_size`` with OpenAI's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_METRIC_MODEL = "facebook/dinov2-base"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DINOV2_INPUT_SIZE = 224  # a multiple of the 14-pixel patch; DINOv2 interpolates its position embeddings
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
KIND_NAMES = {"dinov2": "DINOv2", "clip": "CLIP"}


class MetricModelError(ValueError):
    """A metric model that cannot be loaded: the message names the option to pass instead."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _load(loader, name: str, option: str):
    """``loader.from_pretrained(name)`` (from the local cache only when HF_HUB_OFFLINE is set); a missing folder or
    an uncached Hub id is one line that names ``option``."""
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise MetricModelError(
            f"{option} {name!r} is neither a folder nor a Hub id; pass a Hub id such as {DEFAULT_METRIC_MODEL} "
            "or a folder saved with save_pretrained"
        )
    try:
        return loader.from_pretrained(str(Path(name).expanduser()) if _looks_like_path(name) else name,
                                      local_files_only=hub_offline())  # fmt: skip
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        where = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if hub_offline() else reason
        raise MetricModelError(
            f"{option} {name!r} could not be loaded ({where[:300]}); pass a local folder saved with save_pretrained, "
            "or run once with network access to cache it"
        ) from None


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → the network's input: shorter side resized to ``size`` (bicubic, antialiased), the
    centre ``size``×``size`` crop, normalized by ``mean``/``std``."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    if resized != (height, width):
        images = F.interpolate(images, size=resized, mode="bicubic", antialias=True, align_corners=False)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    images = images[..., top : top + size, left : left + size].clamp(0, 1)
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype)[:, None, None]
    std = torch.tensor(std, device=images.device, dtype=images.dtype)[:, None, None]
    return (images - mean) / std


@dataclass
class FeatureNetwork:
    """An image network as the metrics use it: (B, 3, H, W) in [0, 1] → (B, D) float32 features on the CPU."""

    name: str  # the Hub id or folder it was loaded from
    kind: str  # "dinov2" or "clip"
    model: torch.nn.Module
    size: int  # input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: object = None  # CLIP's, for the text embeddings of the CLIP score

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2: the layer-normed CLS token; CLIP: the projected image embedding (not normalized)."""
        pixels = preprocess(images.to(self.device, torch.float32), self.size, self.mean, self.std)
        if self.kind == "clip":
            output = self.model.get_image_features(pixel_values=pixels)
        else:
            output = self.model(pixel_values=pixels)
        return _pooled(output).float().cpu()

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's projected text embeddings of ``prompts`` (truncated to its context length)."""
        if self.kind != "clip":
            raise ValueError(f"{self.name} is a {KIND_NAMES[self.kind]} model: it has no text tower")
        length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=length, return_tensors="pt")
        output = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return _pooled(output).float().cpu()


def _pooled(output) -> torch.Tensor:
    """transformers 4 returns CLIP's features as a tensor, 5 as an output whose pooler_output they are; DINOv2's
    pooler_output is its layer-normed CLS token."""
    return output if torch.is_tensor(output) else output.pooler_output


def load_feature_network(name: str, option: str, device: str | torch.device = "cpu") -> FeatureNetwork:
    """A DINOv2 or CLIP model (told apart by its config) from a Hub id or folder, in fp32 eval mode on ``device``.
    ``option`` (e.g. ``--metric-model``) is what the errors tell the user to pass."""
    from transformers import AutoConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # loading bars would bury a one-line error; scoring has its own
    model_type = getattr(_load(AutoConfig, name, option), "model_type", None)
    if model_type == "dinov2":
        from transformers import Dinov2Model

        model = _load(Dinov2Model, name, option)
        network = FeatureNetwork(name, "dinov2", model, DINOV2_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    elif model_type == "clip":
        from transformers import AutoTokenizer, CLIPModel

        model = _load(CLIPModel, name, option)
        size = int(model.config.vision_config.image_size)
        network = FeatureNetwork(name, "clip", model, size, CLIP_MEAN, CLIP_STD, _load(AutoTokenizer, name, option))
    else:
        raise MetricModelError(
            f"{option} {name!r} is a {model_type!r} model; give a DINOv2 model (e.g. {DEFAULT_METRIC_MODEL}) or a "
            f"CLIP model (e.g. {DEFAULT_CLIP_MODEL})"
        )
    network.model.requires_grad_(False).eval().to(device=device, dtype=torch.float32)
    return network


def load_clip(name: str, option: str, device: str | torch.device = "cpu") -> FeatureNetwork:
    """A CLIP model (the CLIP score needs its text tower too)."""
    network = load_feature_network(name, option, device)
    if network.kind != "clip":
        raise MetricModelError(
            f"{option} {name!r} is a {KIND_NAMES[network.kind]} model; the CLIP score needs a CLIP model such as "
            f"{DEFAULT_CLIP_MODEL}"
        )
    return network
