"""Score ASR hypotheses against references: corpus WER and CER, S/D/I counts, the worst utterances.

    python -m scripts.eval_asr --refs REFS --hyps HYPS [--json] [--no-normalize] [--show N]

REFS and HYPS each hold one transcript per utterance, as TSV (``key<TAB>text``, one per line; an
empty transcript is ``key<TAB>``; the text is everything after the first tab) or, for files named
``*.jsonl``/``*.ndjson``/``*.json``, JSONL (``{"key": ..., "text": ...}`` per line; a null text is
empty). Blank lines are skipped; files are UTF-8. Both files must hold exactly the same keys, each
once; utterances are scored in REFS order. Text is normalised with `common.metrics.normalize_text`
unless ``--no-normalize``. Errors (unreadable or malformed file, duplicate or mismatched keys, no
reference words) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.jsonl import parse_object
from common.metrics import WerResult, cer, normalize_text, wer

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
KEYS_SHOWN = 5  # keys named in a mismatch message


class TranscriptFileError(ValueError):
    """A transcript file is missing, unreadable or malformed, or its keys do not match the other's."""


def read_transcripts(path: str | Path) -> dict[str, str]:
    """{key: text} in file order; TSV or JSONL by suffix (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TranscriptFileError(f"transcript file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TranscriptFileError(f"{path} is not UTF-8 (byte offset {e.start})") from None
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        key, value = _parse_jsonl_line(path, n, line) if jsonl else _parse_tsv_line(path, n, line)
        if key in out:
            raise TranscriptFileError(f"{path}:{n}: duplicate key {key!r} (first on line {first_line[key]})")
        out[key], first_line[key] = value, n
    if not out:
        raise TranscriptFileError(f"{path} has no transcripts")
    return out


def _parse_tsv_line(path: Path, n: int, line: str) -> tuple[str, str]:
    key, tab, value = line.partition("\t")
    if not tab:  # refuse rather than guess: Kaldi "key word word" files would silently read as empty
        raise TranscriptFileError(f"{path}:{n}: no tab; expected key<TAB>text "
                                  f"(JSONL files need a .jsonl name)")
    if not key.strip():
        raise TranscriptFileError(f"{path}:{n}: empty key")
    return key.strip(), value


def _parse_jsonl_line(path: Path, n: int, line: str) -> tuple[str, str]:
    row = parse_object(line, f"{path}:{n}", TranscriptFileError)
    if "key" not in row or "text" not in row:
        raise TranscriptFileError(f"{path}:{n}: expected an object with keys 'key' and 'text'")
    key, value = row["key"], row["text"]
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)  # numeric ids are common in JSON exports; TSV keys are strings
    if not isinstance(key, str) or not key.strip():
        raise TranscriptFileError(f"{path}:{n}: 'key' must be a non-empty string, got {key!r}")
    if value is not None and not isinstance(value, str):
        raise TranscriptFileError(f"{path}:{n}: 'text' is {type(value).__name__}, not a string")
    return key.strip(), value or ""


def check_keys(refs: dict[str, str], hyps: dict[str, str], refs_path, hyps_path) -> None:
    """Raise TranscriptFileError naming both files and a few keys when the key sets differ."""
    missing = [k for k in refs if k not in hyps]
    extra = [k for k in hyps if k not in refs]
    if not missing and not extra:
        return

    def some(keys: list[str]) -> str:
        more = f", ... ({len(keys) - KEYS_SHOWN} more)" if len(keys) > KEYS_SHOWN else ""
        return ", ".join(map(repr, keys[:KEYS_SHOWN])) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) of {refs_path} missing from {hyps_path}: {some(missing)}")
    if extra:
        parts.append(f"{len(extra)} key(s) of {hyps_path} not in {refs_path}: {some(extra)}")
    raise TranscriptFileError("keys differ: " + "; ".join(parts))


def worst_utterances(keys: list[str], refs: list[str], hyps: list[str], words: WerResult, chars: WerResult,
                     n: int, normalize: bool) -> list[dict]:
    """The n utterances with the most word errors (ties: higher WER first, then file order)."""
    utts = words.utterances
    order = sorted(range(len(keys)), key=lambda k: (-utts[k].errors, -utts[k].rate, k))
    out = []
    for k in order[:n]:
        w, c = words.utterances[k], chars.utterances[k]
        if w.errors == 0:
            break
        show = normalize_text if normalize else str.strip
        out.append({"key": keys[k], "word_errors": w.errors, "n_ref_words": w.n_ref,
                    "wer": w.rate if w.n_ref else None,  # null, not Infinity: JSON has no inf
                    "substitutions": w.substitutions, "deletions": w.deletions, "insertions": w.insertions,
                    "char_errors": c.errors, "n_ref_chars": c.n_ref,
                    "ref": show(refs[k]), "hyp": show(hyps[k])})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refs", required=True, help="reference transcripts (TSV key<TAB>text, or .jsonl)")
    p.add_argument("--hyps", required=True, help="hypothesis transcripts, same keys as --refs")
    p.add_argument("--no-normalize", action="store_true",
                   help="score the text as written (words split on whitespace)")
    p.add_argument("--show", type=int, default=10, metavar="N", help="list the N worst utterances (0: none)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.show < 0:
        p.error(f"--show must be >= 0, got {args.show}")
    normalize = not args.no_normalize

    try:
        refs = read_transcripts(args.refs)
        hyps = read_transcripts(args.hyps)
        check_keys(refs, hyps, args.refs, args.hyps)
        keys = list(refs)
        ref_texts, hyp_texts = [refs[k] for k in keys], [hyps[k] for k in keys]
        words = wer(ref_texts, hyp_texts, normalize=normalize)
        chars = cer(ref_texts, hyp_texts, normalize=normalize)
    except ValueError as e:  # TranscriptFileError, or no reference words at all
        print(f"error: {e}", file=sys.stderr)
        return 2

    worst = worst_utterances(keys, ref_texts, hyp_texts, words, chars, args.show, normalize)
    report = {"refs": str(args.refs), "hyps": str(args.hyps), "normalize": normalize,
              "n_utterances": len(keys), "wer": words.to_dict(), "cer": chars.to_dict(), "worst": worst}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0

    print(f"{args.refs} vs {args.hyps}: {len(keys)} utterances, "
          f"{'normalised (en)' if normalize else 'not normalised'}")
    for name, r in (("WER", words), ("CER", chars)):
        print(f"  {name} {r.rate:7.2%}  {r.errors} errors / {r.n_ref} reference {r.unit}s "
              f"(S {r.substitutions}, D {r.deletions}, I {r.insertions}; {r.n_hyp} hypothesis {r.unit}s)")
    if worst:
        print(f"worst {len(worst)} utterance(s) by word errors:")
        for u in worst:
            rate = "inf" if u["wer"] is None else f"{u['wer']:.1%}"
            print(f"  {u['key']}: {u['word_errors']} errors / {u['n_ref_words']} words (WER {rate}; "
                  f"S {u['substitutions']}, D {u['deletions']}, I {u['insertions']})")
            print(f"    ref: {u['ref']}")
            print(f"    hyp: {u['hyp']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
