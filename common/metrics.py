"""ASR scoring: a basic English text normaliser, word/character edit counts, corpus WER and CER.

    r = wer(refs, hyps)              # WerResult: rate, substitutions, deletions, insertions, n_ref, ...
    c = cer(refs, hyps)              # the same over characters
    s, d, i = edit_distance("a b c".split(), "a x c d".split())     # (1, 0, 1)

Corpus-level rates, as every ASR paper reports them: total errors (S + D + I) over all utterances
divided by the total number of reference units, not the mean of per-utterance rates.

Empty references. An utterance whose reference is empty (after normalisation) adds no reference
units and every hypothesis unit counts as an insertion. A corpus with zero reference units raises
ValueError: its rate would be a division by zero (jiwer returns the insertion count instead).

Characters (`cer`): with ``normalize=True`` the units are the characters of the normalised text,
single spaces between words included; with ``normalize=False`` they are the characters of
``text.strip()`` with inner whitespace as written. Both match jiwer's default ``cer`` (which strips
and keeps spaces) given the same input strings. Words (`wer`) are ``text.split()``.

Alignment ties. S + D + I is the Levenshtein distance and does not depend on the alignment, but its
split into S, D and I does when several alignments are optimal ("a b" -> "b c": two substitutions,
or one deletion and one insertion). `edit_distance` breaks ties the way rapidfuzz's backtrace
(Hyyrö 2004) does, which jiwer uses, so the counts agree with jiwer's: common prefix and suffix
are matched first, then, walking back from the end, a deletion wins whenever it is optimal, then an
insertion where the cell to its left is strictly below its diagonal neighbour, else the diagonal.
On very long pairs rapidfuzz switches to Hirschberg's divide and conquer, whose split can differ
(seen at 8,000 x 8,000 characters, never up to 5,000 x 5,000); the total always agrees.

The DP keeps the full (len(ref)+1, len(hyp)+1) int32 matrix for the backtrace: fine for utterances
(a 1,000 x 1,000 character pair is 4 MB), not meant for hour-long unsegmented transcripts.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

LANGS = ("en",)

# Unified to "'" before anything else (U+00B4 must go before NFKC, which splits it into space + accent).
# U+02BC is a *letter* (Lm): left alone, "donʼt" would be one word that never matches "don't".
_APOSTROPHES = "\u2018\u2019\u201a\u201b\u02bc\u02b9\u2032\u00b4`"  # ‘ ’ ‚ ‛ ʼ ʹ ′ ´ `
_TO_APOSTROPHE = str.maketrans({c: "'" for c in _APOSTROPHES})
# Whisper's BasicTextNormalizer drops these spans: non-speech annotations ("[noise]", "<unk>", "(laughs)").
_ANNOTATION = re.compile(r"[<\[][^>\]]*[>\]]|\([^)]*\)")
_STRAY_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")  # one not between two letters/digits


class _CharMap(dict):
    """str.translate table built lazily: punctuation and symbols -> space, format characters -> ''."""

    def __missing__(self, code: int) -> str | None:
        c = chr(code)
        cat = unicodedata.category(c)
        if c == "'":
            out: str | None = c
        # P*: .,;!?-–—"«»()_ ...; S*: $%+<=>^|~ ...; a zero-width *space* does separate words
        elif cat[0] in "PS" or cat == "Cc" or c == "\u200b":
            out = " "
        elif cat == "Cf":  # zero-width joiners, soft hyphen, BOM: invisible, not separators
            out = None
        else:
            out = c
        self[code] = out
        return out


_CHAR_MAP = _CharMap()


def normalize_text(s: str, lang: str = "en") -> str:
    """Whisper-style basic English normalisation, applied to references and hypotheses alike.

    In order:
      1. apostrophe look-alikes (’ ‘ ‚ ‛ ʼ ʹ ′ ´ `) -> ', then Unicode NFKC (full-width forms, ligatures,
         non-breaking spaces, superscripts folded to their plain forms);
      2. lowercase;
      3. bracketed annotations removed with their contents: ``[...]``, ``<...>``, ``(...)``;
      4. every punctuation and symbol character except ' becomes a space: hyphens and all dashes
         ("well-known" -> "well known"), quotes, ``. , ; : ! ?``, ``$ % & + = / @ #``, ``_``; so
         "3.5" -> "3 5" and "$20" -> "20" on both sides alike; a zero-width space separates
         words, other format characters (zero-width joiners, soft hyphen, BOM) are deleted;
      5. ' is kept only between two letters/digits ("don't", "o'clock", "rock'n'roll"); elsewhere it
         becomes a space ("'quoted'" -> "quoted", "dogs'" -> "dogs", "'90s" -> "90s");
      6. whitespace collapsed to single spaces and stripped.

    Not done (each side keeps its own form, so a difference counts as an error): number words <->
    digits ("twenty one" vs "21"), contractions ("don't" vs "do not"), spelling variants
    ("colour"/"color"), abbreviations ("mr"/"mister"), removal of fillers ("um", "uh"), diacritics
    ("café" stays). Whisper's EnglishTextNormalizer does these; it is deliberately not copied here.

    Only ``lang="en"``: other languages need their own apostrophe and script rules (French elision,
    scripts written without spaces, where CER is the metric); they raise ValueError.
    """
    if lang not in LANGS:
        raise ValueError(f"normalize_text: lang {lang!r} is not supported (supported: {', '.join(LANGS)})")
    s = unicodedata.normalize("NFKC", s.translate(_TO_APOSTROPHE)).lower()
    s = _ANNOTATION.sub(" ", s).translate(_CHAR_MAP)
    s = _STRAY_APOSTROPHE.sub(" ", s)
    return " ".join(s.split())


class EditCounts(NamedTuple):
    """Edit operations turning a reference into a hypothesis; unpacks as (S, D, I)."""

    substitutions: int
    deletions: int
    insertions: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def edit_distance(ref: Sequence[Hashable], hyp: Sequence[Hashable]) -> EditCounts:
    """(substitutions, deletions, insertions) of a minimum-cost alignment of ``ref`` to ``hyp``.

    Unit-cost Levenshtein DP, O(len(ref) * len(hyp)) time and memory, over any sequences of hashable
    items (lists of words, strings as characters, token ids). Ties between optimal alignments are
    broken as rapidfuzz/jiwer do (see the module docstring), so the split into S/D/I matches jiwer.
    """
    ref, hyp = list(ref), list(hyp)
    # Matching the common prefix and suffix first is always optimal; rapidfuzz does it too, and it
    # fixes which of several equal-cost alignments is reported.
    n, m = len(ref), len(hyp)
    p = 0
    while p < min(n, m) and ref[p] == hyp[p]:
        p += 1
    q = 0
    while q < min(n, m) - p and ref[n - 1 - q] == hyp[m - 1 - q]:
        q += 1
    ref, hyp = ref[p : n - q], hyp[p : m - q]
    n, m = len(ref), len(hyp)
    if n == 0 or m == 0:
        return EditCounts(0, n, m)

    ids: dict[Hashable, int] = {}
    r = np.array([ids.setdefault(t, len(ids)) for t in ref], dtype=np.int64)
    h = np.array([ids.setdefault(t, len(ids)) for t in hyp], dtype=np.int64)
    cols = np.arange(m + 1, dtype=np.int32)
    D = np.empty((n + 1, m + 1), dtype=np.int32)  # D[i, j] = distance(ref[:i], hyp[:j])
    D[0] = cols
    row = np.empty(m + 1, dtype=np.int32)
    for i in range(1, n + 1):
        row[0] = i
        np.minimum(D[i - 1, :-1] + (h != r[i - 1]), D[i - 1, 1:] + 1, out=row[1:])  # diagonal, deletion
        # Insertions chain along the row: D[i, j] = min over k <= j of row[k] + (j - k).
        D[i] = np.minimum.accumulate(row - cols) + cols

    D = D.tolist()  # the backtrace is scalar work: Python ints beat numpy scalar indexing
    s = d = ins = 0
    i, j = n, m
    while i and j:
        if D[i][j] == D[i - 1][j] + 1:
            d += 1
            i -= 1
        elif j > 1 and D[i][j - 1] < D[i - 1][j - 1]:  # rapidfuzz: vertical delta -1 one column left
            ins += 1
            j -= 1
        else:
            s += ref[i - 1] != hyp[j - 1]
            i -= 1
            j -= 1
    return EditCounts(s, d + i, ins + j)


class UtteranceCounts(NamedTuple):
    """One reference/hypothesis pair's edit counts and lengths (in units: words or characters)."""

    substitutions: int
    deletions: int
    insertions: int
    n_ref: int
    n_hyp: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """errors / n_ref; inf for insertions against an empty reference, 0.0 for empty vs empty."""
        if self.n_ref == 0:
            return float("inf") if self.errors else 0.0
        return self.errors / self.n_ref


@dataclass(frozen=True)
class WerResult:
    """Corpus-level error rate. ``unit`` is "word" (`wer`) or "char" (`cer`); ``rate`` is WER or CER."""

    rate: float  # (S + D + I) / n_ref, over the whole corpus
    substitutions: int
    deletions: int
    insertions: int
    n_ref: int  # reference units in the corpus (> 0)
    n_hyp: int
    unit: str
    utterances: tuple[UtteranceCounts, ...]  # per pair, in input order

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def hits(self) -> int:
        return self.n_ref - self.substitutions - self.deletions

    def to_dict(self) -> dict:
        """Totals only (JSON-ready); per-utterance counts stay in ``utterances``."""
        return {"rate": self.rate, "errors": self.errors, "substitutions": self.substitutions,
                "deletions": self.deletions, "insertions": self.insertions, "hits": self.hits,
                "n_ref": self.n_ref, "n_hyp": self.n_hyp, "n_utterances": len(self.utterances),
                "unit": self.unit}


def wer(refs: Sequence[str] | str, hyps: Sequence[str] | str, normalize: bool = True,
        lang: str = "en") -> WerResult:
    """Corpus word error rate of paired ``refs``/``hyps`` (one string each = one utterance).

    Words are ``normalize_text(t, lang).split()`` (``t.split()`` when ``normalize=False``).
    Raises ValueError when the lists differ in length or are empty, or when the references hold no
    words at all.
    """
    return _score(refs, hyps, normalize, lang, "word")


def cer(refs: Sequence[str] | str, hyps: Sequence[str] | str, normalize: bool = True,
        lang: str = "en") -> WerResult:
    """Corpus character error rate; as `wer` but over characters, spaces between words included.

    Units are the characters of ``normalize_text(t, lang)`` (``t.strip()`` when ``normalize=False``,
    inner whitespace kept as written), which is what jiwer's default ``cer`` counts.
    """
    return _score(refs, hyps, normalize, lang, "char")


def _score(refs, hyps, normalize: bool, lang: str, unit: str) -> WerResult:
    name = "wer" if unit == "word" else "cer"
    refs = [refs] if isinstance(refs, str) else list(refs)
    hyps = [hyps] if isinstance(hyps, str) else list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{name}: {len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError(f"{name}: no utterances to score")
    for side, texts in (("reference", refs), ("hypothesis", hyps)):
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{name}: {side} {k} is {type(t).__name__}, not str")

    def units(t: str) -> list[str]:
        if normalize:
            t = normalize_text(t, lang)
        return t.split() if unit == "word" else list(t.strip())

    utts = []
    for ref, hyp in zip(refs, hyps):
        r, h = units(ref), units(hyp)
        utts.append(UtteranceCounts(*edit_distance(r, h), n_ref=len(r), n_hyp=len(h)))
    n_ref = sum(u.n_ref for u in utts)
    if n_ref == 0:
        after = " after normalisation" if normalize else ""
        raise ValueError(f"{name}: the references hold zero {unit}s{after} ({len(utts)} utterances, all "
                         f"empty); an error rate over zero reference {unit}s is undefined")
    s, d, i = (sum(u[k] for u in utts) for k in range(3))
    return WerResult(rate=(s + d + i) / n_ref, substitutions=s, deletions=d, insertions=i, n_ref=n_ref,
                     n_hyp=sum(u.n_hyp for u in utts), unit=unit, utterances=tuple(utts))
