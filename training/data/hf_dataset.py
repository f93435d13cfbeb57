"""``--dataset``: a Hugging Face ``datasets`` dataset as training prompts and captioned real images.

The conventions of diffusers' training scripts: a local folder (``imagefolder``: images + ``metadata.jsonl``), a
dataset saved with ``save_to_disk``, or a Hub id; ``--image-column`` (default ``image``) and ``--caption-column``
(default ``text``, ``caption`` or ``prompt``); ``--streaming`` for large ones, reading the first
``--max-train-samples``. A dataset without an image column is a prompt-only run (DMD2 without its GAN needs no
images). The images are written once as PNG files under ``RUN_DIR/dataset_images/`` and then used like an
``--images`` folder.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from .prompts import CaptionedImage, DataError, read_image_folder, read_prompts

CAPTION_COLUMNS = ("text", "caption", "prompt")
IMAGE_COLUMN = "image"
STREAMING_DEFAULT_SAMPLES = 10_000


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_hf_dataset(name: str, split: str = "train", streaming: bool = False):
    """The ``split`` of a saved dataset, a local data folder, or a Hub dataset."""
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset needs the datasets package: pip install 'fewstep[datasets]'") from None
    datasets.disable_progress_bars()
    folder = Path(name).expanduser()
    try:
        if folder.is_dir() and any((folder / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"dataset {name} has no split {split!r}; its splits: {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        if name.startswith((".", "/", "~")) and not folder.exists():
            raise DataError(f"dataset folder {name} does not exist")
        return datasets.load_dataset(str(folder) if folder.is_dir() else name, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, offline and HTTP errors here
        raise DataError(f"could not load dataset {name!r}: {_first_line(error)}") from None


def _columns(dataset) -> list[str]:
    columns = dataset.column_names
    if columns is None:  # a streamed dataset without declared features: look at its first example
        columns = list(next(iter(dataset), {}).keys())
    return list(columns)


def _pick_columns(name: str, columns: list[str], image_column: str | None, caption_column: str | None):
    listed = ", ".join(columns) or "none"
    for flag, column in (("--image-column", image_column), ("--caption-column", caption_column)):
        if column is not None and column not in columns:
            raise DataError(f"{flag} {column!r} is not a column of dataset {name}; its columns: {listed}")
    image = image_column or (IMAGE_COLUMN if IMAGE_COLUMN in columns else None)
    caption = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption is None and image is None:
        raise DataError(
            f"dataset {name} has neither images nor captions (columns: {listed}); pass --image-column and "
            "--caption-column"
        )
    if caption is None:
        raise DataError(
            f"dataset {name} has no caption column ({', '.join(CAPTION_COLUMNS)}); its columns: {listed}; "
            "pass --caption-column NAME"
        )
    return image, caption


def _to_pil(value):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        import io

        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    if isinstance(value, str):
        return Image.open(value)
    raise DataError(f"dataset image of type {type(value).__name__} is not an image; check --image-column")


def read_dataset(
    name: str,
    image_dir: Path,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
    streaming: bool = False,
    max_samples: int | None = None,
) -> tuple[list[str], list[CaptionedImage]]:
    """Captions, and the captioned images written to ``image_dir`` (none for a prompt-only dataset)."""
    dataset = load_hf_dataset(name, split, streaming)
    image, caption = _pick_columns(name, _columns(dataset), image_column, caption_column)
    limit = max_samples or (STREAMING_DEFAULT_SAMPLES if streaming else None)
    captions, items = [], []
    if image is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    for index, example in enumerate(islice(iter(dataset), limit)):
        text = example[caption]
        text = text[0] if isinstance(text, (list, tuple)) and text else text  # several captions: the first
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"dataset {name} example {index} has no caption text in column {caption!r}")
        captions.append(text.strip())
        if image is not None:
            path = image_dir / f"{index:06d}.png"
            _to_pil(example[image]).convert("RGB").save(path)
            items.append(CaptionedImage(path, text.strip()))
    if not captions:
        raise DataError(f"dataset {name} (split {split!r}) has no examples")
    return captions, items


def read_training_data(config, run_dir: Path) -> tuple[list[str], list[CaptionedImage]]:
    """Prompts for the generator and captioned real images for the GAN, from ``--prompts``, ``--images`` and
    ``--dataset``. Prompts come from the prompts file, else from the captions of the images."""
    if not config.prompts and not config.images and not config.dataset:
        raise DataError(
            "give --prompts FILE or --dataset NAME (and optionally --images DIR with captioned real images)"
        )
    prompts = read_prompts(config.prompts) if config.prompts else []
    items = read_image_folder(config.images) if config.images else []
    captions = [item.caption for item in items]
    if config.dataset:
        dataset_captions, dataset_items = read_dataset(
            config.dataset, Path(run_dir) / "dataset_images", config.image_column, config.caption_column,
            config.dataset_split, config.streaming, config.max_train_samples,
        )  # fmt: skip
        captions += dataset_captions
        items += dataset_items
    return prompts or captions, items
