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
"""

from __future__ import annotations

import glob
import hashlib
import json
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
from PIL import Image

from data_curation.records import Sample
from vision.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image_bytes

FOLDER_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SIDECAR_EXTS = (".txt", ".json")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a group has several
MAX_KEY_LEN = 100
_TAR_BLOCK = 512


class CurationInputError(Exception):
    """The job's input as a whole cannot be read (missing path, empty folder, unknown kind, ...)."""


# ---------------------------------------------------------------------------------------------- keys


def sanitize_key(text: str) -> str:
    """A webdataset-safe key: path separators -> "__", anything outside [A-Za-z0-9_-] -> "_"."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("\\", "/").strip("/").replace("/", "__")) or "_"
    if len(key) > MAX_KEY_LEN:
        key = f"{key[:MAX_KEY_LEN - 9]}-{_short_hash(text)}"
    return key


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _unique_keys(candidates: list[tuple[str, str]]) -> list[str]:
    """(key, source) pairs -> keys, where every key shared by several sources gets "-<hash of source>".

    Decided over the whole list, so a key does not depend on the order the files were listed in.
    """
    counts = Counter(key for key, _ in candidates)
    return [f"{key}-{_short_hash(src)}" if counts[key] > 1 else key for key, src in candidates]


# -------------------------------------------------------------------------------------------- entry


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[{")


def open_input(spec: str | Path, *, image_key: str = "image", caption_key: str = "caption") -> Iterator[Sample]:
    """Dispatch on what ``spec`` is: a folder, a ``.jsonl``/``.parquet`` manifest, a ``.tar`` shard, or a
    glob / brace pattern of tar shards (``shards/{00000..00003}.tar``, ``shards/*.tar``).

    ``image_key`` names the manifest's image column; ``caption_key`` the caption field of manifests,
    sidecar JSON files and webdataset JSON members.
    """
    text = str(spec)
    path = Path(spec)
    if isinstance(spec, str) and not path.exists() and _is_pattern(text):
        shards = expand_shards(text)
        not_tar = [p for p in shards if p.suffix.lower() != ".tar"]
        if not_tar:
            raise CurationInputError(f"pattern {text} matches non-tar files ({not_tar[0]}, ...); patterns are "
                                     "for webdataset shards only")
        return read_webdataset(shards, caption_key=caption_key)
    if not path.exists():
        raise CurationInputError(f"input not found: {path}")
    if path.is_dir():
        return read_folder(path, caption_key=caption_key)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        return read_manifest(path, image_key=image_key, caption_key=caption_key)
    if suffix == ".tar":
        return read_webdataset([path], caption_key=caption_key)
    raise CurationInputError(f"unknown input kind: {path} (expected a folder, .jsonl, .parquet, .tar or a "
                             "pattern of .tar shards)")


# ------------------------------------------------------------------------------------------- folder


def _read_error(path: Path, rel: str) -> str | None:
    """A reason not to read ``path`` at all: a FIFO or device would block or never end."""
    if path.exists() and not path.is_file():
        return f"cannot read {rel}: not a regular file"
    return None


def _text_noun(media: str) -> str:
    """What the text beside a media file is called in messages."""
    return "transcript" if media == "audio" else "caption"


def _read_text(path: Path, rel: str, noun: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason); ``noun`` names the file in the reason."""
    err = _read_error(path, rel)
    if err is not None:
        return None, err
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read {rel}: {e.strerror or e}"
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
    caption = obj.pop(caption_key, None)
    if caption is not None and not isinstance(caption, str):
        return None, obj, f"{where}: {caption_key!r} is a {type(caption).__name__}, not a string"
    return caption, obj, None


def read_folder(path: str | Path, *, caption_key: str = "caption", media_exts: frozenset[str] = FOLDER_IMAGE_EXTS,
                media: str = "image") -> Iterator[Sample]:
    """Images under ``path`` (recursive, sorted) with sidecar captions ``x.txt`` or ``x.json``.

    ``x.txt`` (UTF-8) gives the caption; ``x.json`` (an object) gives the caption under ``caption_key``
    when there is no ``x.txt``, and its other keys become ``meta``. Sidecars belong to the images with
    the same relative path minus extension; a sidecar with no image, or a file of any other type,
    comes out as an error Sample of its own. ``source`` is the file's path. ``media_exts`` (with dots)
    and ``media`` (the word used in messages: image | video | audio; audio's sidecars are "transcript"s)
    make it read other media.
    """
    root = Path(path)
    if not root.is_dir():
        raise CurationInputError(f"not a folder: {root}")
    # Everything that is not a folder is an input, dangling links included (they fail as unreadable).
    files = sorted((p for p in root.rglob("*") if not p.is_dir()), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise CurationInputError(f"empty input folder: {root} (no files)")

    rel = {p: p.relative_to(root).as_posix() for p in files}
    stem_of = {p: posixpath.splitext(rel[p])[0] for p in files}
    image_stems = {stem_of[p] for p in files if p.suffix.lower() in media_exts}
    sidecars: dict[tuple[str, str], Path] = {}
    plan = []  # (file, kind) in listing order; kind: image | orphan | duplicate | unsupported
    for p in files:
        suffix = p.suffix.lower()
        if suffix in media_exts:
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
    return _folder_samples(plan, keys, rel, stem_of, sidecars, caption_key, media)


def _folder_samples(plan, keys, rel, stem_of, sidecars, caption_key, media="image") -> Iterator[Sample]:
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
        err = _read_error(p, rel[p])
        if err is None:
            try:
                sample.image_bytes = p.read_bytes()
            except OSError as e:
                err = f"cannot read {rel[p]}: {e.strerror or e}"
        if err is not None:
            yield sample.fail("read", err)
            continue
        stem = stem_of[p]
        txt, js = sidecars.get((stem, ".txt")), sidecars.get((stem, ".json"))
        if txt is None and js is None:
            yield sample.fail("read", f"missing {text}: no {stem}.txt or {stem}.json")
            continue
        caption = None
        if js is not None:
            raw, err = _read_text(js, rel[js], text)
            if err is None:
                caption, sample.meta, err = _parse_caption_json(raw, rel[js], caption_key)
            if err is not None:
                yield sample.fail("read", err)
                continue
        if txt is not None:
            caption, err = _read_text(txt, rel[txt], text)
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
                  media: str = "image") -> Iterator[Sample]:
    """Rows of a JSONL or parquet manifest: an image path (relative to the manifest's folder, or
    absolute) under ``image_key``, a caption under ``caption_key``; other columns go to ``meta``.

    A parquet image cell may also hold the encoded bytes (or a ``{"bytes": ...}`` struct, as HF
    datasets store images). ``source`` is ``"<manifest>:LINE"`` (1-based line) for JSONL and
    ``"<manifest>:ROW"`` (0-based row) for parquet; the key is ``<manifest stem>_<line or row>``.
    Blank JSONL lines are not rows. ``media`` is the word for the file in messages (image | video | audio).
    """
    path = Path(path)
    if not path.is_file():
        raise CurationInputError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        try:
            lines = open(path, "rb")  # streamed line by line; closed when the generator ends
        except OSError as e:
            raise CurationInputError(f"cannot read manifest {path}: {e.strerror or e}") from e
        return _jsonl_samples(path, lines, image_key, caption_key, media)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a bad footer
            raise CurationInputError(f"cannot read parquet manifest {path}: {e}") from e
        return _parquet_samples(path, pf, image_key, caption_key, media)
    raise CurationInputError(f"unknown manifest kind: {path} (expected .jsonl or .parquet)")


def _jsonl_samples(path: Path, lines: BinaryIO, image_key: str, caption_key: str, media: str) -> Iterator[Sample]:
    stem = sanitize_key(path.stem)
    with lines:
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            sample = Sample(key=f"{stem}_{lineno:09d}", source=f"{path}:{lineno}")
            where = f"{path.name} line {lineno}"
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
            yield _fill_from_row(sample, row, path.parent, image_key, caption_key, where, media)


def _parquet_samples(path: Path, pf, image_key: str, caption_key: str, media: str) -> Iterator[Sample]:
    stem = sanitize_key(path.stem)
    row0 = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        try:
            rows = pf.read_row_group(rg).to_pylist()
        except Exception as e:  # a corrupt row group fails its rows, not the manifest
            for i in range(row0, row0 + n):
                yield Sample(key=f"{stem}_{i:09d}", source=f"{path}:{i}").fail(
                    "read", f"{path.name}: cannot read row group {rg} (rows {row0}..{row0 + n - 1}): {e}")
            row0 += n
            continue
        for i, row in enumerate(rows, start=row0):
            sample = Sample(key=f"{stem}_{i:09d}", source=f"{path}:{i}")
            yield _fill_from_row(sample, row, path.parent, image_key, caption_key, f"{path.name} row {i}", media)
        row0 += n


def _fill_from_row(sample: Sample, row: dict[str, Any], base: Path, image_key: str, caption_key: str,
                   where: str, media: str) -> Sample:
    missing = [k for k in (image_key, caption_key) if row.get(k) is None]
    if missing:
        return sample.fail("read", f"{where}: missing field {', '.join(repr(k) for k in missing)}")
    image, caption = row[image_key], row[caption_key]
    sample.meta = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
    if not isinstance(caption, str):
        return sample.fail("read", f"{where}: {caption_key!r} is a {type(caption).__name__}, not a string")
    if isinstance(image, dict) and image.get("bytes") is not None:
        image = image["bytes"]
    if isinstance(image, (bytes, bytearray)):
        sample.image_bytes = bytes(image)
    elif isinstance(image, str):
        if re.match(r"^[a-z][a-z0-9+.-]*://", image, re.I):
            tool = " (img2dataset)" if media == "image" else ""
            return sample.fail("read", f"{where}: {media} {image!r} is a URL; download it first{tool}")
        image_path = Path(image) if Path(image).is_absolute() else base / image
        try:
            sample.image_bytes = image_path.read_bytes()
        except FileNotFoundError:
            return sample.fail("read", f"{where}: {media} file not found: {image_path}")
        except OSError as e:
            return sample.fail("read", f"{where}: cannot read {media} {image_path}: {e.strerror or e}")
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


def read_webdataset(paths: str | Path | Iterable[str | Path], *, caption_key: str = "caption") -> Iterator[Sample]:
    """Samples of webdataset tar shards, read with ``tarfile`` in streaming mode (nothing extracted).

    Members are grouped by webdataset key (consecutive members sharing it). The image comes from
    jpg/jpeg/png/webp, the caption from ``txt`` or else ``json[caption_key]``; the json's other keys
    become ``meta``; other extensions are ignored. ``source`` is ``"<shard>:<member>"``.
    A group without image or caption is an error Sample. A missing, unreadable or truncated shard
    gives one error Sample naming the shard (and the member where reading stopped); the samples read
    before the damage are kept, and reading goes on with the next shard. A shard that ends without
    tar's end-of-archive marker (an interrupted writer, img2dataset#164; tarfile itself stops there
    silently, as it does at a garbage header) is reported the same way.
    Keys repeated across shards get the shard's name prefixed.
    """
    shards = expand_shards(paths)
    return _wds_samples(shards, caption_key)


def _wds_samples(shards: list[Path], caption_key: str) -> Iterator[Sample]:
    seen: set[str] = set()

    def unique(key: str, shard: Path) -> str:
        if key in seen:
            key = sanitize_key(f"{shard.stem}__{key}")
            if key in seen:
                key = f"{key}-{_short_hash(str(shard))}"
        seen.add(key)
        return key

    for shard in shards:
        for sample in _read_shard(shard, caption_key):
            sample.key = unique(sample.key, shard)
            yield sample


def _read_shard(shard: Path, caption_key: str, group=None) -> Iterator[Sample]:
    """One sample per member group of a webdataset tar; ``group`` builds it (default: image groups)."""
    group = group or _wds_group
    shard_key = sanitize_key(f"{shard.stem}__shard_error")
    try:
        fileobj = open(shard, "rb")
    except OSError as e:
        yield Sample(key=shard_key, source=str(shard)).fail(
            "read", f"cannot open shard {shard}: {e.strerror or e}")
        return
    with fileobj:
        group_key: str | None = None
        members: dict[str, tuple[str, bytes]] = {}  # ext -> (member name, data)
        last, reading = "(start of shard)", False
        try:
            with tarfile.open(fileobj=fileobj, mode="r|") as tf:
                for info in tf:
                    last = info.name
                    if not info.isfile():
                        continue
                    key, ext = _split_member(info.name)
                    if key != group_key:
                        if group_key is not None:
                            yield group(shard, group_key, members, caption_key)
                        group_key, members = key, {}
                    reading = True
                    f = tf.extractfile(info)
                    members[ext] = (info.name, f.read() if f is not None else b"")
                    reading = False
                end_offset = tf.offset
        except (tarfile.TarError, OSError, EOFError) as e:
            source = f"{shard}:{last}"
            where = (f"at member {last}" if reading else f"after member {last}") if group_key else "at its start"
            yield Sample(key=sanitize_key(group_key) if group_key is not None else shard_key, source=source).fail(
                "read", f"unreadable or truncated tar {shard} {where}: {e}")
            return
    if group_key is not None:
        yield group(shard, group_key, members, caption_key)
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


def _wds_group(shard: Path, key: str, members: dict[str, tuple[str, bytes]], caption_key: str) -> Sample:
    image_ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    first = members[image_ext][0] if image_ext else next(iter(members.values()))[0]
    sample = Sample(key=sanitize_key(key), source=f"{shard}:{first}")
    have = ", ".join(sorted(n for n, _ in members.values()))
    if image_ext is None:
        return sample.fail("read", f"{shard.name}: sample {key} has no image member (jpg/jpeg/png/webp; has {have})")
    sample.image_bytes = members[image_ext][1]
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
        return sample.fail("read", f"{shard.name}: sample {key} has no caption (txt, or {caption_key!r} in json; "
                                   f"has {have})")
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
