"""Styled teachers: style LoRAs (kohya or diffusers format) fused into the frozen base before distillation.

``--teacher-lora FILE[:SCALE]`` (repeatable). The fused base is the teacher *and* the base the fewstep LoRA is
trained on, so users sample with base + the same style LoRAs (fused, at the same scales) + the fewstep LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..publish.lora_files import lora_family_of_state_dict

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# Style LoRAs are used at -2 … 2 in practice; far outside that the fused teacher is broken, not styled.
MAX_STYLE_SCALE = 4.0


class StyleLoraError(ValueError):
    """A style LoRA cannot be used: the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class StyleLora:
    path: Path
    scale: float = 1.0

    @property
    def adapter_name(self) -> str:
        return "style_" + "".join(c if c.isalnum() else "_" for c in self.path.stem)

    def spec(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_style_spec(spec: str) -> StyleLora:
    """``FILE`` or ``FILE:SCALE`` (the scale after the last ':', so Windows drive letters survive)."""
    text = str(spec).strip()
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return StyleLora(Path(head).expanduser(), float(tail))
        except ValueError:
            pass
    return StyleLora(Path(text).expanduser(), 1.0)


def parse_style_lora(spec: str) -> StyleLora:
    """A ``--teacher-lora FILE[:SCALE]`` whose file exists and is safetensors."""
    text = str(spec).strip()
    lora = parse_style_spec(text)
    if not lora.path.is_file():
        raise StyleLoraError(f"--teacher-lora {text!r}: {lora.path} does not exist; give FILE.safetensors[:SCALE]")
    if lora.path.suffix != ".safetensors":
        raise StyleLoraError(f"--teacher-lora {text!r} is not a .safetensors file; convert it to safetensors first")
    if not math.isfinite(lora.scale) or abs(lora.scale) > MAX_STYLE_SCALE:
        raise StyleLoraError(
            f"--teacher-lora {text!r}: scale {lora.scale:g} is not a number in [-{MAX_STYLE_SCALE:g}, "
            f"{MAX_STYLE_SCALE:g}]; give FILE.safetensors:SCALE with a scale such as 0.8"
        )
    return lora


def check_style_lora_family(lora: StyleLora, family: str) -> None:
    """Refuse a style LoRA made for the other family before diffusers fails on tensor shapes."""
    found = lora_family_of_state_dict(lora.path)
    if found is not None and found != family:
        raise StyleLoraError(
            f"--teacher-lora {lora.path.name} is an {FAMILY_NAMES[found]} LoRA but the teacher is "
            f"{FAMILY_NAMES[family]}; use a style LoRA trained for {FAMILY_NAMES[family]}"
        )


def fuse_style_loras(pipe, family: str, loras: list[StyleLora]) -> None:
    """Load each style LoRA into the teacher pipeline, fuse them at their scales, and drop the adapters, so the
    UNet's (and text encoders') base weights *are* the styled teacher and peft holds no adapter for training."""
    if not loras:
        return
    for lora in loras:
        check_style_lora_family(lora, family)
    names = []
    for lora in loras:
        try:
            pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora.adapter_name)
        except (ValueError, KeyError, RuntimeError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise StyleLoraError(f"--teacher-lora {lora.path.name} could not be loaded: {first_line}") from None
        names.append(lora.adapter_name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
