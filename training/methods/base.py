"""What a distillation method tells the trainer and the front ends, with defaults, so a new one sets only what differs.

The trainer needs ``key``, ``name``, ``config_class``, ``check``, ``wants_real_images`` and ``build``; ``fewstep
train --help`` the ``summary``; the model card the ``paper`` and :meth:`card_description`; ``fewstep demo`` the
``title`` and the ``demo_*`` hooks. Nothing here imports a front end: the demo hands its settings in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

# The yardstick rows a student is measured in, and the rows of its sample grid (``digits/yardstick.py``).
DEMO_ROWS = ["real", "teacher_50", "teacher_4", "teacher_1", "student"]
DEMO_GRID_ROWS = ["teacher_50", "teacher_1", "student"]


class Method(ABC):
    """A distillation method, chosen by name (``fewstep train --method KEY``)."""

    key: str  # its --method name, recorded in RUN_DIR/method so that --resume finds it
    name: str  # progress-bar label
    title: str  # its full name in the demo's lines, e.g. "Progressive Distillation"
    paper: str  # the model card's "distilled with …": name, authors, paper title, year
    summary: str  # ``fewstep train --help``'s line on it (wrapped there)
    config_class: type  # its options: a TrainConfig dataclass

    # ``fewstep demo``: the yardstick rows and sample-grid rows its student is measured in (None: the yardstick's
    # default rows, i.e. a student at its trained steps plus Distillation++ when multi-step), and a note on which
    # --num-steps it takes for ``fewstep demo --help`` ("": any).
    demo_rows: list[str] | None = DEMO_ROWS
    demo_grid_rows: list[str] | None = DEMO_GRID_ROWS
    demo_steps: str = ""

    def check(self, config, family: str, use_gan: bool, num_processes: int) -> None:
        """Refuse known-bad option combinations (after the family's defaults are filled in)."""

    def wants_real_images(self, config) -> bool:
        """Whether the run loads real images (``--images`` / ``--dataset``): only a GAN needs them."""
        return False

    @abstractmethod
    def build(self, ctx):
        """The method's loop, adapters, batches and validation sampler on the prepared context: a ``MethodRun``."""

    def card_description(self, config: dict) -> str:
        """The model card's "method" row, given the run's saved options."""
        return self.title

    def demo_steps_error(self, num_steps: int) -> str | None:
        """Why ``fewstep demo --num-steps N`` cannot train this method (one line), or None."""
        return None

    def demo_gan(self, settings) -> bool:
        """Whether the digits demo's run has a GAN on the real digits (``settings``: ``DigitsDemoSettings``)."""
        return False

    def demo_options(self, settings, num_steps: int, real_dir) -> dict:
        """The method's own ``fewstep train`` options in the digits demo, over the options every method shares."""
        return {}
