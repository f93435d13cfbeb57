"""Exporting a run's generator adapter from a checkpoint to the LoRA files users load."""

from __future__ import annotations

import json
from pathlib import Path

from ...core.lora_format import KOHYA_WEIGHT_NAME, RECIPE_FILE, RUN_DIR_LORA
from ..loop.config import load_yaml
from ..loop.networks import GENERATOR, lora_config
from .sampling_recipes import recipe_from_config
from ..loop.run_dir import (
    checkpoint_problem,
    checkpoint_step,
    checkpoints_of,
    latest_complete_checkpoint,
    read_checkpoint_file,
)


def _find_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    """The checkpoint to export: the named one, or the newest complete one; a damaged one is refused by name."""
    if checkpoint is None:
        path = latest_complete_checkpoint(run_dir)  # skips (and names) damaged newer ones
        if path is None:
            raise ValueError(f"{run_dir} has no checkpoints; is it a fewstep run directory?")
        return path
    if checkpoint.isdigit():
        path = run_dir / "checkpoints" / f"step-{int(checkpoint):07d}"
    else:
        path = Path(checkpoint)
    if not path.is_dir():
        available = ", ".join(p.name for p in checkpoints_of(run_dir)) or "none"
        raise ValueError(f"checkpoint {checkpoint} not found (available: {available})")
    problem = checkpoint_problem(path)
    if problem:
        raise ValueError(f"checkpoint {path} is incomplete ({problem}); export another one with --checkpoint STEP")
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
    config = read_checkpoint_file(path / "config.yaml", load_yaml)
    family = read_checkpoint_file(path / "family", Path.read_text).strip()
    teacher = config["teacher"]
    try:
        unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    except (OSError, ValueError) as error:
        raise TeacherError(f"cannot load the run's teacher UNet from {teacher!r}: {str(error).splitlines()[0]}") from None
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(config["gen_rank"], config["gen_alpha"]), adapter_name=GENERATOR)
    ema = path / f"{GENERATOR}_ema.safetensors"  # runs with --ema-decay ship the EMA weights
    weights = ema if ema.is_file() else path / f"{GENERATOR}.safetensors"
    set_peft_model_state_dict(unet, read_checkpoint_file(weights, load_file), adapter_name=GENERATOR)
    out_dir = Path(out) if out else export_dir(run_dir, path)
    written = []
    if fmt in ("diffusers", "all"):
        written.append(save_diffusers_lora(unet, GENERATOR, out_dir, family=family))
    if fmt in ("comfyui", "all"):
        written.append(save_kohya_lora(unet, GENERATOR, out_dir / KOHYA_WEIGHT_NAME, family=family))
    recipe = checkpoint_recipe(run_dir, path, config)
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    written.append(out_dir / RECIPE_FILE)
    return written


def export_dir(run_dir: Path, checkpoint: Path) -> Path:
    """``RUN_DIR/lora`` for the run's newest complete checkpoint (what training itself exports); any other
    checkpoint gets its own ``RUN_DIR/lora-step-NNNNNNN``, so exporting an older step never replaces the run's LoRA."""
    if checkpoint == latest_complete_checkpoint(run_dir, log=lambda _: None):
        return run_dir / RUN_DIR_LORA
    return run_dir / f"{RUN_DIR_LORA}-step-{checkpoint_step(checkpoint):07d}"


def checkpoint_recipe(run_dir: Path, checkpoint: Path, config: dict) -> dict:
    """How the checkpoint's LoRA samples, with the step it comes from: the checkpoint's own ``fewstep_recipe.json``
    (written with every checkpoint), else the run's final recipe, else what a DMD2 config implies."""
    for source in (checkpoint / RECIPE_FILE, run_dir / RUN_DIR_LORA / RECIPE_FILE):
        if source.is_file():
            recipe = json.loads(read_checkpoint_file(source, Path.read_text))
            break
    else:
        recipe = recipe_from_config(config)
    return {**recipe, "step": checkpoint_step(checkpoint)}
