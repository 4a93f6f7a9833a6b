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


class ShardStream:
    """Endless, shuffled, rank-split stream of raw samples with an exact (epoch, index) position."""

    def __init__(self, shards: list[Path], rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 64):
        if len(shards) < world_size:
            raise ShardError(f"data.shards: {len(shards)} shard(s) for {world_size} ranks; each rank needs >= 1")
        self.shards, self.rank, self.world = list(shards), rank, world_size
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
                raise ShardError(f"data.shards: rank {self.rank}'s shards {self.epoch_shards(epoch)} "
                                 "hold no samples")
            epoch, skip = epoch + 1, 0


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

    def __init__(self, stream: ShardStream, codec: Codec, pad_id: int, max_seq_len: int, max_tokens: int,
                 max_rows: int, on_error: str = "raise", pack_rows: bool = False):
        if pack_rows and not hasattr(codec, "collate_rows"):
            raise ValueError(f"data.pack_rows: {type(codec).__name__} cannot put several samples in one row")
        self.stream, self.codec, self.pad_id = stream, codec, pad_id
        self.max_seq_len, self.max_tokens, self.max_rows = max_seq_len, max_tokens, max_rows
        self.pack_rows = pack_rows
        self.on_error = on_error
        self.position = (0, 0)  # first sample not yet delivered
        self.bad: dict[str, list[str]] = {}  # shard -> keys of counted bad samples
        self.samples_delivered = 0
        self._it: Iterator[RawSample] | None = None
        self._pending: Example | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.position[0], "index": self.position[1], "samples_delivered": self.samples_delivered,
                "bad": {k: list(v) for k, v in self.bad.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.position = (int(state["epoch"]), int(state["index"]))
        self.samples_delivered = int(state["samples_delivered"])
        self.bad = {k: list(v) for k, v in state["bad"].items()}
        self._it, self._pending = None, None

    @property
    def n_bad(self) -> int:
        return sum(map(len, self.bad.values()))

    def _next_example(self) -> Example:
        if self._it is None:
            self._it = self.stream.iterate(*self.position)
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
        last = rows[-1][-1].source
        self.position = (nxt.epoch, nxt.index) if nxt is not None else (last.epoch, last.index + 1)
        self.samples_delivered += sum(map(len, rows))
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
