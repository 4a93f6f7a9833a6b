"""Readers: raw inputs (a folder, a JSONL/parquet manifest, webdataset tars) -> one ``Sample`` per input.

Every input a reader sees comes out as a ``Sample``: a good image-caption pair (status ok, raw image
bytes, not decoded) or an error Sample with the reason and the file it concerns, so a job's counts add
up to its inputs (img2dataset's per-sample status, conventions rule 11). One bad file never raises;
only job-level problems do (input missing, empty folder, unknown kind, unreadable manifest):
``CurationInputError``, raised when the reader is called, not at the first ``next()``.

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

import glob
import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
from PIL import Image

from data_curation.records import Sample, bad_text_field
from vision.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image_bytes

# the same image types in folders and tars; the order is the preference when a tar group has several
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
FOLDER_IMAGE_EXTS = frozenset(f".{e}" for e in WDS_IMAGE_EXTS)
SIDECAR_EXTS = (".txt", ".json")
MAX_KEY_LEN = 100
_TAR_BLOCK = 512

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


def _bad_text_reason(value: Any, where: str) -> str | None:
    """A reason when ``value`` (a parsed JSON object or row) holds a str that cannot be written as UTF-8."""
    field = bad_text_field(value)
    if field is None:
        return None
    return f"{where}: field {field!r} holds a {LONE_SURROGATE} (a JSON \\ud800-\\udfff escape), not valid text"


# -------------------------------------------------------------------------------------------- entry


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[{")


def open_input(spec: str | Path, *, image_key: str = "image", caption_key: str = "caption",
               max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES, allow_outside_root: bool = False) -> Iterator[Sample]:
    """Dispatch on what ``spec`` is: a folder, a ``.jsonl``/``.parquet`` manifest, a ``.tar`` shard, or a
    glob / brace pattern of tar shards (``shards/{00000..00003}.tar``, ``shards/*.tar``).

    ``image_key`` names the manifest's image column; ``caption_key`` the caption field of manifests,
    sidecar JSON files and webdataset JSON members. ``max_sample_bytes`` caps what one sample reads;
    ``allow_outside_root`` lets manifest rows and folder symlinks name files outside the input's folder
    (tars are read in place, so it does not concern them).
    """
    text = str(spec)
    path = Path(spec)
    if isinstance(spec, str) and not path.exists() and _is_pattern(text):
        shards = expand_shards(text)
        not_tar = [p for p in shards if p.suffix.lower() != ".tar"]
        if not_tar:
            raise CurationInputError(f"pattern {text} matches non-tar files ({not_tar[0]}, ...); patterns are "
                                     "for webdataset shards only")
        return read_webdataset(shards, caption_key=caption_key, max_sample_bytes=max_sample_bytes)
    if not path.exists():
        raise CurationInputError(f"input not found: {path}")
    if path.is_dir():
        return read_folder(path, caption_key=caption_key, max_sample_bytes=max_sample_bytes,
                           allow_outside_root=allow_outside_root)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        return read_manifest(path, image_key=image_key, caption_key=caption_key, max_sample_bytes=max_sample_bytes,
                             allow_outside_root=allow_outside_root)
    if suffix == ".tar":
        return read_webdataset([path], caption_key=caption_key, max_sample_bytes=max_sample_bytes)
    raise CurationInputError(f"unknown input kind: {path} (expected a folder, .jsonl, .parquet, .tar or a "
                             "pattern of .tar shards)")


# ------------------------------------------------------------------------------------------- folder


def _text_noun(media: str) -> str:
    """What the text beside a media file is called in messages."""
    return "transcript" if media == "audio" else "caption"


def _read_text(read: Callable[[Path], bytes], path: Path, rel: str, noun: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason); ``read`` is the folder's file reader, ``noun`` names the file in the reason."""
    try:
        data = read(path)
    except SampleReadError as e:
        return None, str(e)
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return None, f"{noun} file {rel} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"


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


def read_folder(path: str | Path, *, caption_key: str = "caption", media_exts: frozenset[str] = FOLDER_IMAGE_EXTS,
                media: str = "image", max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
                allow_outside_root: bool = False) -> Iterator[Sample]:
    """Images under ``path`` (recursive, sorted) with sidecar captions ``x.txt`` or ``x.json``.

    ``x.txt`` (UTF-8) gives the caption; ``x.json`` (an object) gives the caption under ``caption_key``
    when there is no ``x.txt``, and its other keys become ``meta``. Sidecars belong to the images with
    the same relative path minus extension; a sidecar with no image, or a file of any other type,
    comes out as an error Sample of its own. ``source`` is the file's path. ``media_exts`` (with dots)
    and ``media`` (the word used in messages: image | video | audio; audio's sidecars are "transcript"s)
    make it read other media. Files above ``max_sample_bytes``, FIFOs and devices, and (unless
    ``allow_outside_root``) symlinks resolving outside ``path`` are error Samples; links to folders are
    not followed (an error Sample each).
    """
    root = Path(path)
    if not root.is_dir():
        raise CurationInputError(f"not a folder: {root}")
    # Every entry but a real folder is an input: dangling links (unreadable) and links to folders included.
    files = sorted((p for p in root.rglob("*") if p.is_symlink() or not p.is_dir()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise CurationInputError(f"empty input folder: {root} (no files)")

    rel = {p: p.relative_to(root).as_posix() for p in files}
    stem_of = {p: posixpath.splitext(rel[p])[0] for p in files}
    image_stems = {stem_of[p] for p in files if p.suffix.lower() in media_exts}
    sidecars: dict[tuple[str, str], Path] = {}
    plan = []  # (file, kind) in listing order; kind: image | orphan | duplicate | unsupported | folder link
    for p in files:
        suffix = p.suffix.lower()
        if p.is_dir():
            plan.append((p, "folder link"))
        elif suffix in media_exts:
            plan.append((p, "image"))
        elif suffix in SIDECAR_EXTS:
            if stem_of[p] not in image_stems:
                plan.append((p, "orphan"))
            elif (stem_of[p], suffix) in sidecars:  # x.txt beside x.TXT: the first (sorted) one is used
                plan.append((p, "duplicate"))
            else:
                sidecars[(stem_of[p], suffix)] = p
        else:
            plan.append((p, "unsupported"))
    keys = _unique_keys([(sanitize_key(stem_of[p] if kind == "image" else rel[p]), rel[p]) for p, kind in plan])
    inside = None if allow_outside_root else root.resolve()

    def read(p: Path) -> bytes:
        return read_input_file(p, rel[p], max_sample_bytes, inside)

    return _folder_samples(plan, keys, rel, stem_of, sidecars, caption_key, media, read)


def _folder_samples(plan, keys, rel, stem_of, sidecars, caption_key, media, read) -> Iterator[Sample]:
    text = _text_noun(media)
    for (p, kind), key in zip(plan, keys):
        sample = Sample(key=key, source=str(p))
        if kind == "orphan":
            yield sample.fail("read", f"orphan {text} file {rel[p]}: no {media} named {stem_of[p]}.*")
            continue
        if kind == "duplicate":
            used = sidecars[(stem_of[p], p.suffix.lower())]
            yield sample.fail("read", f"duplicate {text} file {rel[p]}: {rel[used]} is used for {stem_of[p]}")
            continue
        if kind == "unsupported":
            suffix = p.suffix.lower() or "(no extension)"
            yield sample.fail("read", f"unsupported file type {suffix}: {rel[p]}")
            continue
        if kind == "folder link":
            yield sample.fail("read", f"cannot read {rel[p]}: {NOT_REGULAR} (a symbolic link to a folder; links to "
                                      "folders are not followed)")
            continue
        try:
            sample.image_bytes = read(p)
        except SampleReadError as e:
            yield sample.fail("read", str(e))
            continue
        stem = stem_of[p]
        txt, js = sidecars.get((stem, ".txt")), sidecars.get((stem, ".json"))
        if txt is None and js is None:
            yield sample.fail("read", f"missing {text}: no {stem}.txt or {stem}.json")
            continue
        caption = None
        if js is not None:
            raw, err = _read_text(read, js, rel[js], text)
            if err is None:
                caption, sample.meta, err = _parse_caption_json(raw, rel[js], caption_key)
            if err is not None:
                yield sample.fail("read", err)
                continue
        if txt is not None:
            caption, err = _read_text(read, txt, rel[txt], text)
            if err is not None:
                yield sample.fail("read", err)
                continue
        if caption is None:
            yield sample.fail("read", f"missing {text}: no {stem}.txt and no {caption_key!r} in {rel[js]}")
            continue
        sample.caption = caption.strip()
        yield sample


# ----------------------------------------------------------------------------------------- manifest


def read_manifest(path: str | Path, *, image_key: str = "image", caption_key: str = "caption",
                  media: str = "image", max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
                  allow_outside_root: bool = False) -> Iterator[Sample]:
    """Rows of a JSONL or parquet manifest: an image path (relative to the manifest's folder, or
    absolute) under ``image_key``, a caption under ``caption_key``; other columns go to ``meta``.

    A parquet image cell may also hold the encoded bytes (or a ``{"bytes": ...}`` struct, as HF
    datasets store images). ``source`` is ``"<manifest>:LINE"`` (1-based line) for JSONL and
    ``"<manifest>:ROW"`` (0-based row) for parquet; the key is ``<manifest stem>_<line or row>``.
    Blank JSONL lines are not rows. ``media`` is the word for the file in messages (image | video | audio).
    A path that resolves outside the manifest's folder is refused (``OUTSIDE_ROOT``) unless
    ``allow_outside_root``; files, bytes cells and JSONL lines above ``max_sample_bytes`` are refused too.
    """
    path = Path(path)
    if not path.exists():
        raise CurationInputError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise CurationInputError(f"unknown manifest kind: {path} (expected .jsonl or .parquet)")
    try:
        f, _ = open_regular(path, f"manifest {path}")  # streamed; closed when the generator ends
    except SampleReadError as e:
        raise CurationInputError(str(e)) from None
    rows = _Rows(path.parent, path.parent.resolve(), image_key, caption_key, media, max_sample_bytes,
                 allow_outside_root)
    if suffix == ".jsonl":
        return _jsonl_samples(path, f, rows)
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a bad footer
        f.close()
        raise CurationInputError(f"cannot read parquet manifest {path}: {e}") from e
    return _parquet_samples(path, f, pf, rows)


@dataclass(frozen=True)
class _Rows:
    """How a manifest's rows become Samples (``read_manifest``'s arguments)."""

    base: Path  # the manifest's folder: relative paths start there
    root: Path  # the same, resolved: paths must stay inside it unless allow_outside_root
    image_key: str
    caption_key: str
    media: str
    max_bytes: int
    allow_outside_root: bool


def _capped_lines(f: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The lines of ``f``, None for one longer than ``limit`` bytes (skipped without holding it in memory)."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(_MiB)
        yield None


def _jsonl_samples(path: Path, lines: BinaryIO, rows: _Rows) -> Iterator[Sample]:
    stem = sanitize_key(path.stem)
    with lines:
        for lineno, raw in enumerate(_capped_lines(lines, rows.max_bytes), start=1):
            if raw is not None and not raw.strip():
                continue
            sample = Sample(key=f"{stem}_{lineno:09d}", source=f"{path}:{lineno}")
            where = f"{path.name} line {lineno}"
            if raw is None:
                yield sample.fail("read", f"cannot read {where}: longer than {rows.max_bytes} bytes, {TOO_LARGE}")
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield sample.fail("read", f"{where} is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield sample.fail("read", f"{where} is not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield sample.fail("read", f"{where} is not a JSON object")
                continue
            yield _fill_from_row(sample, row, where, rows)


def _row_dicts(table, row0: int, where: Callable[[int], str]) -> Iterator[tuple[dict | None, str | None]]:
    """(row, None) per row of a parquet row group, or (None, reason) for a row holding a string cell that
    is not valid UTF-8 (pyarrow fails the whole group's ``to_pylist`` on it; here only that row fails)."""
    try:
        yield from ((row, None) for row in table.to_pylist())
        return
    except UnicodeDecodeError:
        pass
    for i in range(table.num_rows):
        row, bad = {}, None
        for name in table.column_names:
            try:
                row[name] = table.column(name)[i].as_py()
            except UnicodeDecodeError as e:
                bad = f"{where(row0 + i)}: field {name!r} is not valid UTF-8 ({e.reason} at byte {e.start})"
                break
        yield (None, bad) if bad else (row, None)


def _parquet_samples(path: Path, f: BinaryIO, pf, rows: _Rows) -> Iterator[Sample]:
    stem = sanitize_key(path.stem)
    row0 = 0

    def where(i: int) -> str:
        return f"{path.name} row {i}"

    with f:
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            try:
                table = pf.read_row_group(rg)
            except Exception as e:  # a corrupt row group fails its rows, not the manifest
                for i in range(row0, row0 + n):
                    yield Sample(key=f"{stem}_{i:09d}", source=f"{path}:{i}").fail(
                        "read", f"{path.name}: cannot read row group {rg} (rows {row0}..{row0 + n - 1}): {e}")
                row0 += n
                continue
            for i, (row, err) in enumerate(_row_dicts(table, row0, where), start=row0):
                sample = Sample(key=f"{stem}_{i:09d}", source=f"{path}:{i}")
                yield sample.fail("read", err) if err else _fill_from_row(sample, row, where(i), rows)
            row0 += n


def _is_url(text: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", text, re.I) is not None


def _fill_from_row(sample: Sample, row: dict[str, Any], where: str, rows: _Rows) -> Sample:
    image_key, caption_key, media = rows.image_key, rows.caption_key, rows.media
    missing = [k for k in (image_key, caption_key) if row.get(k) is None]
    if missing:
        return sample.fail("read", f"{where}: missing field {', '.join(repr(k) for k in missing)}")
    err = _bad_text_reason(row, where)
    if err is not None:
        return sample.fail("read", err)
    image, caption = row[image_key], row[caption_key]
    sample.meta = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
    if not isinstance(caption, str):
        return sample.fail("read", f"{where}: {caption_key!r} is a {type(caption).__name__}, not a string")
    if isinstance(image, dict) and image.get("bytes") is not None:
        image = image["bytes"]
    if isinstance(image, (bytes, bytearray)):
        if len(image) > rows.max_bytes:
            return sample.fail("read", _too_large(f"{where}: {image_key!r}", len(image), rows.max_bytes))
        sample.image_bytes = bytes(image)
    elif isinstance(image, str):
        if _is_url(image):
            tool = " (img2dataset)" if media == "image" else ""
            return sample.fail("read", f"{where}: {media} {image!r} is a URL; download it first{tool}")
        image_path = rows.base / image  # an absolute path replaces the base
        inside = None if rows.allow_outside_root else rows.root
        try:
            sample.image_bytes = read_input_file(image_path, str(image_path), rows.max_bytes, inside)
        except InputNotFound:
            return sample.fail("read", f"{where}: {media} file not found: {image_path}")
        except SampleReadError as e:
            return sample.fail("read", f"{where}: {e}")
    else:
        return sample.fail("read", f"{where}: {image_key!r} is a {type(image).__name__}, not a path or bytes")
    sample.caption = caption.strip()
    return sample


# --------------------------------------------------------------------------------------- webdataset


def expand_shards(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Brace patterns (``{00000..00003}``) and globs -> shard paths, in order. A brace-expanded name
    that does not exist is kept (the reader reports it as a missing shard); a glob that matches
    nothing raises ``CurationInputError``.
    """
    specs = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for spec in specs:
        for name in braceexpand.braceexpand(str(spec)) if isinstance(spec, str) else [str(spec)]:
            if any(c in name for c in "*?[") and not Path(name).exists():
                matched = sorted(glob.glob(name))
                if not matched:
                    raise CurationInputError(f"no shards match {name}")
                out.extend(Path(m) for m in matched)
            else:
                out.append(Path(name))
    if not out:
        raise CurationInputError(f"no shards given: {paths!r}")
    if not any(p.exists() for p in out):
        raise CurationInputError(f"input not found: none of the shards exist ({out[0]}, ...)")
    return out


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the directory plus the basename up to its first dot."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def read_webdataset(paths: str | Path | Iterable[str | Path], *, caption_key: str = "caption",
                   media_exts: tuple[str, ...] = WDS_IMAGE_EXTS, media: str = "image",
                   max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[Sample]:
    """Samples of webdataset tar shards, read with ``tarfile`` in streaming mode (nothing extracted).

    Members are grouped by webdataset key (consecutive members sharing it). The image comes from the
    first of ``media_exts`` (no dots, preference order; ``media`` is the word for it in messages) the
    group has, the caption from ``txt`` or else ``json[caption_key]``; the json's other keys become
    ``meta``; other extensions are ignored. ``source`` is ``"<shard>:<member>"``.
    A group without image or caption is an error Sample. Every member but a folder belongs to its group's
    Sample: a group with a symlink, device or FIFO member (``NOT_REGULAR``), a member above
    ``max_sample_bytes`` (``TOO_LARGE``; its data is skipped unread) or the same extension twice is an
    error Sample naming them. A hard link is read as the earlier member it points to (GNU tar stores a
    file added twice once, and the second copy as a link to the first), else it is an error
    (``HARD_LINK_UNRESOLVED``). A missing, unreadable or truncated shard gives one error Sample naming
    the shard (and the member where reading stopped); the samples read before the damage are kept, and
    reading goes on with the next shard. A shard that ends without tar's end-of-archive marker (an
    interrupted writer, img2dataset#164; tarfile itself stops there silently, as it does at a garbage
    header) is reported the same way. Keys repeated across shards get the shard's name prefixed.
    """
    shards = expand_shards(paths)
    return _wds_samples(shards, caption_key, partial(_media_group, media_exts, media), max_sample_bytes)


GroupFn = Callable[[Path, str, dict[str, tuple[str, bytes]], str], Sample]


def _wds_samples(shards: list[Path], caption_key: str, group: GroupFn, max_bytes: int) -> Iterator[Sample]:
    seen: set[str] = set()

    def unique(key: str, shard: Path) -> str:
        if key in seen:
            key = sanitize_key(f"{shard.stem}__{key}")
            if key in seen:
                key = f"{key}-{_short_hash(str(shard))}"
        seen.add(key)
        return key

    for shard in shards:
        for sample in _read_shard(shard, caption_key, group, max_bytes):
            sample.key = unique(sample.key, shard)
            yield sample


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link member, to {info.linkname}"
    kinds = {tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}
    return f"{kinds.get(info.type, f'tar type {info.type!r}')} member"


def _member_data(tf: tarfile.TarFile, info: tarfile.TarInfo, shard: Path, fd: int,
                 regular: dict[str, tuple[int, int]], max_bytes: int) -> tuple[bytes | None, str | None]:
    """(data, None) for a regular member or a hard link to an earlier one, else (None, reason).
    ``regular``: (data offset, size) of the shard's regular members so far, by normalised name."""
    where = f"{shard.name}:{info.name}"
    if info.islnk():
        target = regular.get(posixpath.normpath(info.linkname))
        if target is None:
            return None, f"cannot read {where}: {HARD_LINK_UNRESOLVED} ({info.linkname})"
        offset, size = target
        if size > max_bytes:
            return None, _too_large(where, size, max_bytes)
        data = os.pread(fd, size, offset)  # the earlier copy, read in place: the tar stream cannot seek back
        if len(data) != size:
            return None, f"cannot read {where}: its target {info.linkname} is cut short"
        return data, None
    if not info.isreg():
        return None, f"cannot read {where}: {NOT_REGULAR} ({_member_kind(info)})"
    if info.size > max_bytes:
        return None, _too_large(where, info.size, max_bytes)  # not extracted: the stream skips its data
    return tf.extractfile(info).read(), None


def _finish_group(group: GroupFn, shard: Path, key: str, members: dict[str, tuple[str, bytes]],
                  problems: list[tuple[str, str]], caption_key: str) -> Sample:
    """The group's Sample: an error naming its unreadable members (``problems``: (member, reason)), if any."""
    if problems:
        return Sample(key=sanitize_key(key), source=f"{shard}:{problems[0][0]}").fail(
            "read", "; ".join(reason for _, reason in problems))
    return group(shard, key, members, caption_key)


def _read_shard(shard: Path, caption_key: str, group: GroupFn, max_bytes: int) -> Iterator[Sample]:
    """One sample per member group of a webdataset tar, built by ``group``."""
    shard_key = sanitize_key(f"{shard.stem}__shard_error")
    try:
        fileobj, _ = open_regular(shard, f"shard {shard}")
    except SampleReadError as e:
        yield Sample(key=shard_key, source=str(shard)).fail("read", str(e))
        return
    with fileobj:
        group_key: str | None = None
        members: dict[str, tuple[str, bytes]] = {}  # ext -> (member name, data)
        problems: list[tuple[str, str]] = []  # (member name, reason) of the group's unreadable members
        regular: dict[str, tuple[int, int]] = {}  # what later hard links can point to
        last, reading = "(start of shard)", False
        try:
            with tarfile.open(fileobj=fileobj, mode="r|") as tf:
                for info in tf:
                    last = info.name
                    if info.isdir():
                        continue  # folders are not samples
                    key, ext = _split_member(info.name)
                    if key != group_key:
                        if group_key is not None:
                            yield _finish_group(group, shard, group_key, members, problems, caption_key)
                        group_key, members, problems = key, {}, []
                    reading = True
                    data, problem = _member_data(tf, info, shard, fileobj.fileno(), regular, max_bytes)
                    reading = False
                    if info.isreg():
                        regular[posixpath.normpath(info.name)] = (info.offset_data, info.size)
                    if problem is None and ext in members:
                        problem = f"{shard.name}: sample {key} has two {ext!r} members ({members[ext][0]}, {info.name})"
                    if problem is not None:
                        problems.append((info.name, problem))
                    else:
                        members[ext] = (info.name, data)
                end_offset = tf.offset
        except (tarfile.TarError, OSError, EOFError) as e:
            source = f"{shard}:{last}"
            where = (f"at member {last}" if reading else f"after member {last}") if group_key else "at its start"
            yield Sample(key=sanitize_key(group_key) if group_key is not None else shard_key, source=source).fail(
                "read", f"unreadable or truncated tar {shard} {where}: {e}")
            return
    if group_key is not None:
        yield _finish_group(group, shard, group_key, members, problems, caption_key)
    if not has_tar_end_marker(shard, end_offset):
        yield Sample(key=shard_key, source=f"{shard}:{last}").fail(
            "read", f"truncated or corrupt tar {shard}: no valid header or end-of-archive marker after member "
                    f"{last} (an interrupted write?); anything after it is lost")


def has_tar_end_marker(shard: Path, offset: int) -> bool:
    """A complete tar ends with zero blocks where the next header would be."""
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            block = f.read(_TAR_BLOCK)
    except OSError:
        return False
    return len(block) == _TAR_BLOCK and block.count(0) == _TAR_BLOCK


def _media_group(media_exts: tuple[str, ...], media: str, shard: Path, key: str,
                 members: dict[str, tuple[str, bytes]], caption_key: str) -> Sample:
    media_ext = next((e for e in media_exts if e in members), None)
    first = members[media_ext][0] if media_ext else next(iter(members.values()))[0]
    sample = Sample(key=sanitize_key(key), source=f"{shard}:{first}")
    have = ", ".join(sorted(n for n, _ in members.values()))
    if media_ext is None:
        return sample.fail("read", f"{shard.name}: a sample has no {media} member (key {key}; expected "
                                   f"{'/'.join(media_exts)}; has {have})")
    sample.image_bytes = members[media_ext][1]
    caption = None
    if "json" in members:
        name, data = members["json"]
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return sample.fail("read", f"{shard.name}:{name} is not valid UTF-8 (byte offset {e.start})")
        caption, sample.meta, err = _parse_caption_json(text, f"{shard.name}:{name}", caption_key)
        if err is not None:
            return sample.fail("read", err)
    if "txt" in members:
        name, data = members["txt"]
        try:
            caption = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            return sample.fail("read", f"{shard.name}:{name} is not valid UTF-8 (byte offset {e.start})")
    if caption is None:
        return sample.fail("read", f"{shard.name}: a sample has no {_text_noun(media)} (key {key}; txt, or "
                                   f"{caption_key!r} in json; has {have})")
    sample.caption = caption.strip()
    return sample


# ------------------------------------------------------------------------------------------- decode


def decode_image(sample: Sample, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | None:
    """The sample's image as upright RGB, or None after ``sample.fail("decode", ...)``; the reason is
    ``vision.image_io``'s message, which starts with the sample's source (file or shard:member)."""
    if sample.image_bytes is None:
        sample.fail("decode", f"{sample.source}: no image bytes")
        return None
    try:
        return load_image_bytes(sample.image_bytes, name=sample.source, max_pixels=max_pixels)
    except ImageLoadError as e:
        sample.fail("decode", str(e))
        return None
