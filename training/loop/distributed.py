"""The processes of a multi-GPU run, each holding the whole UNet: the decisions and gradients they share.

The UNet is not wrapped in DDP (a loop makes several adapter passes per backward), so the LoRA gradients are
averaged by hand, every process takes the same skip-or-step decision on a non-finite loss, and the run ends by
proving that the processes hold the same adapter weights.
"""

from __future__ import annotations

import torch

from .errors import TrainingError


class ProcessGroup:
    """The collectives a method's loop calls (``TrainingContext.all_finite`` and ``clip_grad_norm``)."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Is ``loss`` finite on every process? All must decide alike, or the gradient all-reduce deadlocks."""
        flag = torch.tensor([float(torch.isfinite(loss).all())], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        """Average the LoRA gradients over the processes (by hand: no DDP wrapper), then clip their norm."""
        if self.world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def check_replicas_agree(optimizers: dict, accelerator) -> None:
    """Multi-process runs average gradients by hand: prove every process ends with the same adapter weights."""
    if accelerator.num_processes == 1:
        return
    params = [p for optimizer in optimizers.values() for group in optimizer.param_groups for p in group["params"]]
    local = torch.stack([p.detach().double().sum() for p in params])
    gathered = accelerator.gather(local[None])  # (world, n)
    spread = float((gathered - gathered[0]).abs().max())
    if spread != 0.0:
        raise TrainingError(f"adapter weights differ across processes (max |Δ| of parameter sums {spread:g})")
    accelerator.print(f"fewstep: adapter weights identical on all {accelerator.num_processes} processes")
