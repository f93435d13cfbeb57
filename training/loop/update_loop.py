"""What every method's loop shares: its RNGs, the guarded optimizer update and per-iteration schedules.

A method's loop (DMD2's in ``dmd2_loop``, DMD's and Progressive Distillation's in ``methods/``) subclasses
:class:`AdapterUpdateLoop` and says only how its losses are computed and backpropagated. The base class owns:
  * the update: micro-batch backwards already run → NaN/inf check on every process (the whole update is skipped,
    never stepped on NaN) → gradients averaged across processes → fp16 unscale (after the average, so every
    process finds the same overflow) → clip → step;
  * one dynamic ``GradScaler`` per optimizer under fp16 (the DM gradient is ~1/numel per element and underflows
    without it);
  * the learning-rate schedulers, stepped once per iteration whether or not their optimizer updated;
  * a resumable state (step, skipped steps, RNGs, scalers).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Iterable

import torch

from .distributed import ProcessGroup


def default_clip(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class AdapterUpdateLoop:
    """Base of the method loops: ``optimizers`` and ``lr_schedulers`` are keyed by role (adapter name)."""

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        lr_schedulers: dict[str, object] | None = None,
        seed: int = 0,
        processes: ProcessGroup | None = None,
        max_grad_norm: float = 10.0,
        clip_grad_norm: Callable[[list, float], torch.Tensor] = default_clip,
        device: torch.device | str = "cpu",
        fp16_loss_scaling: bool = False,
    ):
        self.optimizers = optimizers
        self.lr_schedulers = {k: v for k, v in (lr_schedulers or {}).items() if v is not None}
        self.max_grad_norm = max_grad_norm
        self.clip_grad_norm = clip_grad_norm
        self.processes = processes or ProcessGroup(1, device)
        self.all_finite = self.processes.all_finite  # multi-process runs must agree on skipping, or they deadlock
        self.skipped_steps = 0  # updates skipped because the loss was NaN/inf
        self.device = torch.device(device)
        self.grad_scalers = (
            {role: torch.amp.GradScaler(self.device.type) for role in optimizers} if fp16_loss_scaling else {}
        )
        self.step = 0
        # Noise and timesteps are drawn for the global batch, alike on every process, which keeps its slice
        # (world-size invariance, .distributed); the shared RNG (e.g. the student step index) is one draw for all.
        self.rng = torch.Generator().manual_seed(seed * 1000)
        self.shared_rng = torch.Generator().manual_seed(seed)

    # ---------------------------------------------------------------- randomness
    def _randn(self, shape) -> torch.Tensor:
        return self.processes.randn(shape, self.rng).to(self.device)

    def _randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return self.processes.randint(low, high, n, self.rng).to(self.device)

    # ---------------------------------------------------------------- guarded update
    def _scaled(self, loss: torch.Tensor, role: str) -> torch.Tensor:
        scaler = self.grad_scalers.get(role)
        return scaler.scale(loss) if scaler is not None else loss

    def _update(self, role: str, micro_steps, params, optimizer) -> tuple[torch.Tensor, dict]:
        """Run the micro-batch backwards (each right after its forward), then clip and step.

        ``micro_steps`` yields ``(finite, metrics)`` per micro-batch, its gradient already accumulated (each loss
        weighted by 1/num_micro_batches). An update with a non-finite loss is skipped whole (counted
        in ``skipped_steps``): the optimizer never steps on NaN. With fp16 loss scaling, an overflow in the scaled
        gradients skips the step too (the scaler then lowers its scale), as torch's GradScaler does.
        """
        optimizer.zero_grad(set_to_none=True)
        metrics: dict = {}
        finite = True
        count = 0
        for micro_finite, micro_metrics in micro_steps:
            count += 1
            for name, value in micro_metrics.items():
                metrics[name] = metrics.get(name, 0.0) + value.detach().float()
            finite = finite and micro_finite
        metrics = {name: value / count for name, value in metrics.items()}
        # Autocast keeps a bf16/fp16 copy of every trainable fp32 weight it casts until its region ends (the whole
        # iteration). The backwards are done: drop the copies now. They are stale once the optimizer steps, and
        # they would sit on top of this update's gradients and optimizer step, its memory peak.
        torch.clear_autocast_cache()
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return torch.tensor(float("nan")), metrics
        self.processes.average_gradients(params)  # before unscale_: every process finds the same overflow
        scaler = self.grad_scalers.get(role)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = self.clip_grad_norm(params, self.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            metrics[f"grad_scale_{role}"] = torch.tensor(scaler.get_scale())
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, metrics

    def _end_iteration(self, metrics: dict) -> dict[str, float]:
        """Step every learning-rate scheduler (schedules are functions of the iteration) and count the iteration."""
        for name, scheduler in self.lr_schedulers.items():
            metrics[f"lr_{name}"] = scheduler.get_last_lr()[0]  # the rate this iteration used
            with warnings.catch_warnings():  # a skipped (NaN / fp16 overflow) or off-turn update is expected
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()
        self.step += 1
        return {name: float(value) for name, value in metrics.items()}

    # ---------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "rng": self.rng.get_state(),
            "shared_rng": self.shared_rng.get_state(),
            "grad_scalers": {role: scaler.state_dict() for role, scaler in self.grad_scalers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rng.set_state(state["rng"])
        self.shared_rng.set_state(state["shared_rng"])
        for role, scaler_state in state.get("grad_scalers", {}).items():
            if role in self.grad_scalers:
                self.grad_scalers[role].load_state_dict(scaler_state)


@contextlib.contextmanager
def frozen(params: Iterable[torch.nn.Parameter]):
    """Turn off requires_grad so a forward pass builds no graph edges into these parameters; restore after."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
