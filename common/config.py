"""The one strict reader from JSON / YAML dicts to config dataclasses (`dataclass_from_dict`), its inverse
(`config_to_dict`), and the YAML reader (`read_yaml_mapping`) every config family starts from.

Every config goes through `dataclass_from_dict`, which refuses, naming the file and the dotted key: a value
that is not an object where a section is expected, unknown keys, a value of the wrong type (``"dim": "64"``),
a non-finite float, and whatever the config's own ``__post_init__`` rejects. `ReadOptions` says what else
applies. Checkpoint configs (our exports, speech checkpoints, Meta ``params.json`` and HF ``config.json``
through typed views) take the defaults, `CHECKPOINT`: every section present and every integer within its
bounds, checked before any model is built, so ``n_layers: 200000`` fails at once instead of after minutes of
building meta layers. A user's YAML (curation and run configs, `yaml_options`) may leave sections out too
(they keep their defaults), may write ``3e-4`` (YAML 1.1 reads it as a string) for a float, says what
``section: null`` means, and leaves ranges to the config's ``__post_init__``. Everywhere a missing key takes
its field's default, and a missing key without one raises.

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


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What `dataclass_from_dict` allows beyond its fixed rules (unknown keys, missing required keys and wrong
    types always raise; a missing key with a default takes it)."""

    error: type[Exception] = CheckpointError  # raised for every problem, its message naming file and key
    default_sections: bool = False  # a missing section takes its defaults; False: raises (a truncated file)
    null_section: str = "error"  # a section set to null: "error", "defaults" or "disabled" (defaults, enabled=False)
    number_strings: bool = False  # a float field takes a numeric string ("3e-4": YAML 1.1 reads it as a string)
    bounds: bool = True  # integers within the bounds of the module docstring

    def __post_init__(self) -> None:
        if self.null_section not in ("error", "defaults", "disabled"):
            raise ValueError(f"null_section: {self.null_section!r} is not error | defaults | disabled")


CHECKPOINT = ReadOptions()


def yaml_options(error: type[Exception], null_section: str = "defaults") -> ReadOptions:
    """The options for a user's YAML config: missing sections keep their defaults, ``3e-4`` is a number, ranges
    are the config's own ``__post_init__`` checks; problems raise ``error``."""
    return ReadOptions(error, default_sections=True, null_section=null_section, number_strings=True, bounds=False)


def config_to_dict(cfg: Any) -> Any:
    """A config dataclass as a JSON- and YAML-ready dict (tuples become lists; `dataclass_from_dict` reads it
    back)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dataclass_from_dict(cls: type[C], d: Any, where: str, opts: ReadOptions = CHECKPOINT, key: str = "") -> C:
    """``cls(**d)``, strictly: types from ``cls``'s field annotations, nested dataclasses read recursively,
    ``opts`` as in `ReadOptions`. Any problem is an ``opts.error`` naming ``where`` (the file) and the dotted
    key (``config.json: lm.dim: expected an integer, got str '64'``); ``key`` is ``d``'s own dotted key in the
    file when it is not the top level."""
    return _read_dataclass(cls, d, _Loc(where, key), opts)


@dataclasses.dataclass(frozen=True)
class _Loc:
    """Where a value is: its file and its dotted key inside it ("" for the top level)."""

    file: str
    key: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}" if self.key else self.file

    def child(self, name: str) -> _Loc:
        return _Loc(self.file, f"{self.key}.{name}" if self.key else name)


def _read_dataclass(cls: type[C], d: Any, at: _Loc, opts: ReadOptions) -> C:
    if not isinstance(d, dict):
        raise opts.error(f"{at}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - {f.name for f in known})
    missing = [f.name for f in known if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        problems = [f"{what} key{'s' * (len(names) > 1)} {', '.join(at.child(n).key for n in names)}"
                    for what, names in (("unknown", unknown), ("missing", missing)) if names]
        raise opts.error(f"{at.file}: {'; '.join(problems)} "
                         f"(known in {at.key or 'the top level'}: {sorted(f.name for f in known)})")
    for f in known:  # a checkpoint's section is never defaulted: a file without its 'vision' object is truncated
        if not opts.default_sections and dataclasses.is_dataclass(hints[f.name]) and f.name not in d:
            raise opts.error(f"{at.file}: missing the {at.child(f.name).key!r} section")
    values = {name: _read_value(hints[name], value, at.child(name), name, opts) for name, value in d.items()}
    return _construct(cls, values, at, opts)


def _construct(cls: type[C], values: dict, at: _Loc, opts: ReadOptions) -> C:
    try:
        return cls(**values)
    except (TypeError, ValueError, ArithmeticError) as e:  # a value the config's own checks reject
        raise opts.error(f"{at}: {e}") from e


def _read_value(tp: Any, value: Any, at: _Loc, name: str, opts: ReadOptions) -> Any:
    """``value`` checked against the annotation ``tp`` (and the int bounds of field ``name``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:  # `int | None`, `str | None`: one option left in practice
            try:
                return _read_value(option, value, at, name, opts)
            except opts.error as e:
                errors.append(str(e))
        raise opts.error(errors[0] if len(errors) == 1 else f"{at}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if value is None and opts.null_section != "error":  # YAML `section:` or `section: null`
            off = opts.null_section == "disabled" and "enabled" in {f.name for f in dataclasses.fields(tp)}
            return _construct(tp, {"enabled": False} if off else {}, at, opts)
        return _read_dataclass(tp, value, at, opts)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise opts.error(f"{at}: expected a list, got {type(value).__name__} {value!r}")
        items = (args[0],) * len(value) if len(args) == 2 and args[1] is Ellipsis else args or (Any,) * len(value)
        if len(items) != len(value):
            raise opts.error(f"{at}: expected a list of {len(items)} values, got {len(value)}: {value!r}")
        return tuple(_read_value(t, v, _Loc(at.file, f"{at.key}[{i}]"), "index", opts)
                     for i, (t, v) in enumerate(zip(items, value)))
    if tp is Any:
        return value
    return _read_scalar(tp, value, str(at), name, opts)


def _read_scalar(tp: Any, value: Any, where: str, name: str, opts: ReadOptions) -> Any:
    error = opts.error
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise error(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        lo, hi = int_bounds(name)
        if opts.bounds and not lo <= value <= hi:
            raise error(f"{where}: {value} is outside [{lo}, {hi}]")
        return value
    if tp is float:
        if opts.number_strings and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise error(f"{where}: expected a number, got str {value!r}") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise error(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise error(f"{where}: {value} is not finite")
        return float(value)
    if tp in (str, dict):
        if not isinstance(value, tp):
            raise error(f"{where}: expected {'a string' if tp is str else 'an object'}, "
                        f"got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{where}: dataclass_from_dict cannot read fields annotated {tp!r}")  # a programming error


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
