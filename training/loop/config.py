"""Typed configs: one dataclass per entry point, overridable from YAML and the CLI, unknown keys rejected.

Each field's ``metadata["help"]`` is its documentation; :func:`add_dataclass_arguments` turns the fields into
``--kebab-case`` options whose default is "unset", so precedence is: CLI > YAML > family default > field default.

Values are typed and checked at the boundary, the same way for the CLI and YAML (:func:`coerce`): PyYAML reads
``lr: 1e-3`` as a string, so numbers are accepted as text in any notation ``float()`` reads. Constraints are
declared in the field's metadata, so a new field gets the same treatment by saying what it needs:

* ``"min"`` / ``"max"``: inclusive bounds (for a list, of every item); integers default to ``"min": 0``;
* ``"above"``: an exclusive lower bound (``"above": 0`` for a learning rate);
* ``"below"``: an exclusive upper bound;
* ``"choices"``: the allowed values;
* ``"required"``: a note appended to the help, e.g. "required for a new run";
* ``"older_runs"``: for an option added after runs were made without it, the value those runs used, taken when one
  of them is resumed (``training.loop.resume.with_older_run_values``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value of the wrong type or out of range: the message names the option, the value and the fix."""


def _base_type(annotation) -> type:
    """int | None → int; list[int] | None → list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return origin or annotation


def _item_type(annotation) -> type:
    """list[str] | None → str."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return (typing.get_args(annotation) or (int,))[0]


def _optional(annotation) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"must be true or false, got {text!r}")


def _min(metadata, kind: type):
    """The inclusive lower bound: the field's ``"min"``; for integers 0 when it has none (counts, sizes, seeds)."""
    return metadata.get("min", 0 if kind is int else None)


def _bounds(metadata, kind: type) -> str:
    """The limits in words: "≥ 1", "> 0", "≥ 0 and < 1"."""
    low = _min(metadata, kind)
    low_text = f"≥ {low}" if low is not None else (f"> {metadata['above']}" if "above" in metadata else "")
    high = f"≤ {metadata['max']}" if "max" in metadata else (f"< {metadata['below']}" if "below" in metadata else "")
    return " and ".join(part for part in (low_text, high) if part)


def _describe(kind: type, metadata) -> str:
    noun = {int: "an integer", float: "a number", list: "a list of integers (e.g. 999,499)"}.get(kind, "a value")
    bounds = _bounds(metadata, kind)
    return f"{noun} {bounds}" if bounds else noun


def _number(value, kind: type, metadata):
    """An int or float from a number or its text (``1e-3``, ``1_000``) within the limits; None if not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else _int_text(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if kind is int:
        if float(value) != int(value):
            return None
        value = int(value)
    else:
        value = float(value)
    if not _in_bounds(value, metadata, kind):
        return None
    return value


def _int_text(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)  # 1e3 is a whole number written in scientific notation


def _in_bounds(value, metadata, kind: type) -> bool:
    low = _min(metadata, kind)
    return not (
        (low is not None and value < low)
        or ("above" in metadata and value <= metadata["above"])
        or ("max" in metadata and value > metadata["max"])
        or ("below" in metadata and value >= metadata["below"])
    )


def coerce(field: dataclasses.Field, annotation, value):
    """``value`` (from the CLI or YAML) as the field's type, checked against its metadata; ConfigError if not.

    The message has no option name; the caller adds where the value came from.
    """
    kind, metadata = _base_type(annotation), field.metadata
    if value is None:
        if _optional(annotation):
            return None
        raise ConfigError("needs a value")
    if kind is bool:
        if isinstance(value, bool):
            return value
        return _parse_bool(value)
    if kind in (int, float):
        number = _number(value, kind, metadata)
        if number is None:
            raise ConfigError(f"must be {_describe(kind, metadata)}, got {value!r}")
        return number
    if kind is list and _item_type(annotation) is str:  # e.g. repeatable file names: one string or a list of them
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) and item for item in items):
            raise ConfigError(f"must be a file name or a list of them, got {value!r}")
        return list(items)
    if kind is list:
        items = value.replace(" ", "").split(",") if isinstance(value, str) else value
        if isinstance(items, (int, float)) and not isinstance(items, bool):  # YAML `timesteps: 999`
            items = [items]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"must be {_describe(list, metadata)}, got {value!r}")
        numbers = [_number(item, int, metadata) for item in items if item != ""]
        if not numbers:
            raise ConfigError(f"needs at least one integer, e.g. 999,499; got {value!r}")
        if None in numbers:
            bounds = _bounds(metadata, int)
            raise ConfigError(f"must be integers{' ' + bounds if bounds else ''} separated by commas, got {value!r}")
        return numbers
    if isinstance(value, (bool, list, dict)) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"must be text, got {value!r}")
    value = str(value)
    if "choices" in metadata and value not in metadata["choices"]:
        raise ConfigError(f"must be one of {', '.join(metadata['choices'])}, got {value!r}")
    return value


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argparse_type(field: dataclasses.Field, annotation):
    """The argparse ``type=`` of a field: :func:`coerce`, named after the field (argparse prints that name)."""

    def convert(text: str):
        try:
            return coerce(field, annotation, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = field.name
    return convert


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        if "required" in field.metadata:
            help_text += f" ({field.metadata['required']})"
        elif default not in (None, "") and not isinstance(default, (list, dict)):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=field.name)
        if "choices" in field.metadata:
            kwargs.update(choices=field.metadata["choices"])  # argparse names the choices itself
        else:
            kwargs.update(type=_argparse_type(field, hints[field.name]))
        if kind is bool:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        elif kind is list:
            kwargs.update(metavar="T1,T2,...")
        parser.add_argument(flag(field.name), **kwargs)


def load_yaml(path: str | Path) -> dict:
    """A YAML file of ``option: value`` (keys with - or _); syntax and shape errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; give a YAML file of option: value lines")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML file of option: value lines") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where} ({problem})") from None
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return {key.replace("-", "_"): value for key, value in data.items()}


def typed_layer(cls, layer: dict, source: str | None = None) -> dict:
    """``layer`` with every value coerced to its field's type; unknown keys rejected with the known ones.

    ``source`` names where the values come from in messages: None for the command line, else a file.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(layer) - set(fields))
    if unknown:
        where = f" in {source}" if source else ""
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)}{where}; known options: {', '.join(sorted(fields))}"
        )
    typed = {}
    for name, value in layer.items():
        try:
            typed[name] = coerce(fields[name], hints[name], value)
        except ConfigError as error:
            where = f"{name} in {source}" if source else flag(name)
            raise ConfigError(f"{where} {error}") from None
    return typed


def build_config(cls, *layers: dict, sources: tuple[str | None, ...] = ()):
    """Merge dicts (later wins) into ``cls``, each typed and checked (see :func:`typed_layer`).

    ``sources`` names each layer in messages (a file name, or None for the command line).
    """
    merged: dict[str, Any] = {}
    for index, layer in enumerate(layers):
        merged.update(typed_layer(cls, layer, sources[index] if index < len(sources) else None))
    return cls(**merged)


def check_config(config) -> None:
    """Check a config built in code (not through :func:`build_config`) against its fields' types and limits."""
    typed_layer(type(config), dataclasses.asdict(config), source=f"the {type(config).__name__}")


def save_yaml(config, path: str | Path) -> None:
    """Write ``config`` as YAML atomically, so a failed write never leaves half a file in place of the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: every DDP process writes the config
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    tmp.replace(path)
