"""What a run trains on: ``--prompts``, ``--images`` and ``--dataset`` read into at most two sources.

The generator's prompts come from the prompts file, else from the captions of the real images (or of a prompt-only
dataset). The real images, for the GAN, come from ``--images`` or an image ``--dataset``. Nothing is encoded here:
the sources are listed and checked (cheaply, before the teacher loads) and encoded into the encoding cache later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompts import DataError
from .sources import Source, hf_dataset_source, image_folder_source, is_webdataset, prompts_file_source, \
    webdataset_source  # fmt: skip
from .summary import DataSummary, Tally, counted


@dataclass
class TrainingData:
    """The prompt source (None: the captions of ``images``), the image source (None: no GAN data) and the first
    prompts (the validation grid's, when they are known before encoding)."""

    prompts: Source | None
    images: Source | None
    first_prompts: list[str] = field(default_factory=list)

    @property
    def prompts_from(self) -> str:
        return self.prompts.description if self.prompts is not None else "captions"

    def identity(self) -> dict:
        """What a resumed run must find again: the digests of its sources."""
        return {"prompts": self.prompts.digest() if self.prompts else None,
                "images": self.images.digest() if self.images else None}  # fmt: skip

    def line(self) -> str:
        """``fewstep: data: prompts file p.txt (1,000 prompts); images folder imgs (20 images)``, before encoding."""
        parts = []
        for source in (self.prompts, self.images):
            if source is None:
                continue
            noun = "prompt" if source.kind == "prompts" else "image"
            size = f"{source.count:,} {noun}{'s' * (source.count != 1)}" if source.count is not None else ""
            notes = [size] * bool(size) + [counted(n, r, "skipped") for r, n in source.tally.skipped.items()]
            notes += [counted(n, reason) for reason, n in source.tally.changed.items()]
            parts.append(source.description + (f" ({'; '.join(notes)})" if notes else ""))
        if self.prompts is None:
            parts.append("prompts: the captions of the images")
        return "fewstep: data: " + "; ".join(parts)

    def summary(self, prompts: int, images: int, prompt_skips: dict, image_skips: dict) -> DataSummary:
        """The data summary once encoded: counts, and what the readers and the encoder left out."""
        prompt_tally, image_tally = Tally(), Tally()
        if self.prompts is not None:
            prompt_tally.merge(self.prompts.tally)
        if self.images is not None:
            image_tally.merge(self.images.tally)
        for tally, skips in ((prompt_tally, prompt_skips), (image_tally, image_skips)):
            for reason, count in skips.items():
                tally.skip(reason, count)
        from_ = "captions" if self.prompts is None else self.prompts.description
        return DataSummary(prompts, from_, images, prompt_tally, image_tally, {"sources": self.identity()})


def read_training_data(config) -> TrainingData:
    """The run's sources from ``--prompts``, ``--images`` and ``--dataset``, checked and printed."""
    if not config.prompts and not config.images and not config.dataset:
        raise DataError("give --prompts FILE or --dataset NAME (and optionally --images DIR with captioned real images)")
    prompts, first = (prompts_file_source(config.prompts) if config.prompts else (None, []))
    images = image_folder_source(config.images) if config.images else None
    if config.dataset:
        dataset = _dataset_source(config, want_images=True)
        if dataset.kind == "images" and images is not None:
            raise DataError(
                f"--images {config.images} and the images of --dataset {config.dataset} are two image sources; "
                "give one (put the folder's images into the dataset, or drop one of them)"
            )
        if dataset.kind == "images":
            images = dataset
        elif prompts is not None:
            raise DataError(
                f"--prompts {config.prompts} and the captions of --dataset {config.dataset} (which has no images) are "
                "two prompt sources; give one"
            )
        else:
            prompts = dataset
    data = TrainingData(prompts, images, first[: max(1, getattr(config, "num_validation_prompts", 4))])
    del first
    print(data.line())
    return data


def _dataset_source(config, want_images: bool) -> Source:
    if is_webdataset(config.dataset):
        return webdataset_source(config.dataset, with_images=want_images)
    return hf_dataset_source(config)
