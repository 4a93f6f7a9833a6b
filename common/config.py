"""The one strict reader from JSON dicts to config dataclasses, and its inverse; and the YAML reader
(`read_yaml_mapping`) every config family (curation, run configs) starts from.

Every checkpoint config we read (our exports, speech checkpoints, Meta ``params.json`` and HF
``config.json`` through typed views) goes through `dataclass_from_dict`, which refuses, naming the file
and the field: a value that is not an object where a section is expected, unknown keys, missing
required keys, a value of the wrong type (``"dim": "64"``), a non-finite float, and an integer outside
its bounds. Bounds are checked before any model is built, so ``n_layers: 200000`` fails at once instead
of after minutes of building meta layers.

Integer bounds (documented here, not per config):

* every int is >= 1 (a size, count or stride), except the fields in `MAY_BE_ZERO` (seeds, optional
  block counts), which are >= 0; indices inside tuples (``taps``) are >= 0;
* layer and head counts (names ending in ``layers`` or ``heads``, and ``depth``) are <= `MAX_COUNT`
  (4096: Llama 3 405B has 126 layers and 128 heads);
* every other int is <= `MAX_SIZE` (2**24 = 16.8M: 405B's widest size is its 128,256-row vocabulary,
  its context 131,072; a 10M-token context still fits).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")

MAX_COUNT = 4096
MAX_SIZE = 1 << 24
MAY_BE_ZERO = frozenset({"seed", "n_global_layers"})


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded; the message names the file and the field."""


def config_to_dict(cfg: Any) -> dict:
    """A config dataclass as a JSON-ready dict (tuples become lists, `dataclass_from_dict` reads them back)."""
    return dataclasses.asdict(cfg)


def dataclass_from_dict(cls: type[C], d: Any, where: str) -> C:
    """``cls(**d)``, strictly: types from ``cls``'s field annotations, nested dataclasses read recursively,
    bounds as in the module docstring. Any problem is a `CheckpointError` naming ``where`` and the field."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - {f.name for f in known})
    required = [f.name for f in known if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in d]
    if unknown or required:
        raise CheckpointError(f"{where}: unknown keys {unknown}, missing keys {required}")
    for f in known:  # a section is never defaulted: a file without its 'vision' object is truncated
        if dataclasses.is_dataclass(hints[f.name]) and f.name not in d:
            raise CheckpointError(f"{where}: missing the {f.name!r} section")
    values = {name: read_value(hints[name], value, _join(where, name), name) for name, value in d.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError, ArithmeticError) as e:  # a value the config's own checks reject
        raise CheckpointError(f"{where}: {e}") from e


def read_value(tp: Any, value: Any, where: str, name: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and the int bounds of field ``name``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:  # `int | None`, `str | None`: one option left in practice
            try:
                return read_value(option, value, where, name)
            except CheckpointError as e:
                errors.append(str(e))
        raise CheckpointError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return dataclass_from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CheckpointError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0]
        return tuple(read_value(item, v, f"{where}[{i}]", "index") for i, v in enumerate(value))
    if tp is Any:
        return value
    return _read_scalar(tp, value, where, name)


def _read_scalar(tp: Any, value: Any, where: str, name: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise CheckpointError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        lo, hi = int_bounds(name)
        if not lo <= value <= hi:
            raise CheckpointError(f"{where}: {value} is outside [{lo}, {hi}]")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CheckpointError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise CheckpointError(f"{where}: {value} is not finite")
        return float(value)
    if tp in (str, dict):
        if not isinstance(value, tp):
            raise CheckpointError(f"{where}: expected {'a string' if tp is str else 'an object'}, "
                                  f"got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{where}: config_io cannot read fields annotated {tp!r}")  # a programming error


def _join(where: str, name: str) -> str:
    """``config.json`` + ``lm`` -> ``config.json: lm``; then + ``dim`` -> ``config.json: lm.dim``."""
    return f"{where}.{name}" if ": " in where else f"{where}: {name}"


def int_bounds(name: str) -> tuple[int, int]:
    """(lowest, highest) allowed value of an int field called ``name`` (see the module docstring)."""
    lo = 0 if name in MAY_BE_ZERO or name == "index" else 1
    hi = MAX_COUNT if name.endswith(("layers", "heads")) or name == "depth" else MAX_SIZE
    return lo, hi


def read_yaml_mapping(path: str | Path, error: type[Exception]) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); problems raise ``error`` naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
