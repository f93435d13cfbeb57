"""Typed configs: one dataclass per entry point, overridable from YAML and the CLI, unknown keys rejected.

Each field's ``metadata["help"]`` is its documentation; :func:`add_dataclass_arguments` turns the fields into
``--kebab-case`` options whose default is "unset", so precedence is: CLI > YAML > family default > field default.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def _base_type(annotation) -> type:
    """int | None → int; list[int] | None → list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return origin or annotation


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        if default is not None and not isinstance(default, (list, dict)):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=field.name)
        if kind is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif kind is list:
            kwargs.update(type=lambda s: [int(v) for v in s.replace(" ", "").split(",") if v], metavar="T1,T2,...")
        elif "choices" in field.metadata:
            kwargs.update(choices=field.metadata["choices"])
        else:
            kwargs.update(type=kind)
        parser.add_argument(flag, **kwargs)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return {key.replace("-", "_"): value for key, value in data.items()}


def build_config(cls, *layers: dict):
    """Merge dicts (later wins) into ``cls``, rejecting unknown keys with the list of known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - names)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(names))}")
        merged.update(layer)
    return cls(**merged)


def save_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
