"""What the readers share: input files read safely, byte caps, the dataset root, keys, the named reasons.

The readers (``readers`` for folders and manifests, ``wds_reader`` for webdataset tars) turn every input
into a ``Sample``; here one bad file is a ``SampleReadError`` naming it (the readers make it an error
Sample), and a problem with the job's input as a whole a ``CurationInputError``.

Keys are stable across reruns and unique within one call: derived from the relative path (folder),
the manifest row, or the webdataset key, restricted to ``[A-Za-z0-9_-]`` (webdataset splits keys at
the first dot, webdataset#237/#288) and at most 100 characters (longer keys get truncated by
webdataset's index, webdataset#428); a collision gets a short hash of its source appended.

Hostile inputs are samples too, never a dead or hung job (each reason below is a module constant):
* only regular files are read, checked with ``stat`` before the open and ``fstat`` after an open that
  cannot block (``O_NONBLOCK``), so a FIFO, ``/dev/zero`` or a socket is refused (``NOT_REGULAR``) without
  reading a byte; tar members that are symlinks, devices or FIFOs likewise;
* no sample reads more than ``max_sample_bytes`` (``TOO_LARGE``; files, sidecars, tar members, parquet
  cells, JSONL lines): the per-media defaults below hold any sane input with room to spare while keeping
  a chunk of ``samples_per_shard`` samples in memory bounded;
* paths a manifest names, and symlinks in a folder, must resolve inside the dataset's folder
  (``OUTSIDE_ROOT``) unless ``allow_outside_root``;
* every str in a Sample encodes as UTF-8: names holding undecodable bytes are escaped (``records.escape_text``),
  and a caption / JSON / manifest field holding a lone surrogate fails its sample (``LONE_SURROGATE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

from data_curation.records import bad_text_field

MAX_KEY_LEN = 100

_MiB = 1 << 20
# Per-sample byte caps. Images: a 64 MiB file is far past any photo (a 100-Mpx JPEG is ~30 MB) and past
# what decodes under DEFAULT_MAX_PIXELS anyway. Video: clips are held whole in memory (100 per chunk by
# default), 1 GiB is ~15 min of 1080p. Audio: clips over 60 s are dropped anyway; 256 MiB is 60 s of
# 8-channel 96 kHz float WAV.
DEFAULT_MAX_SAMPLE_BYTES = 64 * _MiB
DEFAULT_MAX_VIDEO_BYTES = 1024 * _MiB
DEFAULT_MAX_AUDIO_BYTES = 256 * _MiB

# The named reasons (substrings of Sample.reason) for hostile inputs.
NOT_REGULAR = "not a regular file"
TOO_LARGE = "above max_sample_bytes"
OUTSIDE_ROOT = "outside the dataset root"
LONE_SURROGATE = "lone surrogate"
HARD_LINK_UNRESOLVED = "hard link to a member that is not an earlier regular file of this shard"


class CurationInputError(Exception):
    """The job's input as a whole cannot be read (missing path, empty folder, unknown kind, ...)."""


class SampleReadError(Exception):
    """One input file cannot be read; the message is the sample's reason and names the file."""


class InputNotFound(SampleReadError):
    """The input file does not exist (a manifest row naming a missing file says so in its own words)."""


# ---------------------------------------------------------------------------------------------- keys


def sanitize_key(text: str) -> str:
    """A webdataset-safe key: path separators -> "__", anything outside [A-Za-z0-9_-] -> "_"."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("\\", "/").strip("/").replace("/", "__")) or "_"
    if len(key) > MAX_KEY_LEN:
        key = f"{key[:MAX_KEY_LEN - 9]}-{_short_hash(text)}"
    return key


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]  # any name, lone surrogates too


def _unique_keys(candidates: list[tuple[str, str]]) -> list[str]:
    """(key, source) pairs -> keys, where every key shared by several sources gets "-<hash of source>".

    Decided over the whole list, so a key does not depend on the order the files were listed in.
    """
    counts = Counter(key for key, _ in candidates)
    return [f"{key}-{_short_hash(src)}" if counts[key] > 1 else key for key, src in candidates]


# -------------------------------------------------------------------------------------------- files

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _not_regular(mode: int, name: str) -> str:
    kind = next((kind for is_kind, kind in _FILE_KINDS if is_kind(mode)), f"file type {stat.S_IFMT(mode):o}")
    return f"cannot read {name}: {NOT_REGULAR} ({kind})"


def _too_large(name: str, size: int, max_bytes: int) -> str:
    return f"cannot read {name}: {size} bytes, {TOO_LARGE} ({max_bytes})"


def open_regular(path: Path, name: str) -> tuple[BinaryIO, int]:
    """(open file, size) of a regular file; ``SampleReadError`` naming ``name`` for anything else.

    ``stat`` first, so a FIFO or device is never opened; the open is non-blocking and ``fstat`` checks
    again, so a file swapped for a FIFO in between cannot hang the job either."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise SampleReadError(_not_regular(mode, name))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise InputNotFound(f"cannot read {name}: {e.strerror}") from None
    except (OSError, ValueError) as e:  # ValueError: a path holding a NUL byte
        raise SampleReadError(f"cannot read {name}: {getattr(e, 'strerror', None) or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SampleReadError(_not_regular(st.st_mode, name))
    return os.fdopen(fd, "rb"), st.st_size


def read_input_file(path: Path, name: str, max_bytes: int, root: Path | None = None) -> bytes:
    """The bytes of one input file: a regular file of at most ``max_bytes`` that, when ``root`` (resolved)
    is given, resolves (symlinks followed) inside it. Anything else: ``SampleReadError`` naming ``name``."""
    if root is not None:
        try:
            real = path.resolve()
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop (RuntimeError before 3.13), a NUL byte
            raise SampleReadError(f"cannot read {name}: {e}") from None
        if not real.is_relative_to(root):
            raise SampleReadError(f"cannot read {name}: {OUTSIDE_ROOT} {root} (it resolves to {real}; "
                                  "allow_outside_root reads it)")
    f, size = open_regular(path, name)
    with f:
        if size > max_bytes:
            raise SampleReadError(_too_large(name, size, max_bytes))
        try:
            data = f.read(size + 1)  # + 1: a file that grew since the fstat is caught too
        except OSError as e:
            raise SampleReadError(f"cannot read {name}: {e.strerror or e}") from None
    if len(data) > size:
        raise SampleReadError(f"cannot read {name}: it grew past its {size} bytes while being read")
    return data


# ---------------------------------------------------------------------------------------------- text


def _bad_text_reason(value: Any, where: str) -> str | None:
    """A reason when ``value`` (a parsed JSON object or row) holds a str that cannot be written as UTF-8."""
    field = bad_text_field(value)
    if field is None:
        return None
    return f"{where}: field {field!r} holds a {LONE_SURROGATE} (a JSON \\ud800-\\udfff escape), not valid text"


def _text_noun(media: str) -> str:
    """What the text beside a media file is called in messages."""
    return "transcript" if media == "audio" else "caption"


def _parse_caption_json(text: str, where: str, caption_key: str) -> tuple[str | None, dict[str, Any], str | None]:
    """A JSON object -> (caption or None if absent, other keys, error reason or None)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, {}, f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if not isinstance(obj, dict):
        return None, {}, f"{where} is not a JSON object (got {type(obj).__name__})"
    err = _bad_text_reason(obj, where)
    if err is not None:
        return None, {}, err
    caption = obj.pop(caption_key, None)
    if caption is not None and not isinstance(caption, str):
        return None, obj, f"{where}: {caption_key!r} is a {type(caption).__name__}, not a string"
    return caption, obj, None
