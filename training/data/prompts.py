"""Training data: prompt files and captioned real images, validated at the boundary with one-line errors.

What a reader leaves out (empty lines and captions, files it cannot read) it counts in a :class:`~.summary.Tally`
instead of dropping in silence; the run prints and records the counts (:mod:`.summary`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .images_io import IMAGE_SUFFIXES, frame_count, image_tensor, load_rgb
from .summary import Tally

PROMPT_FIELDS = ("prompt", "text", "caption")
PROMPT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv")


class DataError(ValueError):
    """Bad training data: the message names the file and the fix."""


def _text(path: Path, what: str) -> str:
    """A UTF-8 text file's contents without a byte-order mark (Windows editors write one); a binary or
    undecodable file is a one-line error naming it. Line endings are left to ``splitlines`` and ``csv``."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{what} {path} is not UTF-8 text (undecodable byte at offset {error.start}); give a text file"
        ) from None


def _json_lines(path: Path, what: str, tally: Tally | None = None):
    """``(line number, record)`` for each non-blank line of a .jsonl file; each record must be a JSON object."""
    for number, line in enumerate(_text(path, what).splitlines(), 1):
        if not line.strip():
            if tally is not None:
                tally.skip("empty line")
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


def _field(record: dict, where: str) -> str:
    text = next((record[k] for k in PROMPT_FIELDS if k in record), None)
    if not isinstance(text, str):
        raise DataError(f'{where} has no "prompt", "text" or "caption" string field')
    return text


def _prompts_from_json(path: Path) -> list[str]:
    """A .json file: a list of strings, or of objects with a "prompt", "text" or "caption" field."""
    try:
        data = json.loads(_text(path, "prompts file"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno} is not valid JSON ({error.msg}); write a list of prompts") from None
    if not isinstance(data, list):
        raise DataError(
            f'prompts file {path} holds a JSON {type(data).__name__}, not a list; write ["a prompt", ...] or '
            '[{"prompt": ...}, ...]'
        )
    prompts = []
    for index, entry in enumerate(data):
        if not isinstance(entry, (str, dict)):
            kind = type(entry).__name__
            raise DataError(f'{path} entry {index} is a {kind}; give a string or a {{"prompt": ...}} object')
        prompts.append(entry if isinstance(entry, str) else _field(entry, f"{path} entry {index}"))
    return prompts


def _prompts_from_csv(path: Path, tally: Tally) -> list[str]:
    """A .csv (or .tsv) file with a header row: the "prompt", "text" or "caption" column (the csv module reads
    quotes, embedded commas and newlines, so none of them ends up in a prompt)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        rows = list(csv.reader(io.StringIO(_text(path, "prompts file"), newline=""), delimiter=delimiter))
    except csv.Error as error:
        raise DataError(f"prompts file {path} is not valid CSV ({error}); fix its quoting") from None
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    column = next((header.index(name) for name in PROMPT_FIELDS if name in header), None)
    if column is None:
        raise DataError(
            f"prompts file {path} has no prompt, text or caption column in its header row (it reads: "
            f"{', '.join(rows[0]) if rows else 'nothing'}); add a header row such as 'prompt'"
        )
    prompts = []
    for row in rows[1:]:
        if not any(cell.strip() for cell in row):
            tally.skip("empty line")
        else:
            prompts.append(row[column] if column < len(row) else "")
    return prompts


def read_prompts(path: str | Path, tally: Tally | None = None) -> list[str]:
    """Prompts from a .txt file (one per line), a .jsonl file (a "prompt", "text" or "caption" field per line), a
    .json list, or a .csv/.tsv file with a header row. Empty lines and prompts are skipped and counted in ``tally``.
    """
    path, tally = Path(path), tally if tally is not None else Tally()
    if not path.is_file():
        raise _missing_file(path, "prompts file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        raw = [_field(record, f"{path}:{number}") for number, record in _json_lines(path, "prompts file", tally)]
    elif suffix == ".json":
        raw = _prompts_from_json(path)
    elif suffix in (".csv", ".tsv"):
        raw = _prompts_from_csv(path, tally)
    else:
        lines = _text(path, "prompts file").splitlines()
        tally.skip("empty line", sum(1 for line in lines if not line.strip()))
        raw = [line for line in lines if line.strip()]
    prompts = [p.strip() for p in raw if p.strip()]
    tally.skip("empty prompt", len(raw) - len(prompts))
    if not prompts:
        raise DataError(
            f"prompts file {path} holds no prompts; put one prompt per line (or a 'prompt' field/column in "
            f"{', '.join(PROMPT_SUFFIXES[1:])})"
        )
    return prompts


@dataclass
class CaptionedImage:
    path: Path
    caption: str | None  # None: in the same-name .txt file, read when the image is encoded (large folders)


def _unsupported(path: Path) -> str:
    return f"{path.suffix.lower() or 'suffix-less'} file: unsupported format"


def _unsupported_files(directory: Path, tally: Tally) -> None:
    """Count the folder's files that are neither images in a supported format nor captions, and its subfolders
    (which a folder of same-name captions does not search)."""
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(".") or os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES | {".txt"}:
                continue
            if entry.is_dir():
                tally.skip("subfolder: not searched (put the images in the folder itself)")
            else:
                tally.skip(_unsupported(Path(entry.path)))


def _metadata_items(directory: Path, metadata: Path, tally: Tally) -> list[CaptionedImage]:
    """The images ``metadata.jsonl`` names; named files in other formats, empty captions and the folder's images
    it does not name are counted, not trained on."""
    items, named = [], set()
    for number, record in _json_lines(metadata, "metadata file"):
        name = record.get("file_name")
        caption = next((record[k] for k in ("text", "caption", "prompt") if k in record), None)
        if not name or not isinstance(caption, str):
            raise DataError(f'{metadata}:{number} needs "file_name" and "text" fields')
        if not isinstance(name, str) or not (directory / name).is_file():
            raise DataError(f"{metadata}:{number} names {name}, which is not in {directory}")
        named.add(os.path.normpath(name))
        if (directory / name).suffix.lower() not in IMAGE_SUFFIXES:
            tally.skip(_unsupported(directory / name))
        elif not caption.strip():
            tally.skip("empty caption")
        else:
            items.append(CaptionedImage(directory / name, caption.strip()))
    unnamed = [n for n in os.listdir(directory) if Path(n).suffix.lower() in IMAGE_SUFFIXES and n not in named]
    tally.skip("image: not in metadata.jsonl", len(unnamed))
    return items


def _caption_file_items(directory: Path, tally: Tally, read_up_to: int | None = None) -> list[CaptionedImage]:
    """Each image with its same-name .txt caption; an empty caption is counted, not trained on. A folder of more
    than ``read_up_to`` images leaves its captions to be read when each image is encoded (caption None)."""
    with os.scandir(directory) as entries:  # one listing (a folder may hold 100,000s of files), names sorted
        files = sorted(e.name for e in entries if e.is_file())
    names = set(files)
    image_names = [n for n in files if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    missing = [n for n in image_names if os.path.splitext(n)[0] + ".txt" not in names]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in {directory} have no caption (e.g. {missing[0]}); add a same-name .txt "
            "file per image or a metadata.jsonl with file_name/text"
        )
    images = [directory / n for n in image_names]
    if read_up_to is not None and len(images) > read_up_to:
        return [CaptionedImage(path, None) for path in images]
    items = []
    for path in images:
        caption = _text(path.with_suffix(".txt"), "caption file").strip()
        if caption:
            items.append(CaptionedImage(path, caption))
        else:
            tally.skip("empty caption")
    return items


def read_image_folder(directory: str | Path, tally: Tally | None = None,
                      decode_up_to: int | None = None) -> list[CaptionedImage]:  # fmt: skip
    """Captioned images: an imagefolder with ``metadata.jsonl`` ({"file_name", "text"}), or image + same-name .txt.

    Every image is decoded here (a folder of at most ``decode_up_to`` images, when given), so a corrupt one is named
    before any model loads, not minutes into a run; larger folders are checked while they are encoded. What is left
    out (empty captions, unsupported formats) or changed (an animated image's first frame) is counted in ``tally``.
    """
    directory, tally = Path(directory), tally if tally is not None else Tally()
    if not directory.is_dir():
        what = "is a file; give the folder that holds the images" if directory.exists() else "does not exist"
        raise DataError(f"images directory {directory} {what}")
    metadata = directory / "metadata.jsonl"
    if metadata.is_file():
        items = _metadata_items(directory, metadata, tally)
    else:
        _unsupported_files(directory, tally)
        items = _caption_file_items(directory, tally, decode_up_to)
    if not items and tally.skipped["empty caption"]:
        raise DataError(f"every caption in images directory {directory} is empty; write a caption for each image")
    if not items:
        raise DataError(f"images directory {directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for item in items if decode_up_to is None or len(items) <= decode_up_to else ():
        if check_image(item.path) > 1:
            tally.change("animated image: first frame used")
    return items


def check_image(path: Path) -> int:
    """Decode ``path`` fully and return its frame count; a truncated or corrupt image is a one-line error naming it."""
    try:
        return frame_count(path)
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports bad data as any of these
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"image {path} cannot be decoded ({reason}); replace or remove it") from None


def load_image_tensor(path: Path, resolution: int):
    """An RGB image resized (shorter side) and centre-cropped to ``resolution``, in [-1, 1], shape (3, H, W).
    Opened with :func:`~.images_io.load_rgb`, so 16-bit, palette and transparent images come out right."""
    return image_tensor(load_rgb(path), resolution)
