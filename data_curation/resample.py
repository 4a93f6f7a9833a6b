"""N-gram resampling of image-text pairs (Llama 3 sec. 7.1, after MetaCLIP, Xu et al. 2023).

Count, for every entry of an n-gram vocabulary, the number of captions that contain it (f_i, a
document frequency: a caption counts once per entry). Keep a pair if any of its entries has
f_i < t; otherwise sample each of its entries independently with p_i = sqrt(t / f_i) and keep the
pair if any was sampled (``prob="linear"`` gives MetaCLIP's t / f_i). Tail entries are kept whole
and head entries are thinned, which favours rare concepts and fine-grained recognition. Matching
(what "contains" means) is ``data_curation.ngram_match``.

Pipeline::

    vocab = Vocabulary.default()                       # or Vocabulary.from_file("metadata.txt")
    matches = NgramMatcher(vocab).match_batch(captions)
    freqs = document_frequencies(matches, len(vocab))  # sum these over shards for a sharded job
    freqs, matches = distributed_document_frequencies(captions, vocab)  # the same, as Ray tasks
    keep = resample(matches, freqs, t=20_000, seed=0)
    report = build_report(matches, keep, t=20_000, n_entries=len(vocab))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from data_curation.ngram_match import Matches, NgramMatcher, Vocabulary, as_matches


# ---------------------------------------------------------------------------------------------
# Frequencies and the resampling rule

PROBS = ("sqrt", "linear")


def document_frequencies(matches: Matches | Sequence[Sequence[int]], n_entries: int) -> np.ndarray:
    """(n_entries,) int64: f_i = number of captions containing entry i."""
    m = as_matches(matches)
    if len(m.ids) and m.ids.max() >= n_entries:
        raise ValueError(f"entry id {int(m.ids.max())} out of range for {n_entries} entries")
    return np.bincount(m.ids, minlength=n_entries).astype(np.int64)


_MATCHERS: dict[tuple[str, str], NgramMatcher] = {}  # this worker process's matchers (``_match_task``)
_KEEP_MATCHERS = 2


def _match_task(captions: list[str], vocab_ref: list, key: tuple[str, str]) -> tuple[Matches, np.ndarray]:
    """Ray task: one batch's matches and its document frequencies. The matcher is built once per worker
    process and vocabulary (``key`` = (vocabulary digest, backend)); ``vocab_ref`` is ``[ObjectRef]``, in a
    list so that the vocabulary is fetched only when a worker has no matcher for it yet."""
    matcher = _MATCHERS.pop(key, None)
    if matcher is None:
        import ray

        matcher = NgramMatcher(ray.get(vocab_ref[0]), backend=key[1])
    _MATCHERS[key] = matcher  # most recent last
    while len(_MATCHERS) > _KEEP_MATCHERS:
        _MATCHERS.pop(next(iter(_MATCHERS)))
    m = matcher.match_batch(captions)
    return m, document_frequencies(m, matcher.n_entries)


def distributed_document_frequencies(captions: Sequence[str], vocab: Vocabulary, *, backend: str = "tokens",
                                     batch_size: int = 20_000, address: str | None = None,
                                     workers: int = 2) -> tuple[np.ndarray, Matches]:
    """``document_frequencies`` of ``captions`` as a Ray aggregate (``engine.connect(address, workers)``): the
    captions in batches of ``batch_size``, each matched in a task (the matcher built once per worker
    process), the per-batch counts summed here. -> ((n_entries,) int64 frequencies, every caption's matches
    in order); both identical to ``NgramMatcher(vocab, backend)`` in one process."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    freqs = np.zeros(len(vocab), np.int64)
    if not len(captions):
        return freqs, Matches.concat([])
    import ray

    from data_curation.engine import connect

    connect(address, workers)
    key = (hashlib.sha1("\n".join(vocab.entries).encode()).hexdigest(), backend)
    vocab_ref = [ray.put(vocab)]
    task = ray.remote(num_cpus=1, max_retries=0)(_match_task)
    refs = [task.remote(list(captions[s:s + batch_size]), vocab_ref, key)
            for s in range(0, len(captions), batch_size)]
    parts = []
    for m, counts in ray.get(refs):
        parts.append(m)
        freqs += counts
    return freqs, Matches.concat(parts)


def entry_probabilities(freqs: np.ndarray, t: float, prob: str = "sqrt") -> np.ndarray:
    """p_i per entry: 1 where f_i < t (tail, always kept), else sqrt(t / f_i) or t / f_i."""
    if prob not in PROBS:
        raise ValueError(f"unknown prob {prob!r}: use one of {PROBS}")
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"threshold t must be positive and finite, got {t}")
    f = np.asarray(freqs, np.float64)
    ratio = np.divide(t, f, out=np.full(f.shape, np.inf), where=f > 0)
    p = np.sqrt(ratio) if prob == "sqrt" else ratio
    return np.where(f < t, 1.0, np.minimum(p, 1.0))


def keep_probability(match: Sequence[int], freqs: np.ndarray, t: float, prob: str = "sqrt",
                     keep_unmatched: bool = False) -> float:
    """Probability that ``resample`` keeps a caption with entries ``match``: 1 - prod(1 - p_i)."""
    if not len(match):
        return 1.0 if keep_unmatched else 0.0
    p = entry_probabilities(np.asarray(freqs)[np.unique(np.asarray(match, np.int64))], t, prob)
    return float(1.0 - np.prod(1.0 - p))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, caption: np.ndarray, entry: np.ndarray) -> np.ndarray:
    """One U[0, 1) draw per (caption index, entry id): a counter-based hash (splitmix64) of
    (seed, caption, entry). The draws do not depend on batch boundaries, worker count or the order
    of a caption's ids, so a sharded job reproduces a single-process run exactly."""
    s = _splitmix64(np.array([seed & (2**64 - 1)], np.uint64))
    h = _splitmix64(s ^ np.asarray(caption, np.int64).astype(np.uint64))
    h = _splitmix64(h ^ np.asarray(entry, np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def resample(matches: Matches | Sequence[Sequence[int]], freqs: np.ndarray, t: float, prob: str = "sqrt",
             keep_unmatched: bool = False, seed: int = 0, start_index: int = 0) -> np.ndarray:
    """(N,) bool keep mask (Llama 3 sec. 7.1).

    A caption is kept if any of its entries has f_i < t; otherwise each entry is sampled with p_i
    (``entry_probabilities``) and the caption is kept if any entry is sampled. Captions with no
    entry are kept iff ``keep_unmatched`` (MetaCLIP drops them; the paper does not say).
    ``freqs`` are the document frequencies (over the whole dataset for a sharded job) and
    ``start_index`` is the global index of this slice's first caption, which with ``seed`` fixes
    every draw (see ``uniforms``).
    """
    m = as_matches(matches)
    freqs = np.asarray(freqs)
    if len(m.ids) and m.ids.max() >= len(freqs):
        raise ValueError(f"entry id {int(m.ids.max())} has no frequency (len(freqs) = {len(freqs)})")
    p = entry_probabilities(freqs, t, prob)[m.ids]
    cap = m.caption_index()
    sampled = uniforms(seed, cap + start_index, m.ids) < p
    keep = np.bincount(cap[sampled], minlength=len(m)) > 0
    keep[np.diff(m.indptr) == 0] = keep_unmatched
    return keep


def tail_fraction(freqs: np.ndarray, t: float) -> float:
    """Share of all matches that fall on tail entries (f_i < t): MetaCLIP's t -> p, used to pick t."""
    f = np.asarray(freqs, np.float64)
    total = f.sum()
    return float(f[f < t].sum() / total) if total else 0.0


@dataclass
class ResampleReport:
    """Counts for the shard builder's report; ``freq_before`` / ``freq_after`` (n_entries,) are
    the entry frequencies over all captions and over the kept ones (plot them sorted, log-log)."""

    n: int
    kept: int
    unmatched: int
    kept_unmatched: int
    t: float
    prob: str
    seed: int
    tail_fraction: float
    freq_before: np.ndarray
    freq_after: np.ndarray

    @property
    def keep_rate(self) -> float:
        return self.kept / self.n if self.n else 0.0

    def to_dict(self, vocab: Vocabulary | None = None, top_k: int = 20) -> dict[str, Any]:
        """JSON-able summary with the ``top_k`` most frequent entries before and after."""
        top = np.argsort(-self.freq_before, kind="stable")[:top_k]
        return {
            "n": self.n, "kept": self.kept, "keep_rate": round(self.keep_rate, 6),
            "matched": self.n - self.unmatched, "unmatched": self.unmatched,
            "kept_unmatched": self.kept_unmatched, "t": self.t, "prob": self.prob, "seed": self.seed,
            "tail_fraction": round(self.tail_fraction, 6),
            "entries_matched": int((self.freq_before > 0).sum()),
            "head_entries": int((self.freq_before >= self.t).sum()),
            "top_entries": [{"id": int(i), "entry": vocab[i] if vocab is not None else None,
                             "before": int(self.freq_before[i]), "after": int(self.freq_after[i])}
                            for i in top if self.freq_before[i] > 0],
        }


def build_report(matches: Matches | Sequence[Sequence[int]], keep: np.ndarray, *, t: float, n_entries: int,
                 prob: str = "sqrt", seed: int = 0) -> ResampleReport:
    """Counts and per-entry frequencies before / after for a keep mask from ``resample``."""
    m = as_matches(matches)
    keep = np.asarray(keep, bool)
    if len(keep) != len(m):
        raise ValueError(f"keep mask has {len(keep)} rows for {len(m)} captions")
    unmatched = np.diff(m.indptr) == 0
    before = document_frequencies(m, n_entries)
    return ResampleReport(
        n=len(m), kept=int(keep.sum()), unmatched=int(unmatched.sum()),
        kept_unmatched=int((keep & unmatched).sum()), t=t, prob=prob, seed=seed,
        tail_fraction=tail_fraction(before, t), freq_before=before,
        freq_after=np.bincount(m.ids[keep[m.caption_index()]], minlength=n_entries).astype(np.int64))
