"""Where a run's prompts and captioned images come from, as *units* that the encoding cache encodes one at a time.

A source is cut into units (the cache's resumable grain: a unit is encoded whole or continued at its first missing
part), each an iterator of :class:`Item`. What identifies the source (its ``identity``) keys the cache, so a changed
prompt file, image folder, dataset or shard list never reuses another's encodings.

| ``--prompts`` / ``--images`` / ``--dataset`` | units |
|---|---|
| a prompts file (.txt, .jsonl, .json, .csv, .tsv) | fixed ranges of its prompts |
| an image folder (captions in ``metadata.jsonl`` or same-name ``.txt``) | fixed ranges of its images |
| webdataset tar shards (``'shards/{00000..00099}.tar'`` or a folder of ``.tar``) | one per shard (read with webdataset) |
| a Hugging Face dataset (saved, local folder or Hub id) | fixed ranges of its rows (read with ``datasets``) |
| the same, ``--streaming`` | fixed ranges of the first ``--max-train-samples`` examples of the stream |

Images are decoded while they are encoded, not before: an unreadable one is a skipped item (counted, logged in the
cache, and refused past ``--max-bad-fraction``), not a lost encode. Small image folders are decoded up front as well
(:data:`FAIL_FAST_IMAGES`), so that a bad file among a few hundred is named before the teacher loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from .images_io import to_rgb
from .prompts import DataError, read_image_folder, read_prompts
from .summary import Tally

# Image folders up to this many images are decoded before the teacher loads (today's fail-fast: one line naming the
# first bad file); larger folders and every --dataset are checked while encoding (bad items skipped and logged).
FAIL_FAST_IMAGES = 1_000
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_CAPTION_FIELDS = ("caption", "text", "prompt")
STREAMING_DEFAULT_SAMPLES = 10_000


class BadItem(Exception):
    """An item the encoder skips: the message is its reason (one line)."""


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@dataclass
class Item:
    """One prompt (``load_image`` None) or one captioned image. ``load_image()`` gives the decoded RGB image or
    raises :class:`BadItem`."""

    key: str  # names the item in the skipped-items log: a line number, a file, a shard's sample key
    caption: str
    load_image: Callable[[], object] | None = None
    problem: str | None = None  # why the item is skipped, when known before decoding (no caption, no image)


@dataclass
class Source:
    """A run's prompts (``kind="prompts"``) or captioned images (``kind="images"``) as units of items."""

    kind: str
    description: str  # for the data line: "prompts file p.txt", "3 webdataset shards"
    identity: dict  # what identifies the data (keys the cache; a resume must find the same)
    num_units: int
    unit_items: Callable[[int, int], Iterator[Item]]  # (unit, items per unit) → that unit's items
    count: int | None = None  # items, where known before reading them (files and saved datasets)
    tally: Tally = field(default_factory=Tally)  # what the reader left out before encoding (empty lines, formats)
    sized_units: bool = True  # units are fixed ranges of ``unit_size`` items (else one per shard)
    texts: list[str] | None = None  # a prompt list's prompts, by index (for --text-encoding on-the-fly)

    def items(self, unit_size: int = 1 << 30) -> Iterator[Item]:
        """Every item, in order (unit by unit)."""
        for unit in range(self.units(unit_size)):
            yield from self.unit_items(unit, unit_size)

    def units(self, unit_size: int) -> int:
        if not self.sized_units:
            return self.num_units
        return max(1, -(-(self.count or 0) // unit_size))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()


def _ranges(values: list, make_item: Callable[[int, object], Item]) -> Callable[[int, int], Iterator[Item]]:
    def unit_items(unit: int, size: int) -> Iterator[Item]:
        start = unit * size
        return (make_item(start + i, v) for i, v in enumerate(values[start : start + size]))

    return unit_items


def _sha256_lines(lines) -> str:
    digest = hashlib.sha256()
    for number, line in enumerate(lines):
        digest.update((b"\n" if number else b"") + line.encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ prompts and folders
def prompt_list_source(prompts: list[str], description: str, tally: Tally | None = None) -> Source:
    """A list of prompts (a prompts file's, or captions)."""
    identity = {"kind": "prompt list", "count": len(prompts), "sha256": _sha256_lines(prompts)}
    return Source("prompts", description, identity, 0, _ranges(prompts, lambda i, p: Item(f"prompt {i + 1}", p)),
                  count=len(prompts), tally=tally or Tally(), texts=prompts)  # fmt: skip


def prompts_file_source(path: str) -> tuple[Source, list[str]]:
    """``--prompts FILE``: its prompts (kept by the caller only as long as it needs them) and their source."""
    tally = Tally()
    prompts = read_prompts(path, tally)
    return prompt_list_source(prompts, f"prompts file {path}", tally), prompts


def _decoded(path: Path) -> Callable[[], object]:
    def load():
        from .images_io import load_rgb

        try:
            return load_rgb(path)
        except (OSError, SyntaxError, ValueError) as error:  # PIL reports bad data as any of these
            raise BadItem(f"cannot be decoded ({first_line(error)})") from None

    return load


def image_folder_source(directory: str) -> Source:
    """``--images DIR``: each image with its caption. Folders of up to :data:`FAIL_FAST_IMAGES` images are decoded
    now (a bad file is a one-line error before the teacher loads); larger ones while they are encoded."""
    tally = Tally()
    items = read_image_folder(directory, tally, decode_up_to=FAIL_FAST_IMAGES)
    folder = Path(directory)
    identity = {"kind": "image folder", "folder": str(folder.resolve()), "count": len(items),
                "sha256": _sha256_lines(_image_folder_lines(folder, items))}  # fmt: skip
    return Source("images", f"images folder {directory}", identity, 0, _ranges(items, _folder_item), count=len(items),
                  tally=tally)  # fmt: skip


def _image_folder_lines(folder: Path, items: list) -> Iterator[str]:
    """What identifies each image: its name, size and caption (a large folder's caption file by size and time, as
    its captions are read only when encoded)."""
    prefix = len(str(folder)) + 1
    for item in items:
        path = str(item.path)
        line = f"{path[prefix:]}\t{os.stat(path).st_size}"
        if item.caption is None:
            caption = os.stat(os.path.splitext(path)[0] + ".txt")
            yield f"{line}\t.txt {caption.st_size} {caption.st_mtime_ns}"
        else:
            yield f"{line}\t{item.caption}"


def _folder_item(index: int, item) -> Item:
    caption = item.caption
    if caption is None:  # a large folder's caption, read now
        try:
            caption = Path(item.path).with_suffix(".txt").read_bytes().decode("utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as error:
            return Item(str(item.path), "", problem=f"caption file unreadable ({first_line(error)})")
        if not caption:
            return Item(str(item.path), "", problem="empty caption")
    return Item(str(item.path), caption, _decoded(Path(item.path)))


# ------------------------------------------------------------------------------------------ webdataset shards
def is_webdataset(name: str) -> bool:
    """``--dataset`` names tar shards: a ``.tar`` pattern (``{00000..00099}``) or a folder holding ``.tar`` files."""
    path = Path(name).expanduser()
    if path.is_dir():
        return any(path.glob("*.tar"))
    return name.endswith(".tar") or ".tar" in Path(name).name


def webdataset_shards(name: str) -> list[Path]:
    """The shard files of ``name``: a folder's ``*.tar`` in name order, or a brace pattern expanded (every file
    must exist: a missing shard is a one-line error, not a quietly smaller dataset)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    try:
        from braceexpand import braceexpand  # webdataset's own dependency, for its shard patterns
    except ImportError:
        raise DataError("--dataset with .tar shards needs webdataset: pip install 'fewstep[webdataset]'") from None
    shards = [Path(p).expanduser() for p in braceexpand(name)]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"webdataset shard {missing[0]} does not exist{more}; check the --dataset pattern {name}")
    return shards


def _webdataset_caption(sample: dict) -> str | None:
    if sample.get("txt") is not None:
        return sample["txt"].decode("utf-8", "replace").strip()
    if sample.get("json") is not None:
        try:
            record = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        text = next((record[k] for k in WEBDATASET_CAPTION_FIELDS if isinstance(record.get(k), str)), None)
        return text.strip() if text is not None else None
    return None


def _image_bytes(data: bytes) -> Callable[[], object]:
    def load():
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_rgb(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise BadItem(f"cannot be decoded ({first_line(error)})") from None

    return load


def _webdataset_items(shards: list[Path], with_images: bool) -> Callable[[int, int], Iterator[Item]]:
    def unit_items(unit: int, size: int) -> Iterator[Item]:
        import webdataset as wds

        shard = shards[unit]
        dataset = wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)
        samples = iter(dataset)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                return
            except Exception as error:  # a truncated or corrupt tar: what was read stays, the rest is reported
                yield Item(shard.name, "", problem=f"shard unreadable from here on ({first_line(error)})")
                return
            key = f"{shard.name}:{sample.get('__key__')}"
            caption = _webdataset_caption(sample)
            image = next((sample[k] for k in WEBDATASET_IMAGE_KEYS if sample.get(k) is not None), None)
            if caption is None:
                yield Item(key, "", problem="no caption (.txt, or .json with a caption field)")
            elif with_images and image is None:
                yield Item(key, caption, problem=f"no image ({', '.join(WEBDATASET_IMAGE_KEYS)})")
            elif not caption:
                yield Item(key, "", problem="empty caption")
            else:
                yield Item(key, caption, _image_bytes(image) if with_images else None)

    return unit_items


def webdataset_source(name: str, with_images: bool) -> Source:
    """img2dataset's webdataset shards: per sample an image (jpg/png/webp) and a caption (txt, or json)."""
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise DataError("--dataset with .tar shards needs webdataset: pip install 'fewstep[webdataset]'") from None
    shards = webdataset_shards(name)
    if not shards:
        raise DataError(f"--dataset {name} holds no .tar shards")
    identity = {"kind": "webdataset", "shards": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                                                 for p in shards]}  # fmt: skip
    kind = "images" if with_images else "prompts"
    return Source(kind, f"{len(shards):,} webdataset shard{'s' * (len(shards) != 1)} ({name})", identity,
                  len(shards), _webdataset_items(shards, with_images), sized_units=False)  # fmt: skip


# ------------------------------------------------------------------------------------------ Hugging Face datasets
def hf_dataset_source(config) -> Source:
    """``--dataset`` read with ``datasets``: a saved dataset, a local data folder or a Hub id; streamed with
    ``--streaming`` (the first ``--max-train-samples`` examples, default 10,000)."""
    from .hf_dataset import dataset_columns

    dataset, image, caption = dataset_columns(config)
    streaming = config.streaming
    limit = config.max_train_samples or (STREAMING_DEFAULT_SAMPLES if streaming else None)
    if image is not None:
        import datasets

        dataset = dataset.cast_column(image, datasets.Image(decode=False))  # decoded per item, while encoding
    count = None if streaming else min(len(dataset), limit or len(dataset))
    if count == 0:
        raise DataError(f"dataset {config.dataset} (split {config.dataset_split!r}) has no examples")
    fingerprint = getattr(dataset, "_fingerprint", None) if not streaming else None
    identity = {"kind": "hf dataset", "name": str(Path(config.dataset).expanduser().resolve())
                if Path(config.dataset).expanduser().exists() else config.dataset,
                "split": config.dataset_split, "image": image, "caption": caption, "limit": limit,
                "streaming": streaming, "fingerprint": fingerprint}  # fmt: skip

    stream = _Stream(dataset) if streaming else None

    def unit_items(unit: int, size: int) -> Iterator[Item]:
        start, stop = unit * size, (unit + 1) * size
        stop = min(stop, limit) if limit else stop
        rows = dataset.select(range(start, min(stop, count))) if not streaming else stream.rows(start, stop)
        for offset, example in enumerate(rows):
            yield _dataset_item(config.dataset, start + offset, example, image, caption)

    return Source("images" if image is not None else "prompts", f"dataset {config.dataset}", identity, 0, unit_items,
                  count=count if not streaming else limit)  # fmt: skip


class _Stream:
    """A streamed dataset read in one pass by a process that asks for its units in increasing order (it skips the
    others' rows without decoding them), instead of one pass from the start per unit."""

    def __init__(self, dataset):
        self.dataset, self.iterator, self.position = dataset, None, 0

    def rows(self, start: int, stop: int) -> Iterator[dict]:
        if self.iterator is None or self.position > start:
            self.iterator, self.position = iter(self.dataset), 0
        for _ in islice(self.iterator, start - self.position):
            self.position += 1
        while self.position < stop:
            try:
                example = next(self.iterator)
            except StopIteration:
                return
            self.position += 1
            yield example


def _dataset_item(name: str, index: int, example: dict, image: str | None, caption: str) -> Item:
    from .hf_dataset import caption_text, image_of

    text = caption_text(example[caption])
    key = f"example {index}"
    if text is None:
        raise DataError(f"dataset {name} example {index} has no caption text in column {caption!r}")
    if not text:
        return Item(key, "", problem="empty caption")
    if image is None:
        return Item(key, text)
    value = example[image]
    if value is None:
        return Item(key, text, problem="no image")

    def load():
        try:
            return to_rgb(image_of(value))
        except (OSError, SyntaxError, ValueError, DataError) as error:
            raise BadItem(f"cannot be decoded ({first_line(error)})") from None

    return Item(key, text, load)
