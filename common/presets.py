"""Preset lookup shared by every config family (LM, vision encoder, speech encoder): the lowest layer, so
that no model package imports another for it."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TypeVar

C = TypeVar("C")


class UnknownPresetError(KeyError, ValueError):
    """An unknown preset name (a ``KeyError`` for lookups, a ``ValueError`` for argument checks)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def preset_config(presets: dict[str, C], name: str, kind: str, **overrides) -> C:
    """``presets[name]`` with ``overrides``; an unknown preset raises `UnknownPresetError`, an unknown field
    ``TypeError`` naming it. ``kind`` names the family in messages ("vision", "Conformer")."""
    if name not in presets:
        raise UnknownPresetError(f"unknown {kind} preset {name!r}; choose from {sorted(presets)}")
    base = presets[name]
    unknown = set(overrides) - {f.name for f in fields(base)}
    if unknown:
        raise TypeError(f"unknown {type(base).__name__} field(s): {sorted(unknown)}")
    return replace(base, **overrides)
