"""What a run trains on and what it left out: one printed line and ``RUN_DIR/data_summary.json``.

Every reader counts what it skips (empty lines and captions, files in formats it cannot read) and what it
changes (an animated image's first frame) in a :class:`Tally`, so nothing is dropped in silence.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY_FILE = "data_summary.json"


@dataclass
class Tally:
    """Counts by reason. A reason is ``"noun"`` or ``"noun: why"``; the noun takes an "s" in the plural."""

    skipped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)

    def skip(self, reason: str, count: int = 1) -> None:
        if count:
            self.skipped[reason] += count

    def change(self, reason: str, count: int = 1) -> None:
        if count:
            self.changed[reason] += count

    def merge(self, other: "Tally") -> None:
        self.skipped.update(other.skipped)
        self.changed.update(other.changed)


def counted(count: int, reason: str, verb: str = "") -> str:
    """``3 empty captions skipped``, ``1 .svg file skipped: unsupported format``."""
    noun, _, why = reason.partition(": ")
    text = f"{count:,} {noun}{'' if count == 1 else 's'}" + (f" {verb}" if verb else "")
    return text + (f": {why}" if why else "")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


@dataclass
class DataSummary:
    """How many prompts and real images a run uses, where its prompts come from, and what was left out and why."""

    prompts: int
    prompts_from: str
    images: int
    prompts_tally: Tally = field(default_factory=Tally)
    images_tally: Tally = field(default_factory=Tally)
    fingerprint: dict = field(default_factory=dict)  # {"sources": digests of the data}: a resume must find the same

    def line(self) -> str:
        """``fewstep: data: 1,234 prompts (2 empty lines skipped); 500 images (3 empty captions skipped)``."""
        prompt_notes = ["from the captions"] if self.prompts_from == "captions" else []
        prompt_notes += [counted(n, reason, "skipped") for reason, n in self.prompts_tally.skipped.items()]
        image_notes = [counted(n, reason, "skipped") for reason, n in self.images_tally.skipped.items()]
        image_notes += [counted(n, reason) for reason, n in self.images_tally.changed.items()]
        images = _plural(self.images, "image") if self.images else "no images"
        images += f" ({'; '.join(image_notes)})" if image_notes else ""
        prompts = _plural(self.prompts, "prompt") + (f" ({'; '.join(prompt_notes)})" if prompt_notes else "")
        return f"fewstep: data: {prompts}; {images}"

    def as_json(self) -> dict:
        return {
            "prompts": {"count": self.prompts, "from": self.prompts_from,
                        "skipped": dict(self.prompts_tally.skipped)},
            "images": {"count": self.images, "skipped": dict(self.images_tally.skipped),
                       "changed": dict(self.images_tally.changed)},
            "fingerprint": self.fingerprint,
        }  # fmt: skip

    def write(self, run_dir: str | Path) -> Path:
        """Record the summary in the run directory (which the trainer creates once every input is checked)."""
        path = Path(run_dir) / SUMMARY_FILE
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")
        return path


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
