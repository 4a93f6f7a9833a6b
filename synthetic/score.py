"""Score predictions on a synthetic held-out set against its answer key (``answers.jsonl``).

    metrics = score("out/test/answers.jsonl", "predictions.jsonl")   # rows {"id": ..., "answer": ...}

Every kind gets exact-match accuracy after a light normalisation (case, surrounding whitespace and
punctuation, inner runs of spaces: "Left." == "left"), overall, per kind, and per expected answer within a
kind (per direction, per colour...: a model stuck on one answer shows up there). Transcript kinds (spoken
digits) also get corpus WER and CER (`common.metrics`, its English normaliser). Every answer id needs
exactly one prediction: a missing, unknown or repeated id is a `ScoreError` naming it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from common.jsonl import read_jsonl
from common.metrics import cer, wer
from synthetic.tasks import TRANSCRIPT_KIND

_SHOWN = 5  # ids named in an error message before "... and N more"


class ScoreError(ValueError):
    """An answer key or prediction file that cannot be scored; the message names the file, line or id."""


def read_rows(path: str | Path, fields: tuple[str, ...]) -> dict[str, dict]:
    """Rows of ``path`` by id; each must be an object with string ``id`` and string ``fields``."""
    path = Path(path)
    rows: dict[str, dict] = {}
    for n, row in read_jsonl(path, ScoreError):
        for key in ("id", *fields):
            if not isinstance(row.get(key), str):
                raise ScoreError(f"{path}:{n}: {key!r} is missing or not a string")
        if row["id"] in rows:
            raise ScoreError(f"{path}:{n}: id {row['id']!r} appears twice")
        rows[row["id"]] = row
    if not rows:
        raise ScoreError(f"{path}: no rows")
    return rows


def _name_ids(ids: list[str]) -> str:
    more = f" ... and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(repr(i) for i in ids[:_SHOWN]) + more


def normalize_answer(s: str) -> str:
    return " ".join(s.casefold().strip().strip(".,;:!?\"'").split())


def _accuracy(pairs: list[tuple[str, str]]) -> float:
    return sum(normalize_answer(r) == normalize_answer(h) for r, h in pairs) / len(pairs)


def _kind_metrics(kind: str, pairs: list[tuple[str, str]]) -> dict:
    out: dict = {"n": len(pairs), "accuracy": _accuracy(pairs)}
    if kind == TRANSCRIPT_KIND:
        refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
        return {**out, "wer": wer(refs, hyps).rate, "cer": cer(refs, hyps).rate}
    by_answer = defaultdict(list)
    for r, h in pairs:
        by_answer[r].append((r, h))
    per_answer = {a: {"n": len(p), "accuracy": _accuracy(p)} for a, p in sorted(by_answer.items())}
    return {**out, "by_answer": per_answer}


def score(answers_jsonl: str | Path, predictions_jsonl: str | Path) -> dict:
    """``{"n", "accuracy", "by_kind": {kind: {"n", "accuracy", "by_answer" | "wer", "cer"}}}``, plus
    top-level ``wer`` / ``cer`` over the transcript rows when there are any."""
    answers = read_rows(answers_jsonl, ("answer", "kind"))
    preds = read_rows(predictions_jsonl, ("answer",))
    unknown = [i for i in preds if i not in answers]
    if unknown:
        raise ScoreError(f"{predictions_jsonl}: ids not in {answers_jsonl}: {_name_ids(unknown)}")
    missing = [i for i in answers if i not in preds]
    if missing:
        raise ScoreError(f"{predictions_jsonl}: no prediction for ids {_name_ids(missing)}")
    by_kind = defaultdict(list)
    for i, row in answers.items():
        by_kind[row["kind"]].append((row["answer"], preds[i]["answer"]))
    every = [p for pairs in by_kind.values() for p in pairs]
    metrics = {"n": len(every), "accuracy": _accuracy(every),
               "by_kind": {k: _kind_metrics(k, pairs) for k, pairs in sorted(by_kind.items())}}
    transcripts = metrics["by_kind"].get(TRANSCRIPT_KIND)
    if transcripts is None:
        return metrics
    return {**metrics, "wer": transcripts["wer"], "cer": transcripts["cer"]}
