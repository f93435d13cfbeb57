"""SIGINT (Ctrl-C) and SIGTERM (schedulers, ``timeout``) stop a training run cleanly instead of killing it.

Once the loop is running (:func:`arm`), the first signal is only recorded: the current iteration finishes, the
trainer writes a checkpoint (atomically, like every checkpoint) and raises :class:`RunInterrupted`, whose message
is the resume command; the process then exits with 128 + the signal number. A second signal stops at once,
without a checkpoint. Before the loop there is nothing to save, so a signal stops the run straight away.
"""

from __future__ import annotations

import functools
import shlex
import signal
import sys
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """Training stopped on a signal; ``exit_code`` is 128 + the signal number.

    A KeyboardInterrupt, so that no ``except Exception`` on the way (a library's fallback) swallows it.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class _StopRequest:
    """The signal state of the running trainer (signals are process-wide, so there is one)."""

    def __init__(self):
        self.armed = False
        self.signum: int | None = None

    def handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise RunInterrupted(signum, f"stopped by {name} before training started; there was nothing to save")
        if self.signum is not None:
            raise RunInterrupted(signum, f"stopped at once by a second {name}; resume from the last checkpoint")
        self.signum = signum
        print(
            f"\nfewstep: {name} received: stopping after this iteration and writing a checkpoint "
            "(send it again to stop at once, without one)",
            file=sys.stderr,
        )


_request = _StopRequest()


def handles_stop_signals(function):
    """Decorate the trainer: while it runs, SIGINT and SIGTERM go to the stop request, then the old handlers return."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return function(*args, **kwargs)
        global _request
        outer, _request = _request, _StopRequest()
        previous = {signum: signal.signal(signum, _request.handle) for signum in STOP_SIGNALS}
        try:
            return function(*args, **kwargs)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _request = outer

    return wrapper


def arm() -> None:
    """From now on a signal stops the run after the current iteration (the loop is about to start)."""
    _request.armed = True


def stop_requested(world: int = 1, device=None) -> bool:
    """Did a stop signal arrive? With several processes, True on every one if on any (or the next step deadlocks)."""
    flag = _request.signum is not None
    if world > 1:
        import torch

        tensor = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        flag = bool(tensor.item())
    return flag


def interrupted(run_dir: Path, step: int) -> RunInterrupted:
    """The exception that ends a stopped run: what was saved and the command that continues it."""
    signum = _request.signum if _request.signum is not None else signal.SIGTERM  # another process got the signal
    name = signal.Signals(signum).name
    command = f"fewstep train --output {shlex.quote(str(run_dir))} --resume"
    return RunInterrupted(signum, f"stopped by {name} at step {step}, checkpoint saved; resume with: {command}")
