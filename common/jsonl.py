"""JSON Lines read the one way every entry point reports them: each problem names ``file:line``.

A caller passes its own exception class, so a questions file fails with the demo's error, an answer key with the
scorer's, and so on; the messages have one shape everywhere:

    for n, row in read_jsonl(path, ScoreError, what="answer key"):
        ...  # row is a dict; blank lines are skipped, line numbers are 1-based
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_text(path: str | Path, error: type[Exception], what: str = "file") -> str:
    """The file as text (UTF-8, a BOM dropped); a missing, unreadable or non-UTF-8 file raises ``error``."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 (byte offset {e.start})") from None


def parse_object(line: str, where: str, error: type[Exception]) -> dict:
    """One JSON object; anything else raises ``error`` starting with ``where`` (e.g. ``"f.jsonl:3"``)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(path: str | Path, error: type[Exception], what: str = "file") -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``path``."""
    text = read_text(path, error, what)
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield n, parse_object(line, f"{path}:{n}", error)
