"""One iteration of the trainer's loop, and how the run shows its progress (the bar, the experiment tracker)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import interrupts
from .checkpoints import TrainingState
from .ema import AdapterEMA
from .errors import TrainingError
from .precision import autocast
from .run_dir import checkpoint_path
from .trackers import open_run_logger


def train_iteration(run, config, ema: AdapterEMA | None, device: torch.device) -> dict[str, float]:
    """The method's update on ``--gradient-accumulation-steps`` micro-batches, then the EMA after a generator update.

    A run whose loss keeps going NaN/inf stops here, with what to change: the loop skips such a step (every process
    alike), but past ``--max-nan-steps`` of them the run is not learning.
    """
    loop = run.loop
    with autocast(device, config.mixed_precision):
        metrics = loop.train_step([run.next_batch() for _ in range(config.gradient_accumulation_steps)])
    if ema is not None and run.updated_generator(metrics):
        ema.update()
    if loop.skipped_steps > config.max_nan_steps:
        raise TrainingError(
            f"the loss was NaN/inf in {loop.skipped_steps} steps (limit --max-nan-steps {config.max_nan_steps}); "
            "lower --lr, or use --mixed-precision bf16 instead of fp16"
        )
    return metrics


class Progress:
    """The progress bar (with the latest value of each loss) and the experiment tracker, on the main process only."""

    def __init__(self, label: str, config, run_dir: Path, loop, is_main_process: bool):
        from tqdm import tqdm

        self.writer = open_run_logger(config.report_to, run_dir, config, loop.optimizers) if is_main_process else None
        self.bar = tqdm(
            total=config.max_steps, initial=loop.step, desc=label, unit="it", disable=not is_main_process,
        )  # fmt: skip
        self.shown: dict[str, str] = {}

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(1)
        self.shown.update({k: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss")})  # latest of each
        self.bar.set_postfix(self.shown)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.bar.close()  # a no-op when the loop's end closed it already
        if self.writer is not None:
            self.writer.close()


def stop_on_signal(state: TrainingState, progress: Progress, step: int, is_main_process: bool) -> None:
    """SIGINT or SIGTERM arrived (on any process): checkpoint this step unless that is done, then end the run with
    the command that resumes it."""
    if not checkpoint_path(state.run_dir, step).is_dir() and is_main_process:
        state.save()
    progress.close()
    raise interrupts.interrupted(state.run_dir, step)


class Throughput:
    """What the iterations of this launch cost: samples per second of the global batch, and the collectives and
    bytes the processes exchanged per iteration (printed at the end of the run; ``fewstep bench scale`` reads it)."""

    def __init__(self, loop, processes, config):
        import time

        self.loop, self.processes, self.config = loop, processes, config
        self.started, self.first_step = time.perf_counter(), loop.step
        self.collectives, self.bytes = processes.collectives, processes.bytes_reduced

    def line(self) -> str | None:
        import time

        iterations = self.loop.step - self.first_step
        if iterations <= 0:
            return None
        seconds = time.perf_counter() - self.started
        c, world = self.config, self.processes.world
        samples = iterations * world * c.batch_size * c.gradient_accumulation_steps
        per_iteration = (self.processes.collectives - self.collectives) / iterations
        mb = (self.processes.bytes_reduced - self.bytes) / iterations / 2**20
        return (f"fewstep: {iterations} iterations in {seconds:.1f} s: {samples / seconds:.2f} samples/s ({world} "
                f"process(es) × batch {c.batch_size} × accumulation {c.gradient_accumulation_steps}); per iteration "
                f"{per_iteration:.1f} collectives, {mb:.3f} MB all-reduced")

