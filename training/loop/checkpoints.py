"""Checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN``, written atomically (the last ``--checkpoints-total-limit``
kept) and read back by ``--resume``.

A checkpoint holds everything the next iteration depends on, so that a resumed run continues bit for bit: the
adapters (and the EMA), the method's extra modules (the GAN head), the optimizers and learning-rate schedulers, the
loop's counters and the data stream's random state, with the run's options and family.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...core.lora_format import RECIPE_FILE
from .config import save_yaml
from .ema import AdapterEMA
from .networks import GENERATOR
from .resume import set_base_lr
from .run_dir import RunLock, checkpoints_of, read_checkpoint_file, write_checkpoint_manifest


PROCESSES_FILE = "processes"


def save_checkpoint(
    run_dir: Path, state: dict, adapters: dict, modules: dict, config, family: str, limit: int, recipe: dict | None = None,
    processes: int = 1,
) -> Path:
    """Write ``checkpoints/step-NNNNNNN`` atomically (temp dir + rename), keeping the last ``limit``.

    The manifest of every file's size and hash is written last, so ``--resume`` and ``fewstep export`` can tell a
    complete checkpoint from one a full disk or a copy cut short (:func:`.run_dir.checkpoint_problem`). ``recipe``
    (how the generator at this step samples, and the step) is what ``fewstep export`` of this checkpoint records.
    """
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
        (tmp / PROCESSES_FILE).write_text(f"{processes}\n")  # with config.yaml's batch: the run's global batch
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
        write_checkpoint_manifest(tmp)
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


@dataclass
class TrainingState:
    """What a checkpoint saves and a resume restores, gathered once the method has built its adapters and loop."""

    run_dir: Path
    config: Any
    family: str
    unet: torch.nn.Module
    loop: Any  # the method's loop (trainer.MethodLoop): step, optimizers, lr_schedulers, state_dict()
    adapters: list[str]  # peft adapter names (the generator first)
    modules: dict[str, torch.nn.Module]  # the method's extra networks (the GAN head)
    data_rng: torch.Generator
    ema: AdapterEMA | None
    recipe: Callable[[], dict] | None = None  # the method's sampling recipe, recorded with each checkpoint
    lock: RunLock | None = None  # the run directory's lock: each checkpoint proves the run still holds it
    num_processes: int = 1

    def save(self) -> Path:
        """A checkpoint at the loop's current step (the main process calls this; the others hold the same state)."""
        from peft import get_peft_model_state_dict

        loop = self.loop
        state = {"loop": loop.state_dict(), "data_rng": self.data_rng.get_state()}
        state.update({f"{name}_optimizer": o.state_dict() for name, o in loop.optimizers.items()})
        state.update({f"{name}_scheduler": s.state_dict() for name, s in loop.lr_schedulers.items()})
        adapters = {name: get_peft_model_state_dict(self.unet, adapter_name=name) for name in self.adapters}
        if self.ema is not None:
            with self.ema.swapped_in():
                ema_state = get_peft_model_state_dict(self.unet, adapter_name=GENERATOR)
                adapters[f"{GENERATOR}_ema"] = {k: v.clone() for k, v in ema_state.items()}
        if self.lock is not None:
            self.lock.heartbeat()  # a run whose lock was taken over stops before it writes beside the new holder
        c = self.config
        recipe = {**self.recipe(), "step": loop.step} if self.recipe is not None else None
        return save_checkpoint(
            self.run_dir, state, adapters, self.modules, c, self.family, c.checkpoints_total_limit, recipe,
            self.num_processes,
        )

    def load(self, checkpoint: Path) -> None:
        """Continue from ``checkpoint``, with this run's learning rates (a new ``--lr`` on resume takes effect)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        read = lambda name, reader: read_checkpoint_file(checkpoint / name, reader)
        for name in self.adapters:
            set_peft_model_state_dict(self.unet, read(f"{name}.safetensors", load_file), adapter_name=name)
        for name, module in self.modules.items():
            module.load_state_dict(read(f"{name}.safetensors", load_file))
        state = read("training_state.pt", lambda path: torch.load(path, weights_only=True))
        for name, optimizer in self.loop.optimizers.items():
            optimizer.load_state_dict(state[f"{name}_optimizer"])
        for name, scheduler in self.loop.lr_schedulers.items():
            configured = list(scheduler.base_lrs)  # this run's rates (--lr, --fake-lr), as the method set them
            scheduler.load_state_dict(state[f"{name}_scheduler"])
            set_base_lr(scheduler, configured)  # a new --lr takes effect, not only in config.yaml
        self.loop.load_state_dict(state["loop"])
        self.data_rng.set_state(state["data_rng"])
        if self.ema is not None and (checkpoint / f"{GENERATOR}_ema.safetensors").is_file():
            self.ema.load_peft_state_dict(self.unet, read(f"{GENERATOR}_ema.safetensors", load_file))
