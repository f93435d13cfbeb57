"""How a distilled student must be sampled, in each tool, derived from its trained timesteps.

A DMD2 (or DMD) student only works at the timesteps it was trained on, at CFG 1, with the "predict x0, re-noise with
fresh noise" rule (LCM's); a Progressive Distillation student at its timesteps with deterministic DDIM. Users get this wrong in predictable ways (a Karras schedule, CFG 7, ComfyUI's
``ModelSamplingDiscrete`` "lcm" patch); the model card states the recipe that holds for *this* run, computed here.
The ComfyUI facts are checked against a real ComfyUI in tests/comfyui/test_comfyui_card_recipes.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.schedule import student_timesteps

# ComfyUI schedulers that do not hit DMD2's timesteps: they space σ (Karras, exponential) or t (normal) differently.
COMFYUI_WRONG_SCHEDULERS = ("normal", "karras", "exponential")


def comfyui_simple_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps of ComfyUI's ``simple`` scheduler: every (T/steps)-th entry of the σ table, from the top."""
    stride = num_train_timesteps / steps
    return [num_train_timesteps - 1 - int(i * stride) for i in range(steps)]


@dataclass(frozen=True)
class SamplingRecipe:
    """The facts every tool's recipe is built from."""

    timesteps: list[int]
    cfg: float = 1.0
    lora_scale: float = 1.0
    sampler: str = "few_step"  # "few_step": x0 then fresh noise (DMD2, DMD); "ddim": deterministic DDIM (PD)
    method: str = "dmd2"

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def first_timestep(self) -> int:
        return self.timesteps[0]

    @property
    def evenly_spaced(self) -> bool:
        """DMD2's spacing from the first timestep: what ``num_inference_steps`` and FewStep KSampler produce."""
        return self.timesteps == student_timesteps(self.steps, first_timestep=self.first_timestep)

    @property
    def default_spacing(self) -> bool:
        """DMD2's spacing from 999: what ``num_inference_steps=N`` alone produces."""
        return self.timesteps == student_timesteps(self.steps)

    @property
    def comfyui_stock_scheduler(self) -> str | None:
        """The stock ComfyUI scheduler that hits these timesteps exactly (with sampler ``lcm``), if any.

        ``simple`` takes every (T/N)-th σ from the top; a shifted start (e.g. t = 399) also needs pure noise at
        that σ, which stock KSampler does not give (it scales the noise by σ unless σ is the maximum).
        """
        if self.first_timestep != 999:
            return None
        return "simple" if self.timesteps == comfyui_simple_timesteps(self.steps) else None

    @property
    def comfyui_stock_sampler(self) -> str:
        """The stock ComfyUI sampler of this rule: ``lcm`` is DMD2's x0-then-fresh-noise rule; ``ddim`` (Euler in
        σ, i.e. deterministic DDIM) is Progressive Distillation's."""
        return "ddim" if self.sampler == "ddim" else "lcm"


def recipe_from_config(config: dict) -> dict:
    """What a run's options imply about how its LoRA samples, for a LoRA without its own ``fewstep_recipe.json``
    (runs from before the recipe file): a DMD2 run's timesteps and DMD2's re-noising rule."""
    timesteps = [int(t) for t in config.get("timesteps") or []]
    timesteps = timesteps or student_timesteps(int(config.get("num_steps") or 1))
    return {"method": "dmd2", "timesteps": timesteps, "sampler": "few_step"}
