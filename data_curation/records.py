"""The one record every curation stage reads and annotates: an image-text sample and its fate.

Readers yield a ``Sample`` for **every** input they see, including broken ones (``status="error"``
with a reason), so a job's counts always add up to its inputs. Stages never raise on one bad sample:
they call ``drop`` / ``fail`` and the shard builder writes the status and reason to the per-shard
parquet. ``fields`` collects what stages attach (CLIP score, OCR text, language, dedup component, ...)
and ends up in the sample's ``key.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK, DROPPED, ERROR = "ok", "dropped", "error"
STATUSES = (OK, DROPPED, ERROR)


@dataclass
class Sample:
    key: str  # unique within a job and stable across reruns (resume relies on it)
    source: str  # where it came from: a file path, "manifest.jsonl:LINE", "shard.tar:member"
    image_bytes: bytes | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra fields from a sidecar JSON / manifest row
    fields: dict[str, Any] = field(default_factory=dict)  # what stages attach
    status: str = OK
    stage: str | None = None  # the stage that dropped it or found the error
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def drop(self, stage: str, reason: str) -> "Sample":
        """A filter decided against it (e.g. caption too short)."""
        self.status, self.stage, self.reason = DROPPED, stage, reason
        return self

    def fail(self, stage: str, reason: str) -> "Sample":
        """Bad input (corrupt image, undecodable caption, unreadable tar member, ...)."""
        self.status, self.stage, self.reason = ERROR, stage, reason
        return self

    def status_row(self) -> dict[str, Any]:
        """The per-sample row of the shard's parquet."""
        return {"key": self.key, "source": self.source, "status": self.status, "stage": self.stage,
                "reason": self.reason}
