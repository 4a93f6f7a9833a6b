"""N-gram resampling of image-text pairs (Llama 3 sec. 7.1, after MetaCLIP).

    python -m scripts.resample CAPTIONS --t 20000 [--vocab FILE|default] [--prob sqrt|linear]
        [--keep-unmatched] [--seed 0] [--out keep.npy] [--caption-key caption] [--json]

CAPTIONS is a text file with one caption per line, a JSONL file (``.jsonl``/``.ndjson``/``.json``,
one object per line) or a parquet file (``.parquet``/``.pq``); the last two take the caption from
``--caption-key``. Entry frequencies are counted over this file. Writes the keep mask, a (N,) bool
.npy aligned with the input rows (default: CAPTIONS + ".keep.npy"), and prints a summary: counts,
keep rate and the most frequent entries' caption counts before and after resampling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from common.jsonl import parse_object
from data_curation.ngram_match import NgramMatcher, Vocabulary, VocabularyError
from data_curation.resample import PROBS, build_report, document_frequencies, resample


class CaptionFileError(ValueError):
    """The captions file is missing, unreadable, malformed or empty."""


def read_captions(path: str | Path, caption_key: str = "caption") -> list[str]:
    """Captions in file order; a null caption reads as "" (it matches nothing)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        captions = _read_parquet(path, caption_key)
    else:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise CaptionFileError(f"captions file {path} is not UTF-8 (byte offset {e.start})") from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline ends the last line; it does not start a new one
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        jsonl = suffix in (".jsonl", ".ndjson", ".json")
        captions = _parse_jsonl(path, lines, caption_key) if jsonl else lines
    if not captions:
        raise CaptionFileError(f"captions file {path} has no captions")
    return captions


def _parse_jsonl(path: Path, lines: list[str], key: str) -> list[str]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = parse_object(line, f"{path}:{n}", CaptionFileError)
        if key not in row:
            raise CaptionFileError(f"{path}:{n}: expected an object with key {key!r}")
        value = row[key]
        if value is not None and not isinstance(value, str):
            raise CaptionFileError(f"{path}:{n}: {key!r} is {type(value).__name__}, not a string")
        out.append(value or "")
    return out


def _read_parquet(path: Path, key: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if key not in schema.names:
            raise CaptionFileError(f"{path}: no column {key!r} (columns: {', '.join(schema.names)})")
        column = pq.read_table(path, columns=[key]).column(key)
    except (pa.ArrowException, OSError) as e:
        raise CaptionFileError(f"{path}: cannot read parquet ({e})") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CaptionFileError(f"{path}: column {key!r} has type {column.type}, not string")
    return [c or "" for c in column.to_pylist()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("captions")
    p.add_argument("--t", type=float, required=True, help="frequency threshold t (MetaCLIP: 20k for 400M)")
    p.add_argument("--vocab", default="default",
                   help="vocabulary file (one entry per line, or a .json list), or 'default' (wordfreq)")
    p.add_argument("--prob", default="sqrt", choices=PROBS, help="sqrt(t/f) (Llama 3) or t/f (MetaCLIP)")
    p.add_argument("--keep-unmatched", action="store_true", help="keep captions that match no entry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="keep mask .npy (default: CAPTIONS.keep.npy)")
    p.add_argument("--caption-key", default="caption", help="JSONL key / parquet column of the caption")
    p.add_argument("--top", type=int, default=20, help="entries listed in the summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    if not args.t > 0 or not np.isfinite(args.t):
        p.error(f"--t must be a positive number, got {args.t}")

    try:
        captions = read_captions(args.captions, args.caption_key)
        vocab = Vocabulary.default() if args.vocab == "default" else Vocabulary.from_file(args.vocab)
    except (CaptionFileError, VocabularyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    matches = NgramMatcher(vocab).match_batch(captions)
    freqs = document_frequencies(matches, len(vocab))
    keep = resample(matches, freqs, args.t, prob=args.prob, keep_unmatched=args.keep_unmatched,
                    seed=args.seed)
    report = build_report(matches, keep, t=args.t, n_entries=len(vocab), prob=args.prob, seed=args.seed)

    out = Path(args.out) if args.out else Path(str(args.captions) + ".keep.npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:  # written whole, then renamed: a reader never sees half a mask
        np.save(f, keep)
    os.replace(tmp, out)

    summary = {"captions": str(args.captions), "vocab": args.vocab, "n_entries": len(vocab),
               "keep_unmatched": args.keep_unmatched, **report.to_dict(vocab, top_k=args.top),
               "out": str(out)}
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.captions}: kept {report.kept} of {report.n} captions ({report.keep_rate:.1%}), "
          f"t={args.t:g}, p={args.prob}, seed {args.seed}")
    print(f"  {report.n - report.unmatched} matched ({summary['entries_matched']} of {len(vocab)} entries, "
          f"{summary['head_entries']} with f >= t, tail fraction {report.tail_fraction:.3f}); "
          f"{report.unmatched} unmatched, {report.kept_unmatched} of them kept")
    for row in summary["top_entries"]:
        print(f"  {row['entry']!r:30s} {row['before']:>10d} -> {row['after']:d}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
