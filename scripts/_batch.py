"""Batch mode shared by the demo scripts: read a held-out questions file, answer every row, write predictions.

A questions file is JSONL, one object per line (blank lines skipped):
``{"id": str, "<media>": path, "question": str, "kind": str}`` where ``<media>`` is ``image``, ``video`` or
``audio`` and the path is relative to the questions file's folder (absolute paths are kept). ``kind`` is
optional and not used here (the scorer reads it from the answer key). Speech rows carry no question.

Predictions are JSONL ``{"id": ..., "answer": ...}`` in input order, written under a temporary name in the
output's folder and renamed at the end: a predictions file that exists is complete.

Every problem is a `BatchInputError` naming the file and line (and the row id once it is known). The whole
file is checked, down to every media file existing, before any model loads; a media file that does not
decode, or an answer that cannot fit the context, stops the run at that row and writes no predictions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from common.export import write_atomic
from common.jsonl import read_jsonl

MEDIA_KEYS = {"image": "demo_vqa", "video": "demo_video", "audio": "demo_asr"}  # row key -> the demo for it
PROGRESS_MIN_ROWS = 20  # shorter files finish before a progress bar says anything useful


class BatchInputError(ValueError):
    """A questions file, one of its rows or the media it names cannot be used. ``str(err)`` is one line."""


@dataclass(frozen=True)
class Row:
    id: str
    media: Path  # resolved: relative paths against the questions file's folder
    question: str | None  # None for speech rows
    where: str  # "FILE:LINE (id 'x')", the prefix of every message about this row


def add_batch_args(p: argparse.ArgumentParser, media_key: str) -> None:
    """``--<media>`` (one file) or ``--questions FILE.jsonl`` (batch), exactly one, plus ``--out``."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(f"--{media_key}", help=f"one {media_key} file (its answer streams to stdout)")
    src.add_argument("--questions", help=f"a JSONL file of {media_key} rows to answer (see scripts._batch)")
    p.add_argument("--out", default=None, help="with --questions: the predictions JSONL to write")


def check_batch_args(p: argparse.ArgumentParser, args: argparse.Namespace, single_only: tuple[str, ...] = ()
                     ) -> None:
    """Refuse (usage line, exit 2) ``--out`` without ``--questions``, ``--questions`` without ``--out`` or
    with a single-question flag (each row carries its own), and an ``--out`` that would replace the
    questions."""
    if args.questions is None:
        if args.out is not None:
            p.error("--out goes with --questions")
        return
    given = [flag for flag in single_only if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]
    if given:
        p.error(f"{given[0]} is per row in batch mode: not allowed with --questions")
    if args.out is None:
        p.error("--questions needs --out PREDICTIONS.jsonl")
    if Path(args.out).resolve() == Path(args.questions).resolve():
        p.error(f"--out {args.out} is the questions file")
    if Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder; name the predictions file")


def read_questions(path: str | Path, media_key: str) -> list[Row]:
    """Every row of ``path``, checked (see the module docstring); raises `BatchInputError`."""
    path = Path(path)
    rows: list[Row] = []
    first_line: dict[str, int] = {}
    for n, obj in read_jsonl(path, BatchInputError, what="questions file"):
        row = parse_row(path, n, obj, media_key)
        if row.id in first_line:
            raise BatchInputError(f"{path}:{n}: duplicate id {row.id!r} (first on line {first_line[row.id]})")
        first_line[row.id] = n
        rows.append(row)
    if not rows:
        raise BatchInputError(f"{path}: no questions")
    return rows


def parse_row(path: Path, n: int, obj: dict, media_key: str) -> Row:
    where = f"{path}:{n}"
    _check_keys(obj, where, media_key)
    row_id = obj["id"]
    if not isinstance(row_id, str) or not row_id:
        raise BatchInputError(f"{where}: 'id' must be a non-empty string, got {row_id!r}")
    where = f"{where} (id {row_id!r})"
    media = obj[media_key]
    if not isinstance(media, str) or not media:
        raise BatchInputError(f"{where}: {media_key!r} must be a non-empty path string, got {media!r}")
    resolved = path.parent / media  # an absolute ``media`` replaces the folder
    if not resolved.is_file():
        raise BatchInputError(f"{where}: {media_key} file not found: {media!r} (looked at {resolved})")
    return Row(row_id, resolved, _question(obj, where, media_key), where)


def _check_keys(obj: dict, where: str, media_key: str) -> None:
    other = sorted(k for k in MEDIA_KEYS if k != media_key and k in obj)
    if other:
        raise BatchInputError(f"{where}: a row with {other[0]!r}; scripts.{MEDIA_KEYS[media_key]} answers "
                              f"{media_key!r} rows (use scripts.{MEDIA_KEYS[other[0]]})")
    missing = [k for k in ("id", media_key) if k not in obj]
    if missing:
        raise BatchInputError(f"{where}: no {missing[0]!r} key")
    unknown = sorted(set(obj) - {"id", media_key, "question", "kind"})
    if unknown:
        raise BatchInputError(f"{where}: unknown keys {unknown} (expected id, {media_key}, question, kind)")


def _question(obj: dict, where: str, media_key: str) -> str | None:
    question = obj.get("question")
    if media_key == "audio":  # the speech model is prompted by --task alone: a question would go unread
        if question is not None:
            raise BatchInputError(f"{where}: speech rows carry no question (the task is --task asr/ast), "
                                  f"got {question!r}")
        return None
    if not isinstance(question, str) or not question.strip():
        raise BatchInputError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    return question


def write_predictions(rows: list[Row], answer: Callable[[Row], str], out: str | Path,
                      errors: tuple[type[Exception], ...], prog: str) -> int:
    """Answer every row in order and write the predictions atomically; print a summary on stderr.
    An exception of a type in ``errors`` (a media file that does not decode, an answer that cannot fit)
    is one line naming the row, exit status 2, and no predictions file. Returns the exit status."""
    out = Path(out)
    start = time.perf_counter()
    empty = 0
    lines = []
    progress = tqdm(rows, desc=prog, unit="row", file=sys.stderr, disable=len(rows) < PROGRESS_MIN_ROWS,
                    mininterval=1.0)
    try:
        for row in progress:
            text = _answer(row, answer, errors)
            empty += not text.strip()
            lines.append(json.dumps({"id": row.id, "answer": text}, ensure_ascii=False) + "\n")
        _write_predictions_file(out, "".join(lines))
    except BatchInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"{prog}: answered {len(rows)} rows ({empty} empty) in {seconds:.1f} s "
          f"({seconds / len(rows):.2f} s per row) -> {out}", file=sys.stderr)
    return 0


def _answer(row: Row, answer: Callable[[Row], str], errors: tuple[type[Exception], ...]) -> str:
    try:
        return answer(row)
    except errors as e:
        raise BatchInputError(f"{row.where}: {e}") from None


def _write_predictions_file(out: Path, text: str) -> None:
    try:
        write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise BatchInputError(f"--out {out}: cannot write the predictions ({e.strerror}: {e.filename})") from None
