"""The encoding cache: a run's text conditioning and real-image latents, encoded once, kept on disk, read by rows.

An *entry* holds one source's encodings (:mod:`.sources`): ``prompts`` (text conditioning) or ``images`` (VAE
posterior mean and std, and the caption's text conditioning), in fp16. Its folder is named by a digest of what
determines its contents (``spec``: the teacher's text encoders and VAE, family, resolution, the data's identity),
so a changed teacher, resolution or dataset gets a new entry and never reads a stale one::

    <cache dir>/<kind>-<digest>/
        spec.json                     what the entry was made from (for people; the name is its digest)
        units/000012-0003.safetensors part 3 of unit 12: up to ``part_rows`` encoded items (fp16)
        units/000012.json             unit 12 is complete: its parts, items read, items skipped and why
        skipped.log                   every skipped item and its reason (tab-separated)
        complete.json                 the entry is complete: its parts in order, counts, bytes (written last)

A unit is encoded in batches that never cross a part, and each part is written to a temporary file and renamed,
so an interrupted encoding continues at its first missing part and ends with the same bytes an uninterrupted one
writes (safetensors headers are written sorted). With N processes, process i encodes units i, i+N, ...; two runs
on the same entry at once write the same files and never leave a half-written one under a final name.

Training reads rows by random access (:class:`CachedEntry`): each batch opens the parts its rows live in, reads
those rows and closes them, so memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import torch

from ...core.lora_format import canonical_header
from .prompts import DataError
from .sources import BadItem, Item, Source, first_line

CACHE_VERSION = 1
PART_BYTES = 16 << 20  # a part's encoded size: what one process holds in memory while writing it
PART_SIZE_VARIABLE = "FEWSTEP_CACHE_PART_MB"  # overrides PART_BYTES (MB): larger parts mean fewer files
COMPLETE = "complete.json"
SPEC = "spec.json"
SKIPPED_LOG = "skipped.log"
EARLY_JUDGEMENT = 1_000  # items a process reads before it judges the share of bad ones


CACHE_DIR_VARIABLE = "FEWSTEP_ENCODING_CACHE"


def cache_dir_default() -> Path:
    """``--cache-dir``'s default: ``$FEWSTEP_ENCODING_CACHE`` (e.g. a shared file system on a cluster), else
    ``encodings/`` in fewstep's cache root (``$FEWSTEP_CACHE``, else ``$XDG_CACHE_HOME/fewstep``, else
    ``~/.cache/fewstep``)."""
    from .cache import cache_root

    return Path(os.environ[CACHE_DIR_VARIABLE]).expanduser() if os.environ.get(CACHE_DIR_VARIABLE) else (
        cache_root() / "encodings")  # fmt: skip


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def module_digest(*modules) -> str:
    """A digest of modules' weights: every tensor's name, shape, dtype and an evenly spaced sample of its values.

    Cheap next to hashing every byte (an SDXL text encoder is 1.4 GB) and still different for any fine-tune or
    fused LoRA, which moves (nearly) every value of the tensors it touches.
    """
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32)
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _sizes(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _temporary(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.NAME.PID-RANDOM.tmp`` beside it (the pid lets
    :func:`remove_dead_writers_files` clear what a killed writer left)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_json(path: Path, value) -> None:
    tmp = _temporary(path)
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_part(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = _temporary(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    canonical_header(tmp)  # the same part is the same bytes, whichever process wrote it
    os.replace(tmp, path)


def _part_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


@dataclass
class BuildReport:
    """What one build did (this process's share) and the entry's totals."""

    directory: Path
    kind: str
    rows: int  # items encoded and usable
    items: int  # items read
    skipped: dict[str, int]  # reason → count
    nbytes: int
    encoded_items: int = 0  # items this process encoded now (0: the entry was complete)
    seconds: float = 0.0

    def line(self) -> str:
        noun = "prompt" if self.kind == "prompts" else "image"
        skipped = sum(self.skipped.values())
        done = (f"encoded {self.encoded_items:,} {noun}s in {self.seconds:.1f} s" if self.encoded_items
                else "reused, nothing encoded")  # fmt: skip
        skips = f", {skipped:,} skipped (see {self.directory / SKIPPED_LOG})" if skipped else ""
        return (f"fewstep: {self.kind} cache {self.directory}: {self.rows:,} {noun}s{skips}, "
                f"{_sizes(self.nbytes)} on disk; {done}")  # fmt: skip


@dataclass
class EncodingCache:
    """One source's entry in the cache: built with :meth:`build` (resumable, shared by processes), read with
    :meth:`open`."""

    root: Path
    spec: dict  # what determines the encodings (the data's identity included)
    source: Source
    item_bytes: int  # encoded bytes of one item (fp16), to size parts
    batch_size: int  # items per encoder call
    max_bad_fraction: float | None = None  # images only: a larger share of skipped items is an error
    directory: Path = field(init=False)
    part_rows: int = field(init=False)

    def __post_init__(self):
        self.root = Path(self.root).expanduser()
        self.directory = self.root / f"{self.source.kind}-{spec_digest(self.spec)[:20]}"
        part_bytes = float(os.environ.get(PART_SIZE_VARIABLE, 0)) * 2**20 or PART_BYTES
        rows = max(1, int(part_bytes // max(1, self.item_bytes)))
        self.part_rows = max(self.batch_size, rows // self.batch_size * self.batch_size)

    # -------------------------------------------------------------------------------------- state on disk
    def _unit_marker(self, unit: int) -> Path:
        return self.directory / "units" / f"{unit:06d}.json"

    def _part(self, unit: int, part: int) -> Path:
        return self.directory / "units" / f"{unit:06d}-{part:04d}.safetensors"

    def num_units(self) -> int:
        return self.source.units(self.part_rows)

    def is_complete(self) -> bool:
        path = self.directory / COMPLETE
        if not path.is_file():
            return False
        try:
            return json.loads(path.read_text()).get("spec") == self.spec
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False

    def complete_info(self) -> dict:
        return json.loads((self.directory / COMPLETE).read_text())

    # -------------------------------------------------------------------------------------- building
    def build(self, encode_batch: Callable[[list[Item], list | None], dict[str, torch.Tensor]],
              process_index: int = 0, num_processes: int = 1, wait_for_everyone: Callable[[], None] = lambda: None,
              show_progress: bool = True) -> BuildReport:  # fmt: skip
        """Encode what is missing (this process: units ``process_index`` mod ``num_processes``), then the main
        process marks the entry complete. ``encode_batch(items, images)`` returns fp16 tensors, one row per item."""
        started = time.perf_counter()
        encoded = 0
        if not self.is_complete():
            (self.directory / "units").mkdir(parents=True, exist_ok=True)
            remove_dead_writers_files(self.directory)
            if process_index == 0:
                _write_json(self.directory / SPEC, self.spec)
            mine = [u for u in range(self.num_units()) if u % num_processes == process_index]
            todo = [u for u in mine if not self._unit_marker(u).is_file()]
            encoded = self._encode_units(todo, encode_batch, show_progress and process_index == 0)
        # Every process passes both barriers, even one that found the entry complete (another run may complete it
        # between two processes' checks).
        wait_for_everyone()
        if process_index == 0 and not self.is_complete():
            self._finish()
        wait_for_everyone()
        info = self.complete_info()
        return BuildReport(self.directory, self.source.kind, info["rows"], info["items"], info["skipped"],
                           info["bytes"], encoded, time.perf_counter() - started)  # fmt: skip

    def _encode_units(self, units: list[int], encode_batch, show_progress: bool) -> int:
        from tqdm.auto import tqdm

        noun = "prompts" if self.source.kind == "prompts" else "images"
        total = None
        if self.source.sized_units and self.source.count is not None:
            total = sum(min(self.part_rows, self.source.count - u * self.part_rows) for u in units)
        bar = tqdm(total=total, desc=f"encoding {noun}", unit=noun[:-1], disable=not show_progress or not units,
                   dynamic_ncols=True)  # fmt: skip
        judge = _BadItemJudge(self.max_bad_fraction if self.source.kind == "images" else None, self.directory)
        encoded = 0
        try:
            for unit in units:
                encoded += self._encode_unit(unit, encode_batch, bar, judge)
        finally:
            bar.close()
        return encoded

    def _encode_unit(self, unit: int, encode_batch, bar, judge: "_BadItemJudge") -> int:
        parts, consumed, skipped = self._written_parts(unit)
        bar.update(consumed)
        items = islice(self.source.unit_items(unit, self.part_rows), consumed, None)
        rows: list[dict[str, torch.Tensor]] = []  # the current part's encoded batches
        pending: list[tuple[Item, object]] = []
        part_items, part_skipped, encoded, part_rows = 0, [], 0, 0

        def flush():
            nonlocal encoded, part_rows
            if pending:
                images = [image for _, image in pending] if self.source.kind == "images" else None
                rows.append(encode_batch([item for item, _ in pending], images))
                encoded += len(pending)
                part_rows += len(pending)
                pending.clear()

        for item in items:
            part_items += 1
            bar.update(1)
            reason, image = self._checked(item)
            judge.saw(item, reason)
            if reason is not None:
                part_skipped.append([item.key, reason])
                continue
            pending.append((item, image))
            if len(pending) == self.batch_size or part_rows + len(pending) == self.part_rows:
                flush()
            if part_rows == self.part_rows:
                parts.append(self._write(unit, len(parts), rows, part_items, part_skipped))
                skipped += part_skipped
                rows, part_items, part_skipped, part_rows = [], 0, [], 0
        flush()
        if rows:
            parts.append(self._write(unit, len(parts), rows, part_items, part_skipped))
            part_items = 0
        skipped += part_skipped
        consumed_total = sum(p["items"] for p in parts) + part_items
        _write_json(self._unit_marker(unit), {"parts": parts, "items": consumed_total,
                                              "rows": sum(p["rows"] for p in parts), "skipped": skipped})  # fmt: skip
        return encoded

    def _checked(self, item: Item) -> tuple[str | None, object]:
        """(why ``item`` is skipped or None, its decoded image for an image item)."""
        if item.problem is not None:
            return item.problem, None
        if self.source.kind != "images":
            return None, None
        try:
            return None, item.load_image()
        except BadItem as error:
            return str(error), None

    def _written_parts(self, unit: int) -> tuple[list[dict], int, list]:
        """The parts of ``unit`` an interrupted encoding left (in order), the items they consumed, their skips."""
        parts, consumed, skipped = [], 0, []
        while self._part(unit, len(parts)).is_file():
            path = self._part(unit, len(parts))
            try:
                metadata = _part_metadata(path)
                rows, items = int(metadata["rows"]), int(metadata["items"])
            except Exception:  # unreadable (a disk fault): encode it and what follows again
                break
            parts.append({"file": path.name, "rows": rows, "items": items})
            consumed += items
            skipped += json.loads(metadata.get("skipped", "[]"))
        return parts, consumed, skipped

    def _write(self, unit: int, part: int, rows: list[dict], items: int, skipped: list) -> dict:
        tensors = {name: torch.cat([r[name] for r in rows]) for name in rows[0]}
        count = next(iter(tensors.values())).shape[0]
        metadata = {"rows": str(count), "items": str(items), "skipped": json.dumps(skipped)}
        path = self._part(unit, part)
        _write_part(path, tensors, metadata)
        return {"file": path.name, "rows": count, "items": items}

    def _finish(self) -> None:
        """Every unit is encoded: write the skipped-items log, check the share of bad items, mark complete."""
        parts, items, rows, skipped = [], 0, 0, []
        missing = [u for u in range(self.num_units()) if not self._unit_marker(u).is_file()]
        if missing:
            raise DataError(
                f"encoding cache {self.directory}: {len(missing)} unit(s) were not encoded (e.g. unit {missing[0]}); "
                "another process failed: run again to encode them"
            )
        for unit in range(self.num_units()):
            marker = json.loads(self._unit_marker(unit).read_text())
            parts += [[f"units/{p['file']}", p["rows"]] for p in marker["parts"] if p["rows"]]
            items += marker["items"]
            rows += marker["rows"]
            skipped += marker["skipped"]
        write_skipped_log(self.directory, skipped)
        reasons: dict[str, int] = {}
        for _, reason in skipped:
            head = f"item: {reason.split(' (')[0]}"
            reasons[head] = reasons.get(head, 0) + 1
        judge = _BadItemJudge(self.max_bad_fraction if self.source.kind == "images" else None, self.directory)
        judge.skipped = skipped
        judge.judge(len(skipped), items, final=True)
        if rows == 0:
            raise DataError(f"{self.source.description} holds no usable items ({len(skipped)} skipped: see "
                            f"{self.directory / SKIPPED_LOG})")  # fmt: skip
        nbytes = sum((self.directory / p).stat().st_size for p, _ in parts)
        _write_json(self.directory / COMPLETE, {"spec": self.spec, "version": CACHE_VERSION, "parts": parts,
                                                "items": items, "rows": rows, "skipped": reasons, "bytes": nbytes})

    # -------------------------------------------------------------------------------------- reading
    def open(self) -> "CachedEntry":
        return CachedEntry(self.directory)


def remove_dead_writers_files(directory: Path) -> None:
    """Delete the temporary files of writers that were killed mid-write (their process is gone); a live writer's
    (another run encoding the same entry) are left alone."""
    from .cache import pid_alive

    for tmp in [*directory.glob(".*.tmp"), *directory.glob("units/.*.tmp")]:
        pid = tmp.name.rsplit(".", 2)[-2].split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def write_skipped_log(directory: Path, skipped: list) -> None:
    tmp = _temporary(directory / SKIPPED_LOG)
    tmp.write_text("".join(f"{key}\t{reason}\n" for key, reason in skipped))
    os.replace(tmp, directory / SKIPPED_LOG)


@dataclass
class _BadItemJudge:
    """Turns too many skipped images (more than ``max_fraction`` of those read) into a one-line error: early, once
    :data:`EARLY_JUDGEMENT` items are read, and at the end."""

    max_fraction: float | None
    directory: Path
    seen: int = 0
    skipped: list = field(default_factory=list)

    def saw(self, item: Item, reason: str | None) -> None:
        self.seen += 1
        if reason is not None:
            self.skipped.append([item.key, reason])
            if self.seen >= EARLY_JUDGEMENT or self.max_fraction == 0:
                self.judge(len(self.skipped), self.seen, final=False)

    def judge(self, skipped: int, seen: int, final: bool) -> None:
        if self.max_fraction is None or skipped <= self.max_fraction * seen:
            return
        log = self.directory / SKIPPED_LOG
        if not final:
            write_skipped_log(self.directory, self.skipped)
        first_key, first_reason = (self.skipped or [["", ""]])[0]
        so_far = "" if final else " so far"
        raise DataError(
            f"{skipped:,} of {seen:,} images{so_far} could not be used ({100 * skipped / seen:.2g}%, more than "
            f"--max-bad-fraction {self.max_fraction:g}; e.g. {first_key}: {first_reason}); see {log}, fix or remove "
            "them, or raise --max-bad-fraction"
        )


class CachedEntry:
    """A complete entry, read by rows: ``read(names, index)`` gives the rows ``index`` of the named tensors."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        info = json.loads((self.directory / COMPLETE).read_text())
        self.parts = [self.directory / file for file, _ in info["parts"]]
        self.offsets = [0]
        for _, rows in info["parts"]:
            self.offsets.append(self.offsets[-1] + rows)
        self.nbytes = info["bytes"]
        from safetensors import safe_open

        with safe_open(str(self.parts[0]), "pt") as handle:
            self.names = set(handle.keys())

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, names: list[str], index) -> dict[str, torch.Tensor]:
        """Rows ``index`` (any order, repeats allowed) of each tensor in ``names``, as stored (fp16)."""
        from safetensors import safe_open

        index = [int(i) for i in (index.tolist() if torch.is_tensor(index) else index)]
        if any(not 0 <= i < len(self) for i in index):
            raise IndexError(f"row out of range 0..{len(self) - 1} of {self.directory}")
        by_part: dict[int, list[tuple[int, int]]] = {}
        for position, row in enumerate(index):
            part = bisect_right(self.offsets, row) - 1
            by_part.setdefault(part, []).append((position, row - self.offsets[part]))
        out: dict[str, list] = {name: [None] * len(index) for name in names}
        for part, rows in by_part.items():
            with safe_open(str(self.parts[part]), "pt") as handle:  # opened per batch: nothing stays mapped
                for name in names:
                    sliced = handle.get_slice(name)
                    for position, local in rows:
                        out[name][position] = sliced[local : local + 1]
        return {name: torch.cat(tensors) for name, tensors in out.items()}

    def first(self, names: list[str], count: int) -> dict[str, torch.Tensor]:
        return self.read(names, list(range(min(count, len(self)))))
