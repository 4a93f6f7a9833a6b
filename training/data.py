"""Training data from webdataset shards: shuffled, split per rank, resumable, packed by token budget.

Order. Each epoch ``e`` shuffles the shard list with ``Random(seed, e)``; rank ``r`` of ``W`` reads shards
``r::W`` of that order (so at least ``W`` shards are needed), sample by sample through a shuffle buffer of
``shuffle_buffer`` samples seeded with ``(seed, e, r)``. The stream is endless (epoch after epoch): ranks
whose shards differ in size simply move to the next epoch at different steps, and no rank runs dry.

Resume. A position is ``(epoch, index)``: the index-th sample this rank's stream yields in that epoch.
`TrainBatches.state_dict` holds the position of the first sample not yet in a delivered micro-batch (a
sample held back because it did not fit counts as not delivered); resuming rebuilds that epoch's order
and skips ``index`` raw samples without decoding them, so the next micro-batch equals the uninterrupted
run's exactly. The skip re-reads those samples' bytes: cheap next to training on them.

Mix. With several sources (``data.sources``, the annealing mix) `MixStream` interleaves one `ShardStream` per
source (each as above, split across ranks the same way, with its own shuffle seed): draw ``n`` of a rank comes from
source i with probability weight_i / sum, from uniforms fixed by ``(seed, rank, n)`` (webdataset's ``RandomMix``,
NeMo's blended datasets). Its position is the draw count plus every source's ``(epoch, index)``, so a resumed run
draws and reads exactly what the uninterrupted one would. Each sample goes through its own source's codec
(`MixCodec`); `TrainBatches` counts the delivered samples per source.

Packing. A micro-batch is filled greedily with whole samples, in stream order, while it holds at most
``max_rows`` rows and ``rows x longest row`` stays within ``max_tokens``: short captions give many rows
(the paper's "short texts allow micro-batch 8 instead of 1"), long ones few. With ``pack_rows`` a row
also takes several consecutive samples while their total stays within ``max_seq_len``; the micro-batch
then carries ``doc_ids`` (B, T), and `MultimodalLlama.forward` gives every packed sample its own
document mask, RoPE positions from 0 and only its own images / videos, so a packed row computes what
its samples would alone (tested) with far less padding. Either way no sample is split or truncated.

What a sample becomes (tokens, labels, media) is its codec's business (`training.codecs`, and the kinds' own in
`training.text_lm`, `training.clip`, `training.bestrq`, `training.preference`). Bad samples (undecodable image
or video, missing member, malformed conversation, text over ``max_seq_len``) raise `BadSampleError` naming the shard and key, or with ``on_error="count"`` are counted per shard with their
keys (never silently dropped); a missing or unreadable shard always raises `ShardError`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from adapters.chat import IGNORE_INDEX
from media.tar import ShardError, read_tar

log = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample that cannot become a training example; the message names its shard and key."""


@dataclass
class RawSample:
    shard: str
    key: str
    members: dict[str, bytes]
    epoch: int
    index: int  # position in this rank's stream for the epoch
    source: int = 0  # which source of a mix (`MixStream`) it came from
    mix_position: dict | None = None  # a mix's position just before this sample (`MixStream.position`)


class ShardStream:
    """Endless, shuffled, rank-split stream of raw samples with an exact (epoch, index) position."""

    n_sources = 1

    def __init__(self, shards: list[Path], rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 64, where: str = "data.shards"):
        if len(shards) < world_size:
            raise ShardError(f"{where}: {len(shards)} shard(s) for {world_size} ranks; each rank needs >= 1")
        self.shards, self.rank, self.world, self.where = list(shards), rank, world_size, where
        self.seed, self.buffer = seed, max(1, shuffle_buffer)

    def epoch_shards(self, epoch: int) -> list[Path]:
        order = list(self.shards)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order[self.rank :: self.world]

    def epoch(self, epoch: int) -> Iterator[RawSample]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        buf: list[tuple[str, str, dict]] = []
        index = 0

        def source():
            for shard in self.epoch_shards(epoch):
                for key, members in read_tar(shard):
                    yield str(shard), key, members

        for item in source():
            if len(buf) < self.buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            out, buf[j] = buf[j], item
            yield RawSample(*out, epoch, index)
            index += 1
        while buf:
            yield RawSample(*buf.pop(int(rng.integers(len(buf)))), epoch, index)
            index += 1

    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[RawSample]:
        """From sample ``skip`` of ``epoch`` on, forever (an epoch with no samples is an error)."""
        while True:
            n = 0
            for sample in self.epoch(epoch):
                n += 1
                if sample.index >= skip:
                    yield sample
            if n == 0:
                raise ShardError(f"{self.where}: rank {self.rank}'s shards {self.epoch_shards(epoch)} "
                                 "hold no samples")
            epoch, skip = epoch + 1, 0

    # The position protocol `TrainBatches` resumes through (`MixStream` has the same three methods).
    def start(self) -> dict:
        return {"epoch": 0, "index": 0}

    def position(self, raw: RawSample, after: bool = False) -> dict:
        """The position from which the stream yields ``raw`` first (``after``: the sample after it)."""
        return {"epoch": raw.epoch, "index": raw.index + after}

    def iterate_from(self, position: dict) -> Iterator[RawSample]:
        return self.iterate(int(position["epoch"]), int(position["index"]))


class MixStream:
    """Endless weighted mix of ``streams`` (one `ShardStream` per source): draw ``n`` takes the next sample of
    source i with probability ``weights[i] / sum(weights)``; the draws are fixed by ``(seed, rank, n)``, so a
    resumed stream continues exactly (see the module docstring)."""

    BLOCK = 1024  # draws per block of uniforms: resuming at draw n regenerates one block

    def __init__(self, streams: list[ShardStream], weights: list[float], seed: int = 0, rank: int = 0):
        if not streams or len(streams) != len(weights) or not all(w > 0 for w in weights):
            raise ValueError(f"a mix needs >= 1 stream and a weight > 0 for each, got {len(streams)} and {weights}")
        self.streams, self.seed, self.rank = list(streams), seed, rank
        self.probs = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self._edges = np.cumsum(self.probs)[:-1]
        self._block: tuple[int, np.ndarray] | None = None

    @property
    def n_sources(self) -> int:
        return len(self.streams)

    def choice(self, n: int) -> int:
        """The source of draw ``n`` (the same for any resume: a function of seed, rank and n only)."""
        b = n // self.BLOCK
        if self._block is None or self._block[0] != b:
            u = np.random.default_rng([self.seed, self.rank, b, 0x6D6978]).random(self.BLOCK)  # "mix"
            self._block = (b, np.searchsorted(self._edges, u, side="right"))
        return int(self._block[1][n % self.BLOCK])

    def start(self) -> dict:
        return {"draw": 0, "sources": [[0, 0] for _ in self.streams]}

    def position(self, raw: RawSample, after: bool = False) -> dict:
        before = raw.mix_position
        if not after:
            return before
        sources = [list(p) for p in before["sources"]]
        sources[raw.source] = [raw.epoch, raw.index + 1]
        return {"draw": before["draw"] + 1, "sources": sources}

    def iterate_from(self, position: dict) -> Iterator[RawSample]:
        n = int(position["draw"])
        at = [[int(e), int(i)] for e, i in position["sources"]]
        its = [s.iterate(e, i) for s, (e, i) in zip(self.streams, at)]  # lazy: a source never drawn is never read
        while True:
            k = self.choice(n)
            raw = next(its[k])
            raw.source, raw.mix_position = k, {"draw": n, "sources": [list(p) for p in at]}
            at[k] = [raw.epoch, raw.index + 1]
            n += 1
            yield raw


@dataclass
class Example:
    tokens: list[int]
    labels: list[int]
    media: Any  # a TiledImage, TiledVideo, or waveform, per codec
    source: RawSample
    # Further rows of the same sample, (tokens, labels) each, with the same media: a preference sample's other
    # answers (`training.preference`). Each is a row of its own in the micro-batch, right after this one, and
    # counts towards max_rows and max_tokens; the codec's collate lays the media out for every row.
    extra_rows: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @property
    def rows(self) -> list[tuple[list[int], list[int]]]:
        return [(self.tokens, self.labels), *self.extra_rows]

    @property
    def longest(self) -> int:
        return max(len(tokens) for tokens, _ in self.rows)


class Codec(Protocol):
    """Raw shard sample -> `Example`; a list of examples -> the model's keyword arguments."""

    def decode(self, raw: RawSample) -> Example: ...

    def collate(self, examples: list[Example]) -> dict: ...


class MixCodec:
    """Each sample of a `MixStream` through its own source's codec; micro-batches collate through ``collator``
    (one of ``codecs``). ``list_media[i]``: wrap source i's media in a one-item list, so a caption example (one
    image) collates like a conversation example (a list of images) when the two mix."""

    def __init__(self, codecs: list[Codec], collator: Codec, list_media: list[bool] | None = None):
        self.codecs, self.collator = list(codecs), collator
        self.list_media = list(list_media) if list_media is not None else [False] * len(self.codecs)

    def decode(self, raw: RawSample) -> Example:
        ex = self.codecs[raw.source].decode(raw)
        if self.list_media[raw.source]:
            ex.media = [ex.media]
        return ex

    def collate(self, examples: list[Example]) -> dict:
        return self.collator.collate(examples)

    @property
    def collate_rows(self):
        return self.collator.collate_rows  # AttributeError, as for a codec without it: no pack_rows


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # (B, T) right-padded with pad_id
    labels: torch.Tensor  # (B, T), IGNORE_INDEX on prompt, media token and padding
    media: dict  # the model's keyword arguments (images= / videos= / speech inputs)
    keys: list[str]  # "shard:key" of every row, for logs and bad-batch reports

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class TrainBatches:
    """Micro-batches for one rank: `ShardStream` -> codec -> token-budget packing; resumable.

    ``state_dict()`` after a micro-batch was taken, loaded into a fresh instance, gives the same
    following micro-batches (see the module docstring).
    """

    def __init__(self, stream: ShardStream | MixStream, codec: Codec, pad_id: int, max_seq_len: int,
                 max_tokens: int, max_rows: int, on_error: str = "raise", pack_rows: bool = False):
        if pack_rows and not hasattr(codec, "collate_rows"):
            raise ValueError(f"data.pack_rows: {type(codec).__name__} cannot put several samples in one row")
        self.stream, self.codec, self.pad_id = stream, codec, pad_id
        self.max_seq_len, self.max_tokens, self.max_rows = max_seq_len, max_tokens, max_rows
        self.pack_rows = pack_rows
        self.on_error = on_error
        self.position = stream.start()  # first sample not yet delivered
        self.bad: dict[str, list[str]] = {}  # shard -> keys of counted bad samples
        self.samples_delivered = 0
        self.source_samples = [0] * stream.n_sources  # delivered samples per source of a mix
        self._it: Iterator[RawSample] | None = None
        self._pending: Example | None = None

    def state_dict(self) -> dict:
        return {**self.position, "samples_delivered": self.samples_delivered,
                "source_samples": list(self.source_samples), "bad": {k: list(v) for k, v in self.bad.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.position = {k: state[k] for k in self.stream.start()}
        self.samples_delivered = int(state["samples_delivered"])
        # a one-source checkpoint written before per-source counts: all its samples are source 0's
        self.source_samples = [int(n) for n in state.get("source_samples", [self.samples_delivered])]
        self.bad = {k: list(v) for k, v in state["bad"].items()}
        self._it, self._pending = None, None

    @property
    def n_bad(self) -> int:
        return sum(map(len, self.bad.values()))

    def _next_example(self) -> Example:
        if self._it is None:
            self._it = self.stream.iterate_from(self.position)
        while True:
            raw = next(self._it)
            try:
                ex = self.codec.decode(raw)
                if ex.longest > self.max_seq_len:
                    raise BadSampleError(f"{raw.shard}: sample {raw.key} has {ex.longest} tokens, more than "
                                         f"data.max_seq_len={self.max_seq_len}")
                return ex
            except BadSampleError as e:
                if self.on_error == "raise":
                    raise
                self.bad.setdefault(raw.shard, []).append(raw.key)
                log.warning("skipping bad sample (counted): %s", e)

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> MicroBatch:
        rows: list[list[Example]] = []  # each row: whole samples, several only with pack_rows
        lengths: list[int] = []
        used = 0  # rows of the micro-batch so far (a preference sample fills several)
        while True:
            ex = self._pending if self._pending is not None else self._next_example()
            self._pending = None
            n, k = ex.longest, len(ex.rows)
            if self.pack_rows and rows and lengths[-1] + n <= self.max_seq_len:
                rows[-1].append(ex)  # joins the last row; the row count and the longest row may grow
                lengths[-1] += n
                if len(rows) * max(lengths) <= self.max_tokens:
                    continue
                rows[-1].pop()
                lengths[-1] -= n
            elif not rows or (used + k <= self.max_rows and (used + k) * max(*lengths, n) <= self.max_tokens):
                rows.append([ex])
                lengths.append(n)
                used += k
                if used < self.max_rows or self.pack_rows:
                    continue
                break
            self._pending = ex  # starts the next micro-batch
            break
        nxt = self._pending.source if self._pending is not None else None
        self.position = (self.stream.position(nxt) if nxt is not None
                         else self.stream.position(rows[-1][-1].source, after=True))
        self.samples_delivered += sum(map(len, rows))
        for row in rows:
            for e in row:
                self.source_samples[e.source.source] += 1
        return self._collate_rows(rows) if self.pack_rows else self._collate([r[0] for r in rows])

    def _collate_rows(self, rows: list[list[Example]]) -> MicroBatch:
        T = max(sum(len(e.tokens) for e in row) for row in rows)
        tokens = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        doc_ids = torch.full((len(rows), T), -1, dtype=torch.long)  # padding: a document of its own
        for i, row in enumerate(rows):
            t = 0
            for d, e in enumerate(row):
                n = len(e.tokens)
                tokens[i, t : t + n] = torch.tensor(e.tokens)
                labels[i, t : t + n] = torch.tensor(e.labels)
                doc_ids[i, t : t + n] = d
                t += n
        keys = [";".join(f"{e.source.shard}:{e.source.key}" for e in row) for row in rows]
        return MicroBatch(tokens, labels, {**self.codec.collate_rows(rows), "doc_ids": doc_ids}, keys)

    def _collate(self, batch: list[Example]) -> MicroBatch:
        rows = [(e, *row) for e in batch for row in e.rows]
        T = max(len(t) for _, t, _ in rows)
        tokens = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, (_, t, lab) in enumerate(rows):
            tokens[i, : len(t)] = torch.tensor(t)
            labels[i, : len(lab)] = torch.tensor(lab)
        keys = [f"{e.source.shard}:{e.source.key}" for e, _, _ in rows]
        return MicroBatch(tokens, labels, self.codec.collate(batch), keys)
