"""Validation grids: the teacher (top row, 25 DDIM steps, once) above the student, on fixed prompts and noise, saved
as ``RUN_DIR/samples/step-NNNNNNN.png`` every ``--validate-every`` iterations."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ...core.sampling import ddim_timesteps, sample_ddim
from .ema import AdapterEMA, ema_weights


class Validator:
    """Student-vs-teacher grids on fixed prompts and seeds; the student with its EMA weights if the run keeps one."""

    def __init__(self, run_dir: Path, sample_student: Callable, teacher_x0: Callable, vae, schedule, cond,
                 latent_shape: tuple[int, ...], seed: int, device: torch.device, ema: AdapterEMA | None):  # fmt: skip
        self.dir = run_dir / "samples"
        self.sample_student, self.teacher_x0, self.vae, self.schedule = sample_student, teacher_x0, vae, schedule
        self.cond, self.device, self.ema = cond.to(device), device, ema
        n = cond.prompt_embeds.shape[0]
        self.noise = torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
        self.teacher_images = None
        self.n = n

    @torch.no_grad()
    def run(self, step: int, writer=None) -> Path:
        from .images import save_grid
        from ..teacher.loading import decode_latents

        with ema_weights(self.ema):
            if self.teacher_images is None:
                teacher_x0 = self.teacher_x0
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
