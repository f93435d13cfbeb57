"""The error that stops a training run: its message says why and what to do (the command line prints it as one line)."""


class TrainingError(RuntimeError):
    """Training cannot go on: the message says why and what to do."""
