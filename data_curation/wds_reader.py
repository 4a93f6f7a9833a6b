"""Webdataset tar shards -> one ``Sample`` per group of members sharing a key (``read_webdataset``).

Shard specs are brace patterns and globs (`media.tar.expand_shards`); shards are streamed with ``tarfile`` (nothing
extracted). Links, devices, FIFOs, oversized members and unresolved hard links are error Samples with
``input_files``' named reasons; a shard cut short or without tar's end-of-archive marker is one error Sample
(`media.tar.has_tar_end_marker`, which the training streams use too).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

from data_curation.input_files import (DEFAULT_MAX_SAMPLE_BYTES, HARD_LINK_UNRESOLVED, NOT_REGULAR,
                                       CurationInputError, SampleReadError, _parse_caption_json, _short_hash,
                                       _text_noun, _too_large, open_regular, sanitize_key)
from data_curation.records import Sample
from media.tar import expand_shards, has_tar_end_marker

# the order is the preference when a tar group has several
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


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
    (``HARD_LINK_UNRESOLVED``). A shard that does not exist raises ``CurationInputError`` before anything is
    read (`media.tar.expand_shards`); an unreadable or truncated one gives one error Sample naming
    the shard (and the member where reading stopped); the samples read before the damage are kept, and
    reading goes on with the next shard. A shard that ends without tar's end-of-archive marker (an
    interrupted writer, img2dataset#164; tarfile itself stops there silently, as it does at a garbage
    header) is reported the same way. Keys repeated across shards get the shard's name prefixed.
    """
    shards = expand_shards(paths, CurationInputError)
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
        text, err = _member_text(shard, members["json"])
        if err is None:
            caption, sample.meta, err = _parse_caption_json(text, f"{shard.name}:{members['json'][0]}", caption_key)
        if err is not None:
            return sample.fail("read", err)
    if "txt" in members:
        caption, err = _member_text(shard, members["txt"])
        if err is not None:
            return sample.fail("read", err)
    if caption is None:
        return sample.fail("read", f"{shard.name}: a sample has no {_text_noun(media)} (key {key}; txt, or "
                                   f"{caption_key!r} in json; has {have})")
    sample.caption = caption.strip()
    return sample


def _member_text(shard: Path, member: tuple[str, bytes]) -> tuple[str | None, str | None]:
    """(text, None) of a UTF-8 member (a BOM dropped), or (None, reason naming shard and member)."""
    name, data = member
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return None, f"{shard.name}:{name} is not valid UTF-8 (byte offset {e.start})"
