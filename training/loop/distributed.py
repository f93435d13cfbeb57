"""The processes of a multi-GPU run, each holding the whole UNet: what they draw, decide and average together.

* **World-size invariance.** Every random draw of a batch (prompt and image indices, noise, timesteps) is made for
  the *global* batch (``batch_size × processes`` rows) from a generator seeded alike on every process, and each
  process keeps its own slice (:meth:`ProcessGroup.randn`, :meth:`ProcessGroup.randint`). So N processes with
  ``--batch-size B`` train the same model as one process with ``--batch-size N·B``, and a run can resume at another
  process count with the same global batch.
* **Averaged gradients in a few collectives.** The UNet is not wrapped in DDP (a loop makes several adapter passes
  per backward); the LoRA gradients are flattened into buckets of :data:`BUCKET_BYTES` and all-reduced once per
  bucket (:meth:`ProcessGroup.average_gradients`), *before* fp16's ``GradScaler.unscale_``: every process then sees
  the same (possibly non-finite) gradients, so all skip or all step, and their weights stay identical.
* **One decision.** A non-finite loss on any process skips the update on all (:meth:`ProcessGroup.all_finite`).
* **Proof.** The run ends by checking that every process holds the same adapter weights, bit for bit.
"""

from __future__ import annotations

import torch

from .errors import TrainingError

BUCKET_BYTES = 128 << 20  # gradients all-reduced per collective: SDXL's rank-64 generator (0.8 GB fp32) in 7


class ProcessGroup:
    """This process's place in the run (``index`` of ``world``) and the collectives the method loops call."""

    def __init__(self, world: int = 1, device: torch.device | str = "cpu", index: int = 0):
        self.world, self.device, self.index = world, torch.device(device), index
        self.collectives = 0  # all-reduces and broadcasts issued (counted for `fewstep bench scale` and the tests)
        self.bytes_reduced = 0

    # ---------------------------------------------------------------- draws of the global batch
    def _slice(self, rows: torch.Tensor, local: int) -> torch.Tensor:
        return rows[self.index * local : (self.index + 1) * local]

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        """This process's rows of a Gaussian draw for the global batch (``shape[0]`` rows per process)."""
        local = shape[0]
        return self._slice(torch.randn((local * self.world, *shape[1:]), generator=generator), local)

    def randint(self, low: int, high: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """This process's ``n`` of the global batch's ``n × world`` integers in [low, high)."""
        return self._slice(torch.randint(low, high, (n * self.world,), generator=generator), n)

    # ---------------------------------------------------------------- collectives
    def wait_for_everyone(self) -> None:
        """A barrier (what accelerate's ``wait_for_everyone`` does): every process reaches it before any goes on."""
        if self.world > 1:
            torch.distributed.barrier()

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        self.collectives += 1
        self.bytes_reduced += tensor.numel() * tensor.element_size()
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Is ``loss`` finite on every process? All must decide alike, or the gradient all-reduce deadlocks."""
        flag = torch.tensor([float(torch.isfinite(loss).all())], device=self.device)
        if self.world > 1:
            self._all_reduce(flag, torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def average_gradients(self, params: list) -> None:
        """Average the LoRA gradients over the processes: one all-reduce per bucket of flattened gradients."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in params], BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self._all_reduce(flat)
            flat /= self.world
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()


def single_cpu_launch_warning(environ=None) -> str | None:
    """``accelerate launch --cpu --num_processes N`` starts one process (its simple launcher) with the rendezvous
    address of N set and no WORLD_SIZE: say so, with the commands that do start N CPU processes."""
    import os

    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        return ("fewstep: warning: accelerate launch --cpu started ONE process although more were asked for; for N "
                "CPU processes use torchrun --nproc_per_node N -m fewstep.cli ... or accelerate launch --multi_cpu")
    return None


def import_dynamo_before_the_process_group() -> None:
    """Import torch._dynamo before any process group exists. Imported after (diffusers and torch.optim import it
    lazily), it keeps references to the default group that outlive ``destroy_process_group``: the group's gloo
    threads then still run at interpreter exit, and a finished process can abort there ("terminate called without
    an active exception", seen on rank 1 after a successful 2-process run). Imported first, it keeps none."""
    import torch._dynamo  # noqa: F401


def make_accelerator(collective_timeout_minutes: float = 30.0):
    """accelerate's Accelerator on this machine's device (the CPU without CUDA), its processes waiting at most
    ``collective_timeout_minutes`` for each other at a collective before the run fails with a timeout."""
    from datetime import timedelta

    import_dynamo_before_the_process_group()

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    warning = single_cpu_launch_warning()
    if warning:
        print(warning)
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=collective_timeout_minutes))
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device grouped into buckets of at most ``bucket_bytes`` (a larger
    tensor is a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        same_kind = buckets and (buckets[-1][0].dtype, buckets[-1][0].device) == (tensor.dtype, tensor.device)
        if not same_kind or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += nbytes
    return buckets


def check_replicas_agree(optimizers: dict, group: ProcessGroup, log=print) -> None:
    """Prove every process ends with the same adapter weights, bit for bit: process 0's are broadcast and compared."""
    if group.world == 1:
        return
    params = [p for optimizer in optimizers.values() for g in optimizer.param_groups for p in g["params"]]
    mismatched = torch.zeros(1, device=group.device)
    for bucket in _buckets([p.detach() for p in params], BUCKET_BYTES):
        local = torch.cat([t.reshape(-1) for t in bucket])
        reference = local.clone()
        group.collectives += 1
        torch.distributed.broadcast(reference, src=0)
        mismatched += (reference != local).sum()
    group._all_reduce(mismatched)
    if mismatched.item():
        raise TrainingError(f"adapter weights differ across processes ({int(mismatched.item())} values differ from "
                            "process 0's)")  # fmt: skip
    if group.index == 0:
        log(f"fewstep: adapter weights identical on all {group.world} processes")
