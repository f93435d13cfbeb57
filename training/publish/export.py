"""Exporting a run's generator adapter from a checkpoint to the LoRA files users load."""

from __future__ import annotations

from pathlib import Path

from ..loop.config import load_yaml
from ..loop.networks import GENERATOR, lora_config


def _find_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))
    if checkpoint is None:
        if not checkpoints:
            raise ValueError(f"{run_dir} has no checkpoints; is it a fewstep run directory?")
        return checkpoints[-1]
    if checkpoint.isdigit():
        path = run_dir / "checkpoints" / f"step-{int(checkpoint):07d}"
    else:
        path = Path(checkpoint)
    if not (path / f"{GENERATOR}.safetensors").is_file():
        available = ", ".join(p.name for p in checkpoints) or "none"
        raise ValueError(f"checkpoint {checkpoint} not found (available: {available})")
    return path


def export_run(run_dir, fmt: str = "all", checkpoint: str | None = None, out: str | None = None) -> list[Path]:
    """Rebuild the generator adapter on the teacher's UNet from a checkpoint and write the LoRA file(s)."""
    from diffusers import UNet2DConditionModel
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .lora_files import save_diffusers_lora, save_kohya_lora
    from ..teacher import TeacherError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist; give the --output of a fewstep train run")
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a fewstep run directory (no config.yaml)")
    path = _find_checkpoint(run_dir, checkpoint)
    config = load_yaml(path / "config.yaml")
    family = (path / "family").read_text().strip()
    teacher = config["teacher"]
    try:
        unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    except (OSError, ValueError) as error:
        raise TeacherError(f"cannot load the run's teacher UNet from {teacher!r}: {str(error).splitlines()[0]}") from None
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(config["gen_rank"], config["gen_alpha"]), adapter_name=GENERATOR)
    ema = path / f"{GENERATOR}_ema.safetensors"  # runs with --ema-decay ship the EMA weights
    weights = ema if ema.is_file() else path / f"{GENERATOR}.safetensors"
    set_peft_model_state_dict(unet, load_file(weights), adapter_name=GENERATOR)
    out_dir = Path(out) if out else run_dir / "lora"
    written = []
    if fmt in ("diffusers", "all"):
        written.append(save_diffusers_lora(unet, GENERATOR, out_dir, family=family))
    if fmt in ("comfyui", "all"):
        written.append(save_kohya_lora(unet, GENERATOR, out_dir / "fewstep_comfyui.safetensors", family=family))
    return written
