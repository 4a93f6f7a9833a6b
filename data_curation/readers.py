"""Readers: raw inputs (a folder, a JSONL/parquet manifest, webdataset tars, LLaVA conversation files) -> one
``Sample`` per input.

Every input a reader sees comes out as a ``Sample``: a good image-caption pair (status ok, raw image
bytes, not decoded) or an error Sample with the reason and the file it concerns, so a job's counts add
up to its inputs (img2dataset's per-sample status, conventions rule 11). One bad file never raises;
only job-level problems do (input missing, empty folder, unknown kind, unreadable manifest):
``CurationInputError``, raised when the reader is called, not at the first ``next()``.

``open_input`` dispatches on the input's kind. The folder and manifest readers and ``decode_image``
live here, the webdataset tar reader in ``wds_reader``, the LLaVA conversation reader in ``llava_reader``,
and what they all share (safe file reading, byte caps, the dataset root, keys, the named reasons for hostile
inputs) in ``input_files``.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from data_curation.input_files import (DEFAULT_MAX_SAMPLE_BYTES, NOT_REGULAR, TOO_LARGE, CurationInputError,
                                       InputNotFound, SampleReadError, _bad_text_reason, _MiB,
                                       _parse_caption_json, _text_noun, _too_large, _unique_keys,
                                       open_regular, read_input_file, sanitize_key)
from data_curation.records import Sample
from data_curation.wds_reader import WDS_IMAGE_EXTS, read_webdataset
from media.image import DEFAULT_MAX_PIXELS, ImageLoadError, load_image_bytes
from media.tar import expand_shards, is_pattern

# the same image types in folders and tars
FOLDER_IMAGE_EXTS = frozenset(f".{e}" for e in WDS_IMAGE_EXTS)
SIDECAR_EXTS = (".txt", ".json")


# -------------------------------------------------------------------------------------------- entry


def open_input(spec: str | Path, *, image_key: str = "image", caption_key: str = "caption",
               max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES, allow_outside_root: bool = False,
               image_folder: str | Path | None = None) -> Iterator[Sample]:
    """Dispatch on what ``spec`` is: a folder, a ``.jsonl``/``.parquet`` manifest, a ``.tar`` shard, a glob /
    brace pattern of tar shards (``shards/{00000..00003}.tar``, ``shards/*.tar``), or a LLaVA conversation file:
    a ``.json`` list, or a ``.jsonl`` whose first row has a ``conversations`` field (``llava_reader``; its image
    paths start at ``image_folder``, default the file's folder). A folder's ``.json`` files are sidecars, never
    conversation files.

    ``image_key`` names the manifest's image column; ``caption_key`` the caption field of manifests,
    sidecar JSON files and webdataset JSON members. ``max_sample_bytes`` caps what one sample reads;
    ``allow_outside_root`` lets manifest rows and folder symlinks name files outside the input's folder
    (tars are read in place, so it does not concern them).
    """
    text = str(spec)
    path = Path(spec)
    if isinstance(spec, str) and not path.exists() and is_pattern(text):
        shards = expand_shards(text, CurationInputError)
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
    if suffix in (".json", ".jsonl"):
        from data_curation.llava_reader import is_conversation_jsonl, read_llava

        if suffix == ".json" or is_conversation_jsonl(path, max_sample_bytes):
            return read_llava(path, image_folder=image_folder, max_sample_bytes=max_sample_bytes,
                              allow_outside_root=allow_outside_root)
    if suffix in (".jsonl", ".parquet"):
        return read_manifest(path, image_key=image_key, caption_key=caption_key, max_sample_bytes=max_sample_bytes,
                             allow_outside_root=allow_outside_root)
    if suffix == ".tar":
        return read_webdataset([path], caption_key=caption_key, max_sample_bytes=max_sample_bytes)
    raise CurationInputError(f"unknown input kind: {path} (expected a folder, .jsonl, .parquet, .tar, a "
                             "pattern of .tar shards or a LLaVA .json)")


# ------------------------------------------------------------------------------------------- folder


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


def jsonl_objects(path: Path, lines: BinaryIO, max_bytes: int) -> Iterator[tuple[Sample, str, Any]]:
    """(sample, where, parsed line) per non-blank line of a JSONL file: the sample keyed ``<stem>_<line>`` with
    source ``"<file>:<line>"``, ``where`` naming the line for reasons; a line longer than ``max_bytes``, not UTF-8
    or not JSON comes as a failed sample (and None). Closes ``lines`` at the end."""
    stem = sanitize_key(path.stem)
    with lines:
        for lineno, raw in enumerate(_capped_lines(lines, max_bytes), start=1):
            if raw is not None and not raw.strip():
                continue
            sample = Sample(key=f"{stem}_{lineno:09d}", source=f"{path}:{lineno}")
            where = f"{path.name} line {lineno}"
            if raw is None:
                reason = f"cannot read {where}: longer than {max_bytes} bytes, {TOO_LARGE}"
                yield sample.fail("read", reason), where, None
                continue
            try:
                yield sample, where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield sample.fail("read", f"{where} is not valid UTF-8 ({e.reason} at byte {e.start})"), where, None
            except json.JSONDecodeError as e:
                yield sample.fail("read", f"{where} is not valid JSON ({e.msg} at column {e.colno})"), where, None


def _jsonl_samples(path: Path, lines: BinaryIO, rows: _Rows) -> Iterator[Sample]:
    for sample, where, row in jsonl_objects(path, lines, rows.max_bytes):
        if not sample.ok:
            yield sample
        elif not isinstance(row, dict):
            yield sample.fail("read", f"{where} is not a JSON object")
        else:
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


# ------------------------------------------------------------------------------------------- decode


def decode_image(sample: Sample, max_pixels: int = DEFAULT_MAX_PIXELS, index: int | None = None) -> Image.Image | None:
    """The sample's image (``index``: image ``index`` of a conversation record) as upright RGB, or None after
    ``sample.fail("decode", ...)``; the reason is ``media.image``'s message, which starts with the sample's
    source (file or shard:member, then ``image <index>``)."""
    data = sample.image_bytes if index is None else sample.images[index]
    name = sample.source if index is None else f"{sample.source} image {index}"
    if data is None:
        sample.fail("decode", f"{name}: no image bytes")
        return None
    try:
        return load_image_bytes(data, name=name, max_pixels=max_pixels)
    except ImageLoadError as e:
        sample.fail("decode", str(e))
        return None
