"""A hostile-input corpus for the shard builders' readers (and, through them, the whole jobs).

``make_hostile_corpus(root, media, layout)`` writes one dataset -- a folder, a JSONL manifest or a
webdataset tar -- holding one good sample plus every hostile case that layout can hold, and returns a
``HostileCorpus``: what to open (``spec``), how many records the reader must yield (``inputs``), the small
per-sample byte cap the oversize cases are built against (``max_sample_bytes``: pass it to the reader),
and for every case the reason the reader must give (``expected_reason``, None: read as a good sample).
``by_case`` matches records (Samples, or status rows with a ``source``) to their cases.

Media are real and tiny: a PIL PNG, a PyAV-written MPEG-4 mp4 (no ffmpeg binary), a soundfile WAV.
The reasons are ``data_curation.input_files``' named constants. ``CASES`` describes every case and its
reasons, ``LAYOUT_CASES`` says which layouts hold it. Every tar corpus also holds a directory member:
folders are not inputs and give no record.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_curation.input_files import (HARD_LINK_UNRESOLVED, LONE_SURROGATE, NOT_REGULAR, OUTSIDE_ROOT, TOO_LARGE)
from data_curation.records import escape_text

MEDIA_EXT = {"image": "png", "video": "mp4", "audio": "wav"}
# (manifest media column, caption field) the media's reader reads by default
MEDIA_KEYS = {"image": ("image", "caption"), "video": ("video", "caption"), "audio": ("audio", "text")}
MAX_SAMPLE_BYTES = 256 * 1024  # every good medium is far below it; the oversize cases are just above it
CAPTION = "A small test sample with a plain caption."

# case -> (what it is, reason with allow_outside_root False, reason with it True); None: read as good
CASES: dict[str, tuple[str, str | None, str | None]] = {
    "good": ("a good sample: tiny real media and a caption", None, None),
    "non_utf8_name": ("file (or tar member) named caf\\xe9.<ext>: bytes that are not UTF-8; read, with the byte "
                      "escaped in its source", None, None),
    "surrogate_sidecar": ("x.json sidecar / tar json member whose caption is the JSON escape \\ud800 (a lone "
                          "surrogate)", LONE_SURROGATE, LONE_SURROGATE),
    "surrogate_caption": ("JSONL row whose caption holds a lone surrogate", LONE_SURROGATE, LONE_SURROGATE),
    "surrogate_field": ("JSONL row whose extra field (a list) holds a lone surrogate", LONE_SURROGATE,
                        LONE_SURROGATE),
    "fifo": ("the media file is a FIFO (would block a plain open forever)", NOT_REGULAR, NOT_REGULAR),
    "fifo_sidecar": ("good media, but its x.txt caption is a FIFO", NOT_REGULAR, NOT_REGULAR),
    "dev_zero": ("a symlink in the folder / a manifest row naming /dev/zero (endless): outside the root, and "
                 "not a regular file when outside paths are allowed", OUTSIDE_ROOT, NOT_REGULAR),
    "oversize": ("a media file (or tar member) one byte above max_sample_bytes", TOO_LARGE, TOO_LARGE),
    "long_line": ("a JSONL line longer than max_sample_bytes", TOO_LARGE, TOO_LARGE),
    "symlink_outside": ("a symlink (folder) / a row naming a symlink (manifest) to good media outside the dataset",
                        OUTSIDE_ROOT, None),
    "folder_link": ("a symlink to a folder: links to folders are not followed", NOT_REGULAR, NOT_REGULAR),
    "parent_escape": ("manifest row media/../../outside/x: a relative path leaving the dataset", OUTSIDE_ROOT, None),
    "absolute_path": ("manifest row naming good media by an absolute path outside the dataset", OUTSIDE_ROOT, None),
    "symlink_member": ("tar symlink member (to /etc/passwd) with a caption", NOT_REGULAR, NOT_REGULAR),
    "hardlink_member": ("tar hard link to the good member, as GNU tar stores a file added twice: read as the "
                        "good member's bytes", None, None),
    "hardlink_unresolved": ("tar hard link to a member the shard does not hold", HARD_LINK_UNRESOLVED,
                            HARD_LINK_UNRESOLVED),
    "device_member": ("tar character-device member (like /dev/zero) with a caption", NOT_REGULAR, NOT_REGULAR),
    "fifo_member": ("tar FIFO member with a caption", NOT_REGULAR, NOT_REGULAR),
    "gif_member": ("tar GIF image with a caption: read like a GIF in a folder (images only)", None, None),
}
LAYOUT_CASES: dict[str, tuple[str, ...]] = {
    "folder": ("good", "non_utf8_name", "surrogate_sidecar", "fifo", "fifo_sidecar", "dev_zero", "oversize",
               "symlink_outside", "folder_link"),
    "jsonl": ("good", "surrogate_caption", "surrogate_field", "fifo", "dev_zero", "oversize", "long_line",
              "symlink_outside", "parent_escape", "absolute_path"),
    "tar": ("good", "non_utf8_name", "surrogate_sidecar", "oversize", "symlink_member", "hardlink_member",
            "hardlink_unresolved", "device_member", "fifo_member", "gif_member"),
}
IMAGE_ONLY = ("gif_member",)


def case_names(media: str, layout: str) -> tuple[str, ...]:
    """The cases ``make_hostile_corpus`` writes for ``media`` in ``layout`` (all of them by default)."""
    return tuple(c for c in LAYOUT_CASES[layout] if media == "image" or c not in IMAGE_ONLY)


# ---------------------------------------------------------------------------------------------- media


def good_media(media: str) -> bytes:
    """Tiny real media: an 8x8 PNG, a 32x32 8-frame MPEG-4 mp4 (PyAV), a 1 s 16 kHz WAV (soundfile)."""
    if media == "image":
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, "PNG")
        return buf.getvalue()
    if media == "video":
        return _tiny_mp4()
    if media == "audio":
        import soundfile as sf

        t = np.arange(16000) / 16000
        buf = io.BytesIO()
        sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
        return buf.getvalue()
    raise ValueError(f"unknown media {media!r} (expected image | video | audio)")


def _tiny_mp4() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)  # built into PyAV's own FFmpeg, unlike libx264
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(8):
            frame = np.zeros((32, 32, 3), np.uint8)
            frame[:, 4 * i:4 * i + 8] = 255  # a moving bar
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (8, 8), 3).save(buf, "GIF")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class HostileCorpus:
    spec: Path  # what the reader opens: the folder, the manifest .jsonl or the .tar shard
    media: str
    layout: str
    cases: tuple[str, ...]
    inputs: int  # the records the reader must yield: one per case
    max_sample_bytes: int  # pass to the reader: the oversize cases are one byte above it
    good_bytes: bytes  # the good sample's media (the hard link case must come out with these bytes)
    sources: dict[str, str]  # case -> how its record's ``source`` ends

    def expected_reason(self, case: str, allow_outside_root: bool = False) -> str | None:
        """The named reason the case's record must contain; None: it must be read as a good sample."""
        _, default, allowed = CASES[case]
        return allowed if allow_outside_root else default

    def case_of(self, source: str) -> str:
        """The case a record with this ``source`` belongs to (AssertionError when none or several match)."""
        found = [c for c, end in self.sources.items() if source.endswith(end)]
        assert len(found) == 1, f"source {source!r} matches cases {found} (of {sorted(self.sources)})"
        return found[0]

    def by_case(self, records: Iterable[Any]) -> dict[str, Any]:
        """Records (Samples, or dicts with a "source") by case; AssertionError when two share a case."""
        out: dict[str, Any] = {}
        for r in records:
            case = self.case_of(r["source"] if isinstance(r, dict) else r.source)
            assert case not in out, f"two records for case {case}: {out[case]} and {r}"
            out[case] = r
        return out


def make_hostile_corpus(root: Path, media: str, layout: str, cases: list[str] | None = None,
                        max_sample_bytes: int = MAX_SAMPLE_BYTES) -> HostileCorpus:
    """Write the dataset for ``media`` (image | video | audio) in ``layout`` (folder | jsonl | tar) under
    ``root`` (created): ``root/dataset/...`` plus ``root/outside/`` (good media outside the dataset, for the
    escape cases). ``cases`` (default: all of ``case_names(media, layout)``) picks some; "good" is always in."""
    valid = case_names(media, layout) if layout in LAYOUT_CASES else ()
    if not valid:
        raise ValueError(f"unknown layout {layout!r} (expected one of {sorted(LAYOUT_CASES)})")
    chosen = tuple(dict.fromkeys(["good", *(cases if cases is not None else valid)]))
    unknown = [c for c in chosen if c not in valid]
    if unknown:
        raise ValueError(f"cases {unknown} do not apply to {media} in a {layout}; these do: {list(valid)}")
    good = good_media(media)
    outside = root / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / f"secret.{MEDIA_EXT[media]}").write_bytes(good)
    writer = {"folder": _write_folder, "jsonl": _write_jsonl, "tar": _write_tar}[layout]
    spec, sources = writer(root / "dataset", outside, media, good, chosen, max_sample_bytes)
    return HostileCorpus(spec=spec, media=media, layout=layout, cases=chosen, inputs=len(chosen),
                         max_sample_bytes=max_sample_bytes, good_bytes=good, sources=sources)


def _put(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _surrogate_json(caption_key: str) -> str:
    return f'{{"{caption_key}": "caf\\ud800 lone surrogate", "title": "fine"}}'  # the escape is legal JSON


def _write_folder(d: Path, outside: Path, media: str, good: bytes, cases: tuple[str, ...],
                  cap: int) -> tuple[Path, dict[str, str]]:
    ext, caption_key = MEDIA_EXT[media], MEDIA_KEYS[media][1]
    d.mkdir(parents=True, exist_ok=True)
    sources = {}
    for case in cases:
        name = f"{case}.{ext}"
        if case == "non_utf8_name":  # written by bytes: the name is not UTF-8
            stem = os.fsdecode(b"caf\xe9")
            name = f"{stem}.{ext}"
            _put(d / name, good)
            _put(d / f"{stem}.txt", CAPTION)
        elif case == "folder_link":
            os.symlink(outside, d / case)
            name = case
        else:
            media_path = d / name
            if case == "fifo":
                os.mkfifo(media_path)
            elif case == "dev_zero":
                os.symlink("/dev/zero", media_path)
            elif case == "symlink_outside":
                os.symlink(outside / f"secret.{ext}", media_path)
            elif case == "oversize":
                _put(media_path, good + b"\0" * (cap + 1 - len(good)))
            else:
                _put(media_path, good)
            if case == "fifo_sidecar":
                os.mkfifo(d / f"{case}.txt")
            elif case == "surrogate_sidecar":
                _put(d / f"{case}.json", _surrogate_json(caption_key))
            else:
                _put(d / f"{case}.txt", CAPTION)
        sources[case] = "/" + escape_text(name)
    return d, sources


def _write_jsonl(d: Path, outside: Path, media: str, good: bytes, cases: tuple[str, ...],
                 cap: int) -> tuple[Path, dict[str, str]]:
    ext, (media_key, caption_key) = MEDIA_EXT[media], MEDIA_KEYS[media]
    media_dir = d / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    _put(media_dir / f"good.{ext}", good)
    lines, sources = [], {}
    for case in cases:
        row: dict[str, Any] = {media_key: f"media/good.{ext}", caption_key: CAPTION}
        if case == "fifo":
            os.mkfifo(media_dir / f"fifo.{ext}")
            row[media_key] = f"media/fifo.{ext}"
        elif case == "dev_zero":
            row[media_key] = "/dev/zero"
        elif case == "oversize":
            _put(media_dir / f"big.{ext}", good + b"\0" * (cap + 1 - len(good)))
            row[media_key] = f"media/big.{ext}"
        elif case == "long_line":
            row["padding"] = "x" * (cap + 1)
        elif case == "symlink_outside":
            os.symlink(outside / f"secret.{ext}", media_dir / f"link.{ext}")
            row[media_key] = f"media/link.{ext}"
        elif case == "parent_escape":
            row[media_key] = f"media/../../outside/secret.{ext}"
        elif case == "absolute_path":
            row[media_key] = str(outside / f"secret.{ext}")
        elif case == "surrogate_caption":
            row[caption_key] = "caf\ud800 lone surrogate"
        elif case == "surrogate_field":
            row["tags"] = ["fine", "\udc80"]
        # ensure_ascii (json's default) writes a lone surrogate as its legal \\ud800 escape
        lines.append(json.dumps(row))
        sources[case] = f".jsonl:{len(lines)}"
    manifest = d / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, sources


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[Any, Any]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, link, 1_700_000_000
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, io.BytesIO(data)
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 5  # /dev/zero's numbers
    return info, None


def _write_tar(d: Path, outside: Path, media: str, good: bytes, cases: tuple[str, ...],
               cap: int) -> tuple[Path, dict[str, str]]:
    ext, caption_key = MEDIA_EXT[media], MEDIA_KEYS[media][1]
    d.mkdir(parents=True, exist_ok=True)
    members = [_member("folder", kind=tarfile.DIRTYPE)]  # not an input: no record
    sources = {}
    for case in cases:
        name = f"{case}.{ext}"
        caption = _member(f"{case}.txt", CAPTION.encode())
        if case == "non_utf8_name":
            name = os.fsdecode(b"caf\xe9") + f".{ext}"
            media = _member(name, good)
            caption = _member(os.fsdecode(b"caf\xe9") + ".txt", CAPTION.encode())
        elif case == "oversize":
            media = _member(name, good + b"\0" * (cap + 1 - len(good)))
        elif case == "symlink_member":
            media = _member(name, kind=tarfile.SYMTYPE, link="/etc/passwd")
        elif case == "hardlink_member":
            media = _member(name, kind=tarfile.LNKTYPE, link=f"good.{ext}")
        elif case == "hardlink_unresolved":
            media = _member(name, kind=tarfile.LNKTYPE, link=f"nowhere.{ext}")
        elif case == "device_member":
            media = _member(name, kind=tarfile.CHRTYPE)
        elif case == "fifo_member":
            media = _member(name, kind=tarfile.FIFOTYPE)
        elif case == "gif_member":
            name = f"{case}.gif"
            media = _member(name, _gif())
        else:
            media = _member(name, good)
        if case == "surrogate_sidecar":
            caption = _member(f"{case}.json", _surrogate_json(caption_key).encode())
        members += [media, caption]
        sources[case] = ":" + escape_text(name)
    shard = d / "hostile.tar"
    # GNU format writes names as raw bytes (surrogateescape turns caf\udce9 back into b"caf\xe9")
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for info, data in members:
            tf.addfile(info, data)
    return shard, sources
