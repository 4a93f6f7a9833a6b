"""Throughput of n-gram matching for resampling, on one core, checked against brute force.

    python -m data_curation.bench_ngram [N_CAPTIONS] [N_VOCAB]     # prints the JSON result

The vocabulary is ``Vocabulary.default()`` (wordfreq, about 317k entries) topped up to ``n_vocab``
with synthetic bigrams of frequent words, so the matcher is as large as MetaCLIP's 500k metadata.
Captions are alt-text-like: 5-20 words drawn from wordfreq's English frequency distribution, a
capital first letter, some commas and full stops, a curly apostrophe now and then (non-ASCII), and
in 30% of them one of the vocabulary's bigrams.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from data_curation.ngram_match import Matches, NgramMatcher, Vocabulary, brute_force_match
from data_curation.resample import document_frequencies, resample


def benchmark_vocabulary(n_vocab: int = 500_000, seed: int = 0) -> tuple[Vocabulary, list[str]]:
    """The default vocabulary plus synthetic bigrams of its 20k most frequent words up to ``n_vocab``
    entries; returns the vocabulary and the added bigrams."""
    base = Vocabulary.default()
    entries = list(base.entries[:n_vocab])
    words = [e for e in entries[:25_000] if " " not in e][:20_000]
    rng = np.random.default_rng(seed)
    seen, bigrams = set(entries), []
    while len(entries) < n_vocab:
        need = n_vocab - len(entries)
        pairs = rng.integers(0, len(words), size=(2 * need + 16, 2))
        for a, b in pairs.tolist():
            g = f"{words[a]} {words[b]}"
            if a != b and g not in seen:
                seen.add(g)
                bigrams.append(g)
                entries.append(g)
                if len(entries) == n_vocab:
                    break
    return Vocabulary(entries), bigrams


def synthetic_captions(n: int, bigrams: list[str], seed: int = 0) -> list[str]:
    """``n`` alt-text-like captions (see the module docstring)."""
    import wordfreq

    freq = wordfreq.get_frequency_dict("en")
    words = list(freq)
    p = np.fromiter(freq.values(), np.float64, len(words))
    rng = np.random.default_rng(seed)
    lens = rng.integers(5, 21, size=n)
    drawn = rng.choice(len(words), size=int(lens.sum()), p=p / p.sum()).tolist()
    with_bigram = rng.random(n) < 0.3
    pick = rng.integers(0, max(len(bigrams), 1), size=n).tolist()
    u = rng.random((n, 4)).tolist()
    out, at = [], 0
    for i, k in enumerate(lens.tolist()):
        ws = [words[j] for j in drawn[at:at + k]]
        at += k
        u_at, u_comma, u_quote, u_stop = u[i]
        if with_bigram[i] and bigrams:  # the bigram takes two words' places: still 5-20 words
            at_ = int(u_at * (len(ws) - 1))
            ws[at_:at_ + 2] = [bigrams[pick[i]]]
        if u_comma < 0.2:
            ws[int(u_comma * 5 * (len(ws) - 1))] += ","
        if u_quote < 0.03:
            ws[-1] += "\u2019s"
        text = " ".join(ws)
        out.append(text[:1].upper() + text[1:] + ("." if u_stop < 0.5 else ""))
    return out


def _timed(fn, reps: int) -> tuple[float, float, object]:
    """Best CPU and wall seconds over ``reps`` runs, and the last result."""
    cpu, wall, res = [], [], None
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        res = fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return min(cpu), min(wall), res


def run_ngram_benchmark(n_captions: int = 200_000, n_vocab: int = 500_000, seed: int = 0, reps: int = 3,
                        n_check: int = 2000) -> dict:
    """Captions/s of ``NgramMatcher`` on one core (best of ``reps``, CPU time) for both backends,
    and whether ``n_check`` sampled captions match ``brute_force_match`` exactly."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:  # one core: numpy here is single-threaded, pinning also keeps caches warm
        os.sched_setaffinity(0, {min(affinity)})
    try:
        t0 = time.perf_counter()
        vocab, bigrams = benchmark_vocabulary(n_vocab, seed)
        captions = synthetic_captions(n_captions, bigrams, seed)
        t1 = time.perf_counter()
        matcher = NgramMatcher(vocab)
        t2 = time.perf_counter()
        automaton = NgramMatcher(vocab, backend="ahocorasick")
        t3 = time.perf_counter()

        cpu, wall, matches = _timed(lambda: matcher.match_batch(captions), reps)
        cpu_lists, _, _ = _timed(lambda: matcher.match_many(captions), reps)
        cpu_ac, wall_ac, matches_ac = _timed(lambda: automaton.match_batch(captions), 1)
        freqs = document_frequencies(matches, len(vocab))
        t = max(1.0, n_captions / 100)
        cpu_rs, _, keep = _timed(lambda: resample(matches, freqs, t=t), reps)
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)

    rng = np.random.default_rng(seed + 1)
    sample = rng.choice(n_captions, size=min(n_check, n_captions), replace=False)
    assert isinstance(matches, Matches) and isinstance(matches_ac, Matches)
    mismatches = sum(matches[i] != brute_force_match(captions[i], vocab) for i in sample.tolist())
    return {
        "n_captions": n_captions,
        "n_vocab": len(vocab),
        "n_vocab_wordfreq": len(vocab) - len(bigrams),
        "n_vocab_synthetic_bigrams": len(bigrams),
        "words_per_caption": round(float(np.mean([c.count(" ") + 1 for c in captions])), 2),
        "non_ascii_captions": round(float(np.mean([not c.isascii() for c in captions])), 4),
        "matches_per_caption": round(len(matches.ids) / n_captions, 2),
        "captions_per_s_per_core": round(n_captions / cpu),
        "captions_per_s_wall": round(n_captions / wall),
        "captions_per_s_per_core_lists": round(n_captions / cpu_lists),
        "ahocorasick_captions_per_s_per_core": round(n_captions / cpu_ac),
        "resample_captions_per_s_per_core": round(n_captions / cpu_rs),
        "goal_captions_per_s_per_core": 150_000,
        "meets_goal": n_captions / cpu >= 150_000,
        "backends_identical": bool(np.array_equal(matches.indptr, matches_ac.indptr)
                                   and np.array_equal(matches.ids, matches_ac.ids)),
        "identical_to_brute_force": mismatches == 0,
        "brute_force_checked": len(sample),
        "mismatches": int(mismatches),
        "resample_t": t,
        "resample_keep_rate": round(float(np.mean(keep)), 4),
        "build_s": {"data": round(t1 - t0, 2), "tokens_matcher": round(t2 - t1, 2),
                    "ahocorasick_matcher": round(t3 - t2, 2)},
        "reps": reps,
        "timing": "best of reps, process CPU time, pinned to one core",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                    "python": platform.python_version(), "numpy": np.__version__},
    }


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(run_ngram_benchmark(*args), indent=2))
