"""Webdataset tar shards: shard lists, sample reading and integrity, shared by the curation readers, the shard
builders and the training streams.

`expand_shards` turns brace patterns and globs into paths, every one of which must exist; `read_tar` yields a
shard's samples as (key, {ext: bytes}); `has_tar_end_marker` tells a complete tar from one cut short (tarfile
itself stops silently at a garbage header or a cut between members)."""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import braceexpand

_TAR_BLOCK = 512


class ShardError(FileNotFoundError):
    """A shard that is missing or unreadable; the message names it (and the member where reading stopped)."""


def is_pattern(spec: str) -> bool:
    """A glob or brace pattern rather than one path."""
    return any(c in spec for c in "*?[{")


def expand_shards(paths: str | Path | Iterable[str | Path], error: type[Exception] = ShardError) -> list[Path]:
    """Brace patterns (``{00000..00003}``) and globs -> shard paths, in order; a string is one pattern (a
    ``Path`` is taken as is). Raises ``error`` (the caller's exception class) for a glob that matches nothing,
    no names at all, or any name that does not exist (the first one named, with the count missing).
    """
    specs = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for spec in specs:
        for name in braceexpand.braceexpand(spec) if isinstance(spec, str) else [str(spec)]:
            if any(c in name for c in "*?[") and not Path(name).exists():
                matched = sorted(glob.glob(name))
                if not matched:
                    raise error(f"no shards match {name}")
                out.extend(Path(m) for m in matched)
            else:
                out.append(Path(name))
    if not out:
        raise error(f"no shards given: {paths!r}")
    missing = [p for p in out if not p.exists()]
    if missing:
        raise error(f"shard {missing[0]} not found ({len(missing)} of {len(out)} missing)")
    return out


def read_tar(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per webdataset sample: consecutive members sharing the key up to the first dot.
    A shard that cannot be read, or is cut short, raises `ShardError` naming it and the last member read."""
    key, members, last = None, {}, "(start)"
    try:
        with tarfile.open(shard, mode="r|") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                last = info.name
                stem, _, ext = info.name.rpartition("/")[2].partition(".")
                k = f"{info.name.rpartition('/')[0]}/{stem}".lstrip("/")
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext.lower()] = tf.extractfile(info).read()
            end = tf.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{shard}: unreadable or truncated tar after member {last}: {e}") from e
    if not has_tar_end_marker(shard, end):  # tarfile stops silently at a cut between members
        raise ShardError(f"{shard}: truncated tar (no end-of-archive marker after member {last})")
    if key is not None:
        yield key, members


def has_tar_end_marker(shard: Path, offset: int) -> bool:
    """A complete tar ends with zero blocks where the next header would be."""
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            block = f.read(_TAR_BLOCK)
    except OSError:
        return False
    return len(block) == _TAR_BLOCK and block.count(0) == _TAR_BLOCK
