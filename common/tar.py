"""Tar shard lists and integrity, shared by the shard builders, the training streams and BEST-RQ pre-training.

Knows no sample format: `expand_shards` turns brace patterns and globs into paths, `has_tar_end_marker` tells
a complete tar from one cut short (tarfile itself stops silently at a garbage header)."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

import braceexpand

_TAR_BLOCK = 512


def is_pattern(spec: str) -> bool:
    """A glob or brace pattern rather than one path."""
    return any(c in spec for c in "*?[{")


def expand_shards(paths: str | Path | Iterable[str | Path], error: type[Exception]) -> list[Path]:
    """Brace patterns (``{00000..00003}``) and globs -> shard paths, in order. A brace-expanded name
    that does not exist is kept (the reader reports it as a missing shard); a glob that matches
    nothing raises ``error`` (the caller's exception class), as do no names at all and
    names of which none exists.
    """
    specs = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for spec in specs:
        for name in braceexpand.braceexpand(str(spec)) if isinstance(spec, str) else [str(spec)]:
            if any(c in name for c in "*?[") and not Path(name).exists():
                matched = sorted(glob.glob(name))
                if not matched:
                    raise error(f"no shards match {name}")
                out.extend(Path(m) for m in matched)
            else:
                out.append(Path(name))
    if not out:
        raise error(f"no shards given: {paths!r}")
    if not any(p.exists() for p in out):
        raise error(f"input not found: none of the shards exist ({out[0]}, ...)")
    return out


def has_tar_end_marker(shard: Path, offset: int) -> bool:
    """A complete tar ends with zero blocks where the next header would be."""
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            block = f.read(_TAR_BLOCK)
    except OSError:
        return False
    return len(block) == _TAR_BLOCK and block.count(0) == _TAR_BLOCK
