"""Training data: prompt files and captioned real images, validated at the boundary with one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class DataError(ValueError):
    """Bad training data: the message names the file and the fix."""


def _text(path: Path, what: str) -> str:
    """A UTF-8 text file's contents; a binary or undecodable file is a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{what} {path} is not UTF-8 text (undecodable byte at offset {error.start}); give a text file"
        ) from None


def _json_lines(path: Path, what: str):
    """``(line number, record)`` for each non-blank line of a .jsonl file; each record must be a JSON object."""
    for number, line in enumerate(_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number} is not valid JSON ({error.msg}); write one object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number} is not a JSON object; write one {{...}} object per line")
        yield number, record


def _missing_file(path: Path, what: str) -> DataError:
    if path.is_dir():
        return DataError(f"{what} {path} is a directory; give a file")
    return DataError(f"{what} {path} does not exist")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line) or .jsonl (a "prompt", "text" or "caption" field per line)."""
    path = Path(path)
    if not path.is_file():
        raise _missing_file(path, "prompts file")
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for number, record in _json_lines(path, "prompts file"):
            text = next((record[k] for k in ("prompt", "text", "caption") if k in record), None)
            if not isinstance(text, str):
                raise DataError(f'{path}:{number} has no "prompt", "text" or "caption" string field')
            prompts.append(text.strip())
    else:
        prompts = [line.strip() for line in _text(path, "prompts file").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"prompts file {path} is empty; put one prompt per line (or a jsonl 'prompt' field)")
    return prompts


@dataclass
class CaptionedImage:
    path: Path
    caption: str


def read_image_folder(directory: str | Path) -> list[CaptionedImage]:
    """Captioned images: an imagefolder with ``metadata.jsonl`` ({"file_name", "text"}), or image + same-name .txt.

    Every image is decoded here, so a corrupt one is named before any model loads, not minutes into a run.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file; give the folder that holds the images" if directory.exists() else "does not exist"
        raise DataError(f"images directory {directory} {what}")
    metadata = directory / "metadata.jsonl"
    items: list[CaptionedImage] = []
    if metadata.is_file():
        for number, record in _json_lines(metadata, "metadata file"):
            name = record.get("file_name")
            caption = next((record[k] for k in ("text", "caption", "prompt") if k in record), None)
            if not name or not isinstance(caption, str):
                raise DataError(f'{metadata}:{number} needs "file_name" and "text" fields')
            if not isinstance(name, str) or not (directory / name).is_file():
                raise DataError(f"{metadata}:{number} names {name}, which is not in {directory}")
            items.append(CaptionedImage(directory / name, caption.strip()))
    else:
        images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) in {directory} have no caption (e.g. {missing[0]}); add a same-name .txt "
                "file per image or a metadata.jsonl with file_name/text"
            )
        items = [CaptionedImage(p, _text(p.with_suffix(".txt"), "caption file").strip()) for p in images]
    if not items:
        raise DataError(f"images directory {directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for item in items:
        check_image(item.path)
    return items


def check_image(path: Path) -> None:
    """Decode ``path`` fully; a truncated or corrupt image is a one-line error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports bad data as any of these
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"image {path} cannot be decoded ({reason}); replace or remove it") from None


def load_image_tensor(path: Path, resolution: int):
    """An RGB image resized (shorter side) and centre-cropped to ``resolution``, in [-1, 1], shape (3, H, W)."""
    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))))
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
