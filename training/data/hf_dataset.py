"""``--dataset``: a Hugging Face ``datasets`` dataset as training prompts and captioned real images.

The conventions of diffusers' training scripts: a local folder (``imagefolder``: images + ``metadata.jsonl``), a
dataset saved with ``save_to_disk``, or a Hub id; ``--image-column`` (default ``image``) and ``--caption-column``
(default ``text``, ``caption`` or ``prompt``); ``--streaming`` for large ones, reading the first
``--max-train-samples``. A dataset without an image column is a prompt-only run (DMD2 without its GAN needs no
images). Its examples are read in ranges by :func:`.sources.hf_dataset_source` and decoded while they are encoded into the
encoding cache.
"""

from __future__ import annotations

from pathlib import Path

from .prompts import DataError

CAPTION_COLUMNS = ("text", "caption", "prompt")
IMAGE_COLUMN = "image"


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
            loaded = _saved_split(name, loaded, split, datasets)
            return loaded.to_iterable_dataset() if streaming else loaded
        if name.startswith((".", "/", "~")) and not folder.exists():
            raise DataError(f"dataset folder {name} does not exist")
        return datasets.load_dataset(str(folder) if folder.is_dir() else name, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, offline and HTTP errors here
        raise DataError(f"could not load dataset {name!r}: {_first_line(error)}") from None


def _saved_split(name: str, loaded, split: str, datasets):
    """The ``split`` of a saved DatasetDict; a saved single Dataset is its own split, which ``split`` must name
    (or be the default "train": a dataset saved without splits has no name to match)."""
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"dataset {name} has no split {split!r}; its splits: {', '.join(loaded)}; pass --dataset-split NAME"
            )
        return loaded[split]
    saved = str(loaded.split) if loaded.split is not None else None
    if split != "train" and split != saved:
        held = f"its only split is {saved!r}" if saved else "it was saved as a single split without a name"
        raise DataError(
            f"dataset {name} has no split {split!r}: {held}; drop --dataset-split"
            + (f" or pass --dataset-split {saved}" if saved else "")
        )
    return loaded


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


def image_of(value):
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


def _first_example(dataset):
    if hasattr(dataset, "__len__"):
        return dataset[0] if len(dataset) else None
    return next(iter(dataset), None)


def _check_image_column(name: str, dataset, column: str, explicit: bool) -> None:
    """Refuse an image column whose first value is not an image (a caption column passed by mistake would
    otherwise fail as "no such file" on its first caption), naming the columns that do hold images."""
    import datasets

    example = _first_example(dataset)
    value = None if example is None else example.get(column)
    try:
        if value is not None:
            image_of(value)
        return
    except (DataError, OSError, ValueError, TypeError):
        pass
    features = dataset.features or {}
    feature = features.get(column)
    if isinstance(feature, datasets.Image):
        return  # an image column whose first image is corrupt: the example is named when it is written
    kind = getattr(feature, "dtype", None) or (type(feature).__name__ if feature else type(value).__name__)
    shown = repr(value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "...")
    with_images = [c for c, f in features.items() if isinstance(f, datasets.Image)] or ["none"]
    label = f"--image-column {column!r}" if explicit else f"column {column!r}"
    raise DataError(
        f"{label} of dataset {name} holds {kind} values, not images (e.g. {shown}); columns that hold images: "
        f"{', '.join(with_images)}; pass one of them with --image-column"
    )


def caption_text(value) -> str | None:
    """The caption of one example ("" when empty; None when the column holds no text)."""
    value = value[0] if isinstance(value, (list, tuple)) and value else value  # several captions: the first
    if value is None:
        return ""
    return value.strip() if isinstance(value, str) else None


def dataset_columns(config):
    """The ``--dataset`` loaded (streamed with ``--streaming``), and its image column (None: prompt-only) and caption
    column, checked: a missing column or an image column without images is a one-line error naming the columns."""
    dataset = load_hf_dataset(config.dataset, config.dataset_split, config.streaming)
    image, caption = _pick_columns(config.dataset, _columns(dataset), config.image_column, config.caption_column)
    if image is not None:
        _check_image_column(config.dataset, dataset, image, explicit=config.image_column is not None)
    return dataset, image, caption
