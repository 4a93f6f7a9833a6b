"""The one record every curation stage reads and annotates: an image-text sample (or a conversation record with
any number of images) and its fate.

Readers yield a ``Sample`` for **every** input they see, including broken ones (``status="error"``
with a reason), so a job's counts always add up to its inputs. Stages never raise on one bad sample:
they call ``drop`` / ``fail`` and the shard builder writes the status and reason to the per-shard
parquet. ``fields`` collects what stages attach (CLIP score, OCR text, language, dedup component, ...)
and ends up in the sample's ``key.json``.

Every str a Sample holds must encode as UTF-8, or the parquet / tar writers fail the whole shard. Names
are escaped on the way in (``escape_text``: a file named with the byte 0xe9, which Python holds as the
surrogate ``\\udce9``, becomes the four characters ``\\xe9``); text fields (caption, meta) are never
escaped behind the reader's back: ``bad_text_field`` finds the offending field so the reader can turn the
sample into an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK, DROPPED, ERROR = "ok", "dropped", "error"
STATUSES = (OK, DROPPED, ERROR)


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode / tarfile's surrogateescape hold it
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate (JSON "\ud800"): no byte sequence encodes it
        return f"\\u{code:04x}"
    return ch


def _encodes(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def escape_text(text: str) -> str:
    """``text`` with every surrogate (undecodable byte or lone surrogate) written as a backslash escape,
    so that it encodes as UTF-8; text that already does is returned unchanged."""
    return text if _encodes(text) else "".join(_escape_char(ch) for ch in text)


def bad_text_field(value: Any, path: str = "") -> str | None:
    """The first place in ``value`` (str, or dicts and lists of them, keys included) holding a str that
    does not encode as UTF-8 (a lone surrogate), as a path like ``tags[2]`` or ``meta.title``; else None.
    Names in the path are escaped (``escape_text``) so the path itself is safe to report."""
    if isinstance(value, str):
        return None if _encodes(value) else (path or "(value)")
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{escape_text(str(k))}" if path else escape_text(str(k))
            if isinstance(k, str) and not _encodes(k):
                return f"{here} (the name)"
            found = bad_text_field(v, here)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = bad_text_field(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


@dataclass
class Sample:
    key: str  # unique within a job and stable across reruns (resume relies on it)
    source: str  # where it came from: a file path, "manifest.jsonl:LINE", "shard.tar:member"
    image_bytes: bytes | None = None
    caption: str | None = None  # None for a conversation record (its text is meta["conversations"])
    # A conversation record's images in order, possibly none (``llava_reader``); None for a caption sample,
    # whose one image (or video, audio) is image_bytes.
    images: list[bytes] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields from a sidecar JSON / manifest row
    fields: dict[str, Any] = field(default_factory=dict)  # what stages attach
    status: str = OK
    stage: str | None = None  # the stage that dropped it or found the error
    reason: str | None = None

    def __post_init__(self) -> None:
        # names come from the file system and tar headers, which may hold any bytes
        self.key, self.source = escape_text(self.key), escape_text(self.source)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def is_conversation(self) -> bool:
        return self.images is not None

    def drop(self, stage: str, reason: str) -> "Sample":
        """A filter decided against it (e.g. caption too short)."""
        self.status, self.stage, self.reason = DROPPED, stage, escape_text(reason)
        return self

    def fail(self, stage: str, reason: str) -> "Sample":
        """Bad input (corrupt image, undecodable caption, unreadable tar member, ...)."""
        self.status, self.stage, self.reason = ERROR, stage, escape_text(reason)
        return self

    def status_row(self) -> dict[str, Any]:
        """The per-sample row of the shard's parquet."""
        return {"key": self.key, "source": self.source, "status": self.status, "stage": self.stage,
                "reason": self.reason}
