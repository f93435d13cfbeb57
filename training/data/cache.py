"""Build-once artefacts (the digits teacher, the yardstick's classifier) in the user cache directory.

An entry is a folder ``<root>/<name>-v<version>-seed<seed>-<config hash>``. It is built in a temporary sibling
folder and renamed into place only after a manifest (every file's size and SHA-256) has been written last, so an
interrupted build (Ctrl-C, a crash, a full disk) never leaves a folder that looks finished. Before an entry is
reused its manifest is checked; a missing, truncated or altered file makes it rebuild.

Root: ``$FEWSTEP_CACHE``, else ``$XDG_CACHE_HOME/fewstep``, else ``~/.cache/fewstep``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

MANIFEST = "fewstep_complete.json"


def cache_root() -> Path:
    if os.environ.get("FEWSTEP_CACHE"):
        return Path(os.environ["FEWSTEP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fewstep"


def config_hash(config) -> str:
    """8 hex digits identifying a config dataclass's values."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def entry_name(name: str, version: int, config) -> str:
    return f"{name}-v{version}-seed{config.seed}-{config_hash(config)}"


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if sync and os.name == "posix":  # fsync of a read-only handle flushes the file (POSIX only)
            os.fsync(handle.fileno())
    return digest.hexdigest()


def write_manifest(directory: Path, durable: bool = False) -> None:
    """Record every file's size and hash; written last (temp file + rename), it marks the folder as complete.

    ``durable`` also flushes every file to disk before the manifest, and the manifest before it is renamed into
    place: after a power cut a folder with a manifest then holds the data it lists, not empty files (file systems
    may keep a rename made after a write but lose the written data).
    """
    tmp = directory / f".{MANIFEST}.tmp"
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, tmp.name))
    manifest = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=durable)} for p in files
    }
    with tmp.open("w") as handle:
        handle.write(json.dumps(manifest, indent=1) + "\n")
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST)


def check_entry(directory: Path) -> str | None:
    """None if the folder is complete and intact, else what is wrong with it."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "it has no completion manifest (an interrupted build?)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict):  # cut short (a power cut) or not ours
        return f"its manifest {MANIFEST} is unreadable"
    for relative, expected in manifest.items():
        path = directory / relative
        if not path.is_file():
            return f"{relative} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{relative} is {size} bytes, expected {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{relative} differs from what was written (SHA-256)"
    return None


def _remove(directory: Path) -> None:
    """Remove a folder, renaming it aside first so that a half-deleted folder is never seen under its name."""
    if not directory.exists():
        return
    trash = directory.with_name(f".trash-{directory.name}-{uuid.uuid4().hex[:8]}")
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete temporary folders left by builds whose process died without cleaning up (SIGKILL, SIGTERM)."""
    for tmp in root.glob(f".tmp-{name}-*"):
        pid = tmp.name.removeprefix(f".tmp-{name}-").split("-")[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    for trash in root.glob(f".trash-{name}-*"):
        shutil.rmtree(trash, ignore_errors=True)


def cached_build(
    name: str,
    version: int,
    config,
    build: Callable[[Path], None],
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """The cache entry for ``config``, calling ``build(folder)`` to make it when it is absent, broken or forced."""
    root = cache_root()
    final = root / entry_name(name, version, config)
    if final.exists() and not force:
        problem = check_entry(final)
        if problem is None:
            return final
        log(f"fewstep: rebuilding the cached {name} at {final}: {problem}")
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root, final.name)
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        write_manifest(tmp)
        _remove(final)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same entry between our removal and rename: keep theirs if intact.
            if check_entry(final) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        # Ctrl-C included: nothing half-written is left under the entry's name.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
