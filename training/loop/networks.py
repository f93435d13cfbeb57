"""DMD2's three networks on ONE shared Stable Diffusion UNet.

The frozen base UNet is the teacher (real score, adapters disabled); peft adapter ``generator`` is the student;
adapter ``fake_score`` plus a small GAN head on its mid-block output is the fake score / discriminator.
Nothing else holds UNet weights, so memory is ~1 UNet + 2 adapters + their optimizer states.

peft's ``set_adapter``/``disable_adapters`` also flip ``requires_grad`` (and PyTorch drops gradients of leaves whose
flag is False at backward time), so every switch here restores the flags it found: which parameters get
gradients is decided by the DMD2 loop alone (``dmd2_loop.frozen``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.sampling import cfg
from ...core.schedule import NoiseSchedule

GENERATOR = "generator"
FAKE_SCORE = "fake_score"

# The DMD2 reference's LoRA targets (attention, feed-forward, resnets, samplers, time embedding projections).
LORA_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip


@dataclass
class TextConditioning:
    """Cached text conditioning for a batch: what the UNet needs besides x_t and t."""

    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL: (B, P)
    time_ids: torch.Tensor | None = None  # SDXL: (B, 6) original size, crop, target size

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def map(self, fn) -> "TextConditioning":
        """Apply ``fn`` to every tensor present (the SDXL-only fields may be None)."""
        apply = lambda x: None if x is None else fn(x)
        return TextConditioning(apply(self.prompt_embeds), apply(self.pooled_prompt_embeds), apply(self.time_ids))

    def to(self, device, dtype=None) -> "TextConditioning":
        return self.map(lambda x: x.to(device=device, dtype=dtype or x.dtype))

    def select(self, index: torch.Tensor) -> "TextConditioning":
        """The rows ``index`` of every field (a training batch out of the cached prompts)."""
        return self.map(lambda x: x[index])

    def repeat_to(self, batch_size: int) -> "TextConditioning":
        """Broadcast a single (1, ...) conditioning (e.g. the unconditional one) to ``batch_size``."""
        return self.map(lambda x: x.expand(batch_size, *x.shape[1:]))

    @staticmethod
    def cat(items: list["TextConditioning"]) -> "TextConditioning":
        join = lambda xs: None if xs[0] is None else torch.cat(xs)
        return TextConditioning(
            join([c.prompt_embeds for c in items]),
            join([c.pooled_prompt_embeds for c in items]),
            join([c.time_ids for c in items]),
        )

    def unet_kwargs(self) -> dict:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids}
        return kwargs


def lora_config(rank: int, alpha: float, init_lora_weights: bool | str = True):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=init_lora_weights, target_modules=LORA_TARGET_MODULES
    )


class GANHead(nn.Module):
    """DMD2's discriminator head on the fake score's mid-block features → one logit per sample.

    The reference stacks Conv4×4-s2/s4 blocks sized for 512 px; this keeps one Conv4×4-s2 block, then pools, so
    it works at any mid-block resolution ≥ 2×2 (tiny test models included).
    """

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(32, channels)
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, 1, kernel_size=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)


def call_unet(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning):
    """``unet(x_t, t, cond)`` in the UNet's dtype, the conditioning moved to x_t's device (diffusers' output)."""
    return unet(x_t.to(unet.dtype), t, **cond.to(x_t.device, unet.dtype).unet_kwargs())


def unet_x0(unet: nn.Module, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning):
    """The UNet's x0 prediction, in fp32."""
    return schedule.to_x0(call_unet(unet, x_t, t, cond).sample.float(), x_t.float(), t)


def cfg_x0(x0_of, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning, uncond: TextConditioning, scale: float):
    """CFG ``u + w(c − u)`` on the x0 predictions of ``x0_of(x_t, t, cond)``, both halves in one batched call.

    ``uncond`` is the (1, ...) unconditional conditioning; scale 1 needs only the conditional pass.
    """
    if scale == 1.0:
        return x0_of(x_t, t, cond)
    both = TextConditioning.cat([uncond.repeat_to(x_t.shape[0]).to(x_t.device), cond.to(x_t.device)])
    x0_uncond, x0_cond = x0_of(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    return cfg(x0_uncond, x0_cond, scale)


class _StopAfterMidBlock(Exception):
    """Raised by the mid-block hook: the discriminator needs no up-blocks, so the forward stops there."""


class MidBlockReader:
    """Runs ``unet`` only up to its mid block and returns that block's output: the GAN head's input.

    The up-blocks would cost about half a UNet pass (and its backward) for nothing; the DMD2 reference stops there too.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self._armed = False
        self._features: torch.Tensor | None = None
        unet.mid_block.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        if self._armed:
            self._features = output
            raise _StopAfterMidBlock

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        self._armed = True
        try:
            call_unet(self.unet, x_t, t, cond)
        except _StopAfterMidBlock:
            pass
        finally:
            self._armed = False
        features, self._features = self._features, None
        return features


class SharedUNetNetworks:
    """:class:`~fewstep.training.loop.dmd2_loop.DMD2Networks` over one UNet with two LoRA adapters.

    ``uncond`` is the teacher's unconditional text conditioning (batch 1); ``guidance_scale`` its CFG scale.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: NoiseSchedule,
        uncond: TextConditioning,
        guidance_scale: float,
        gan_head: GANHead | None = None,
        second_adapter: str = FAKE_SCORE,
    ):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.unet = unet
        self.schedule = schedule
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.gan_head = gan_head
        self._tuner_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._generator_params = [p for n, p in unet.named_parameters() if f".{GENERATOR}." in n]
        self.second_adapter = second_adapter  # "fake_score" (DMD, DMD2) or "previous" (Progressive Distillation)
        self._fake_params = [p for n, p in unet.named_parameters() if f".{second_adapter}." in n]
        if not self._generator_params or not self._fake_params:
            raise ValueError(f"the UNet needs both LoRA adapters, 'generator' and {second_adapter!r}, before training")
        if gan_head is not None:
            self._fake_params += list(gan_head.parameters())
        self._mid_block = MidBlockReader(unet)

    # ------------------------------------------------------------------ adapter switching
    def use_adapter(self, name: str | None) -> None:
        """Route the UNet through adapter ``name`` (None = the frozen base = teacher), keeping requires_grad."""
        flags = [(p, p.requires_grad) for p in self._generator_params + self._fake_params]
        for layer in self._tuner_layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)
        for p, flag in flags:
            p.requires_grad_(flag)

    def activate(self, network: str) -> None:
        """Route the UNet through ``network``'s adapter, so checkpointed blocks recompute with it in backward."""
        if network == FAKE_SCORE:
            network = self.second_adapter
        if network not in (GENERATOR, self.second_adapter):
            raise ValueError(f"unknown network {network!r}; use {GENERATOR!r} or {self.second_adapter!r}")
        self.use_adapter(network)

    def _unet_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        return unet_x0(self.unet, self.schedule, x_t, t, cond)

    # ------------------------------------------------------------------ DMD2Networks
    def generator(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        self.use_adapter(GENERATOR)
        return self._unet_x0(x_t, t, cond)

    def real_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """The teacher: base UNet, adapters off, CFG ``u + w(c − u)`` batched in one pass."""
        self.use_adapter(None)
        return cfg_x0(self._unet_x0, x_t, t, cond, self.uncond, self.guidance_scale)

    def fake_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """The second adapter's x0: the fake score (DMD, DMD2) or the previous round's student (PD)."""
        self.use_adapter(self.second_adapter)
        return self._unet_x0(x_t, t, cond)

    def discriminator(self, x_t: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """GAN logits: the fake-score pass up to the mid block, then the head (text-conditioned via cross-attn)."""
        if self.gan_head is None:
            raise ValueError("GAN weights are > 0 but no GAN head was built")
        self.use_adapter(FAKE_SCORE)
        return self.gan_head(self._mid_block(x_t, t, cond))

    def generator_parameters(self) -> list[nn.Parameter]:
        return self._generator_params

    def fake_score_parameters(self) -> list[nn.Parameter]:
        return self._fake_params


def attach_adapters(
    unet: nn.Module,
    gen_rank: int,
    gen_alpha: float,
    fake_rank: int,
    fake_alpha: float,
    init_lora_weights: bool | str = True,
    second_adapter: str = FAKE_SCORE,
) -> None:
    """Freeze the base UNet and add the ``generator`` and ``fake_score`` (or ``second_adapter``) LoRA adapters.

    Adapters are kept in fp32 and trainable; a method that freezes one (PD's previous student) says so itself.
    """
    import warnings

    unet.requires_grad_(False)
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(lora_config(gen_rank, gen_alpha, init_lora_weights), adapter_name=GENERATOR)
        unet.add_adapter(lora_config(fake_rank, fake_alpha, init_lora_weights), adapter_name=second_adapter)
    for name, param in unet.named_parameters():
        if f".{GENERATOR}." in name or f".{second_adapter}." in name:
            param.data = param.data.float()
            param.requires_grad_(True)
