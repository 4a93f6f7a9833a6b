"""Whole-word n-gram matching of captions against a vocabulary (the matching half of MetaCLIP-style
resampling; ``data_curation.resample`` holds the frequencies and the sampling rule).

**Words.** Matching is whole-word and case-insensitive. A text's words are its maximal runs of
Unicode alphanumerics (``str.isalnum``) after NFC normalisation and ``str.lower()``; everything else
(spaces, punctuation, ``_``) separates words. An entry is a sequence of words, and it matches a
caption where the caption's words contain that sequence contiguously: "cat" does not match
"category", "new york" matches "A New-York street.", "it's" is stored and matched as "it s".
``tokenize`` is the definition; both matchers and ``brute_force_match`` implement it.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+")  # a run of str.isalnum() characters
_SMASHED_NUMBER = re.compile(r"\d\d")  # wordfreq writes every multi-digit number as zeros ("a00")


def tokenize(text: str) -> list[str]:
    """The words of ``text``: NFC, lower-cased, maximal runs of alphanumerics."""
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


def normalize(text: str) -> str:
    """``text`` in matching form: its words joined by single spaces."""
    return " ".join(tokenize(text))


# ---------------------------------------------------------------------------------------------
# Vocabulary


class VocabularyError(ValueError):
    """A vocabulary file is missing, unreadable, not UTF-8 or has no entries."""


@dataclass
class Vocabulary:
    """Entries in matching form (``normalize``d: lower case, words joined by one space).

    Construction normalises, drops entries with no word, and removes duplicates keeping the first
    occurrence, so entry ids follow the given order. Treat it as immutable once built.
    """

    entries: list[str]
    _index: dict[str, int] = field(default=None, init=False, repr=False, compare=False)
    _max_words: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for e in self.entries:
            key = e if e.isascii() and e.islower() and " " not in e and e.isalnum() else normalize(e)
            if key and key not in seen:
                seen[key] = len(seen)
        self.entries = list(seen)
        self._index = seen
        self._max_words = max((e.count(" ") + 1 for e in self.entries), default=0)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        head = ", ".join(map(repr, self.entries[:5]))
        return f"Vocabulary({len(self)} entries: {head}{', ...' if len(self) > 5 else ''})"

    def __getitem__(self, i: int) -> str:
        return self.entries[i]

    def __contains__(self, entry: str) -> bool:
        return normalize(entry) in self._index

    def index(self, entry: str) -> int:
        """The id of ``entry`` (normalised first); KeyError if absent."""
        return self._index[normalize(entry)]

    @property
    def max_words(self) -> int:
        """Words in the longest entry."""
        return self._max_words

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocabulary":
        """One entry per line (UTF-8). Blank lines and lines starting with ``#`` are skipped; a
        tab-separated trailing column (the count of a word-frequency list) is ignored. A ``.json``
        file holds a list of strings (MetaCLIP's ``metadata.json``)."""
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"vocabulary file not found: {path}")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise VocabularyError(f"vocabulary file {path} is not UTF-8 (byte offset {e.start})") from None
        if path.suffix == ".json":
            try:
                entries = json.loads(text)
            except json.JSONDecodeError as e:
                raise VocabularyError(f"vocabulary file {path} is not valid JSON: {e}") from None
            if not isinstance(entries, list) or not all(isinstance(x, str) for x in entries):
                raise VocabularyError(f"vocabulary file {path} must hold a JSON list of strings")
        else:
            entries = []
            for line in text.split("\n"):
                line = line.split("\t", 1)[0].strip()
                if line and not line.startswith("#"):
                    entries.append(line)
        vocab = cls(entries)
        if not len(vocab):
            raise VocabularyError(f"vocabulary file {path} has no entries")
        return vocab

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_count: int = 2, max_n: int = 2,
                   max_entries: int | None = None) -> "Vocabulary":
        """Word n-grams (n = 1..max_n) occurring at least ``min_count`` times in ``texts``, most
        frequent first (ties in order of first occurrence)."""
        counts: Counter[str] = Counter()
        for text in texts:
            words = tokenize(text)
            for n in range(1, max_n + 1):
                counts.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
        ranked = sorted((c for c in counts.items() if c[1] >= min_count), key=lambda c: -c[1])
        return cls([e for e, _ in ranked[:max_entries]])

    @classmethod
    def default(cls, n_entries: int = 500_000) -> "Vocabulary":
        """The numbers 0-99 (as MetaCLIP's metadata starts), then wordfreq's English word list in
        frequency order, cut at ``n_entries``.

        wordfreq ships about 320k English tokens and no bigram or title lists, so the default holds
        317,438 entries rather than MetaCLIP's 500k; 20k of them have several words ("don't",
        "women's", "u.s", "new_york"). Pass a MetaCLIP-style list to ``from_file`` for the rest. wordfreq's placeholders for multi-digit
        numbers ("a00", "0000") are dropped: they never occur in real text. Cached per process.
        """
        cached = _default_vocabulary(n_entries)
        vocab = cls.__new__(cls)  # a copy, without normalising 300k entries again
        vocab.entries, vocab._index = list(cached.entries), dict(cached._index)
        vocab._max_words = cached.max_words
        return vocab


@functools.lru_cache(maxsize=4)
def _default_vocabulary(n_entries: int) -> Vocabulary:
    import wordfreq

    words = [str(i) for i in range(100)]
    words += [w for w in wordfreq.top_n_list("en", n_entries) if not _SMASHED_NUMBER.search(w)]
    return Vocabulary(Vocabulary(words).entries[:n_entries])


# ---------------------------------------------------------------------------------------------
# Matches: distinct entry ids per caption, in CSR form


@dataclass(frozen=True)
class Matches:
    """Caption i contains entries ``ids[indptr[i]:indptr[i + 1]]`` (sorted, distinct).

    indptr: (N + 1,) int64; ids: (M,) int64.
    """

    indptr: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[self.indptr[i]:self.indptr[i + 1]].tolist()

    def tolist(self) -> list[list[int]]:
        ids, ptr = self.ids.tolist(), self.indptr.tolist()
        return [ids[a:b] for a, b in zip(ptr[:-1], ptr[1:])]

    def caption_index(self) -> np.ndarray:
        """(M,) the caption of each id."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.indptr))

    @classmethod
    def from_pairs(cls, n: int, caption: np.ndarray, ids: np.ndarray) -> "Matches":
        """From (caption, entry id) pairs in any order, duplicates allowed."""
        caption, ids = np.asarray(caption, np.int64), np.asarray(ids, np.int64)
        if len(ids) and ids.min() < 0:
            raise ValueError("entry ids must be non-negative")
        stride = int(ids.max()) + 1 if len(ids) else 1
        key = np.sort(caption * stride + ids)
        if len(key):
            key = key[np.concatenate(([True], key[1:] != key[:-1]))]
        cap = key // stride
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(cap, minlength=n), out=indptr[1:])
        return cls(indptr, key - cap * stride)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> "Matches":
        lens = np.fromiter(map(len, lists), np.int64, len(lists))
        flat = np.fromiter((i for ids in lists for i in ids), np.int64, int(lens.sum()))
        return cls.from_pairs(len(lists), np.repeat(np.arange(len(lists)), lens), flat)

    @classmethod
    def concat(cls, parts: Sequence["Matches"]) -> "Matches":
        if not parts:
            return cls(np.zeros(1, np.int64), np.zeros(0, np.int64))
        offsets = np.cumsum([0] + [p.indptr[-1] for p in parts[:-1]])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)])
        return cls(indptr.astype(np.int64), np.concatenate([p.ids for p in parts]).astype(np.int64))


def as_matches(matches: "Matches | Sequence[Sequence[int]]") -> Matches:
    return matches if isinstance(matches, Matches) else Matches.from_lists(matches)


# ---------------------------------------------------------------------------------------------
# Matching

_MUL1, _MUL2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)


class _HashTable:
    """Open addressing (linear probing) from keys of W uint64 words to int64 values, with a
    vectorised lookup: one gather per probe round for all queries, so the memory latency of a
    big table overlaps across queries (Python dict lookups pay it one at a time).
    keys: (K, W) uint64 with a nonzero first word (zero marks an empty slot); values: (K,)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, load: float = 0.25):
        keys = np.asarray(keys, np.uint64)
        keys = keys[:, None] if keys.ndim == 1 else keys
        bits = max(4, int(np.ceil(np.log2(max(len(keys), 1) / load))))
        self.shift, self.mask = np.uint64(64 - bits), (1 << bits) - 1
        table = np.zeros((1 << bits, keys.shape[1]), np.uint64)
        self.values = np.full(1 << bits, -1, np.int64)
        slot, todo = self._slot(keys.T), np.arange(len(keys))
        while len(todo):  # place keys round by round; collisions move on to the next slot
            s = slot[todo]
            free = np.flatnonzero(table[s, 0] == 0)
            taken, first = np.unique(s[free], return_index=True)
            table[taken], self.values[taken] = keys[todo[free[first]]], values[todo[free[first]]]
            placed = np.zeros(len(todo), bool)
            placed[free[first]] = True
            todo = todo[~placed]
            slot[todo] = (slot[todo] + 1) & self.mask
        self.words = [np.ascontiguousarray(table[:, w]) for w in range(table.shape[1])]

    def _slot(self, q: Sequence[np.ndarray]) -> np.ndarray:
        h = q[0] * _MUL1
        for w in q[1:]:
            h = (h ^ w) * _MUL2
        return (h >> self.shift).astype(np.intp)

    def get(self, q: Sequence[np.ndarray]) -> np.ndarray:
        """W query arrays of (Q,) uint64 -> (Q,) int64 values, -1 where absent."""
        out = np.full(len(q[0]), -1, np.int64)
        slot, todo = self._slot(q), None
        while True:
            first = self.words[0][slot]
            hit = np.flatnonzero(first == (q[0] if todo is None else q[0][todo]))
            for w in range(1, len(q)):
                qw = q[w][hit] if todo is None else q[w][todo[hit]]
                hit = hit[self.words[w][slot[hit]] == qw]
            out[hit if todo is None else todo[hit]] = self.values[slot[hit]]
            go = first != 0
            go[hit] = False
            go = np.flatnonzero(go)
            if not len(go):
                return out
            todo = go if todo is None else todo[go]
            slot = (slot[go] + 1) & self.mask


# bytes.translate table for ASCII text: letters lower-cased, digits kept, all else a space;
# bytes >= 0x80 (UTF-8 of already normalised non-ASCII words) pass through.
_ASCII_FOLD = bytes(ord(chr(i).lower()) if i < 128 and chr(i).isalnum() else (32 if i < 128 else i)
                    for i in range(256))
_LOW_BYTES = np.array([(1 << (8 * j)) - 1 for j in range(8)] + [2**64 - 1], np.uint64)
_PACK = 16  # words up to this many UTF-8 bytes are looked up as two packed uint64; longer via a dict


def _pack(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """(K, 2) uint64: the first 16 bytes of each word (little-endian), zero past its end.
    ``buf`` must extend at least 16 bytes past every start."""
    win = np.lib.stride_tricks.as_strided(buf, shape=(len(buf) - _PACK + 1, _PACK), strides=(1, 1))
    raw = win[starts].view("<u8").copy()
    raw[:, 0] &= _LOW_BYTES[np.minimum(lens, 8)]
    raw[:, 1] &= _LOW_BYTES[np.clip(lens - 8, 0, 8)]
    return raw


@functools.lru_cache(maxsize=1)
def _alnum_table() -> np.ndarray:
    """(0x110000,) bool: ``str.isalnum()`` of every code point (built once, ~0.3 s)."""
    return np.fromiter((chr(c).isalnum() for c in range(0x110000)), bool, 0x110000)


def _fold_batch(texts: Sequence[str]) -> tuple[np.ndarray, int, np.ndarray]:
    """The captions joined by spaces as UTF-8 in which every byte is a space or part of a word.

    Returns (buf, n_bytes, first_byte): buf (n_bytes + 17,) uint8 (the text, a space, zeros to pack
    from), and (N,) the byte where each caption starts. ASCII captions are folded by one
    ``bytes.translate``; non-ASCII ones get NFC and ``lower()`` per caption, then every non-ASCII
    code point that is not alphanumeric is blanked by decoding the UTF-8 lead bytes in numpy.
    """
    n = len(texts)
    parts = list(texts)
    odd = np.flatnonzero(~np.fromiter(map(str.isascii, parts), bool, n)).tolist()
    for i in odd:
        parts[i] = unicodedata.normalize("NFC", parts[i]).lower()
    n_chars = np.fromiter(map(len, parts), np.int64, n)
    first_char = np.cumsum(n_chars + 1) - n_chars - 1
    raw = " ".join(parts).encode("utf-8", "surrogatepass").translate(_ASCII_FOLD)
    buf = np.frombuffer(raw + b" " + bytes(_PACK), np.uint8)
    if not odd:
        return buf, len(raw), first_char
    # The i-th character starts at the i-th byte that is not a UTF-8 continuation byte.
    char_start = np.append(np.flatnonzero((buf[:len(raw)] & 0xC0) != 0x80), len(raw))
    buf = buf.copy()
    lead = np.flatnonzero(buf >= 0xC0)
    b0 = buf[lead].astype(np.int64)
    b1, b2, b3 = ((buf[lead + k] & 0x3F).astype(np.int64) for k in (1, 2, 3))
    width = 2 + (b0 >= 0xE0) + (b0 >= 0xF0)
    cp = np.where(width == 2, ((b0 & 0x1F) << 6) | b1,
                  np.where(width == 3, ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
                           ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3))
    blank = ~_alnum_table()[cp]
    for k in range(4):
        buf[lead[blank & (width > k)] + k] = 32
    return buf, len(raw), char_start[first_char]


class NgramMatcher:
    """Whole-word, case-insensitive matching of a vocabulary's entries in captions.

    ``backend="tokens"`` (default): captions are split into words with vectorised byte operations,
    words are looked up in a hash table, and multi-word entries are followed through a word-level
    trie, all in numpy over a whole batch. ``backend="ahocorasick"``: MetaCLIP's method, a
    pyahocorasick automaton over space-padded entries run on space-normalised text. Both give
    identical results; with a 500k-entry vocabulary the token backend is about 5x faster
    (``bench_ngram``): pyahocorasick scans a node's children linearly, through a pointer each,
    for every character.
    """

    def __init__(self, vocab: Vocabulary, backend: str = "tokens", batch_size: int = 4096):
        if backend not in ("tokens", "ahocorasick"):
            raise ValueError(f"unknown backend {backend!r}: use 'tokens' or 'ahocorasick'")
        self.vocab, self.backend, self.batch_size = vocab, backend, batch_size
        self.n_entries = len(vocab)
        if backend == "tokens":
            self._build_tokens()
        else:
            self._build_automaton()

    # -- public API

    def match(self, text: str) -> list[int]:
        """Sorted distinct ids of the entries found in ``text``."""
        return self.match_batch([text])[0]

    def match_many(self, texts: Sequence[str]) -> list[list[int]]:
        return self.match_batch(texts).tolist()

    def match_batch(self, texts: Sequence[str]) -> Matches:
        """All captions' matches in CSR form (the fast path: no per-caption Python lists)."""
        run = self._match_tokens if self.backend == "tokens" else self._match_automaton
        bs = self.batch_size
        return Matches.concat([run(texts[i:i + bs]) for i in range(0, len(texts), bs)])

    # -- token backend

    def _build_tokens(self) -> None:
        word_id: dict[str, int] = {}
        split = [e.split(" ") for e in self.vocab.entries]
        for words in split:
            for w in words:
                word_id.setdefault(w, len(word_id))
        T = self._n_words = len(word_id)
        # Trie over word ids: a first word's state is its word id; deeper states are numbered from T.
        child: dict[int, int] = {}
        final = np.full(T, -1, np.int64)
        finals: dict[int, int] = {}
        for e, words in enumerate(split):
            state = word_id[words[0]]
            for w in words[1:]:
                state = child.setdefault(state * T + word_id[w], T + len(child))
            if state < T:
                final[state] = e
            else:
                finals[state] = e
        self._state_entry = np.concatenate([final, np.full(len(child), -1, np.int64)])
        if finals:
            self._state_entry[np.fromiter(finals, np.int64)] = np.fromiter(finals.values(), np.int64)
        self._trie = _HashTable(np.fromiter(child, np.uint64, len(child)),
                                np.fromiter(child.values(), np.int64, len(child)))
        self._max_words = self.vocab.max_words
        # Word lookup: packed bytes for words up to 16 bytes, a dict for longer ones.
        enc = [w.encode() for w in word_id]
        lens = np.fromiter(map(len, enc), np.int64, T)
        short = np.flatnonzero(lens <= _PACK)
        buf = np.frombuffer(b"".join(enc) + bytes(_PACK), np.uint8)
        starts = np.cumsum(lens) - lens
        self._words = _HashTable(_pack(buf, starts[short], lens[short]), short)
        self._long_words = {enc[i]: int(i) for i in np.flatnonzero(lens > _PACK)}

    def _match_tokens(self, texts: Sequence[str]) -> Matches:
        n = len(texts)
        buf, n_bytes, first_byte = _fold_batch(texts)
        word = buf[:n_bytes + 1] != 32
        edges = np.flatnonzero(word[1:] != word[:-1]) + 1
        if word[0]:
            edges = np.concatenate(([0], edges))
        starts, lens = edges[0::2], edges[1::2] - edges[0::2]
        cap = np.searchsorted(first_byte, starts, side="right") - 1  # (W,) caption of each word

        ids = np.full(len(starts), -1, np.int64)  # word ids, -1 for words in no entry
        short = np.flatnonzero(lens <= _PACK)
        ids[short] = self._words.get(_pack(buf, starts[short], lens[short]).T)
        long = np.flatnonzero(lens > _PACK)
        if len(long):
            get = self._long_words.get
            ids[long] = [get(buf[a:a + k].tobytes(), -1)
                         for a, k in zip(starts[long].tolist(), lens[long].tolist())]

        # Follow every word position through the trie, all positions at once, one word per step.
        T, W = np.uint64(self._n_words), len(ids)
        pos = np.flatnonzero(ids >= 0)
        state = ids[pos]
        found_pos, found_entry = [], []
        for k in range(self._max_words):
            if k:
                nxt = pos + k
                ok = nxt < W
                pos, state, nxt = pos[ok], state[ok], nxt[ok]
                w = ids[nxt]
                ok = (w >= 0) & (cap[nxt] == cap[pos])
                pos, state, w = pos[ok], state[ok], w[ok]
                state = self._trie.get([state.astype(np.uint64) * T + w.astype(np.uint64)])
                pos, state = pos[state >= 0], state[state >= 0]
                if not len(pos):
                    break
            entry = self._state_entry[state]
            hit = entry >= 0
            found_pos.append(pos[hit])
            found_entry.append(entry[hit])
        if not found_pos:
            return Matches(np.zeros(n + 1, np.int64), np.zeros(0, np.int64))
        return Matches.from_pairs(n, cap[np.concatenate(found_pos)], np.concatenate(found_entry))

    # -- Aho-Corasick backend (MetaCLIP's substr_matching_ahocorasick, made whole-word)

    def _build_automaton(self) -> None:
        import ahocorasick

        self._automaton = A = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for i, e in enumerate(self.vocab.entries):
            A.add_word(f" {e} ", i)
        A.add_word("\x00", self.n_entries)  # caption separator: its hits split the stream
        A.make_automaton()

    def _match_automaton(self, texts: Sequence[str]) -> Matches:
        from operator import itemgetter

        if not self.n_entries:
            return Matches(np.zeros(len(texts) + 1, np.int64), np.zeros(0, np.int64))
        # Normalised words never contain "\x00" or double spaces, and no key does either, so a
        # key cannot straddle two captions.
        text = " " + " \x00 ".join(map(normalize, texts)) + " "
        hits = np.fromiter(map(itemgetter(1), self._automaton.iter(text)), np.int64)
        sep = hits == self.n_entries
        return Matches.from_pairs(len(texts), np.cumsum(sep)[~sep], hits[~sep])


def brute_force_match(text: str, vocab: Vocabulary) -> list[int]:
    """Reference matcher: look every word n-gram of ``text`` up in the vocabulary."""
    words, index = tokenize(text), vocab._index
    found = {index[g] for n in range(1, vocab.max_words + 1)
             for g in (" ".join(words[i:i + n]) for i in range(len(words) - n + 1)) if g in index}
    return sorted(found)
