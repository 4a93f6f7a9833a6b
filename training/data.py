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

Bad samples (undecodable image or video, missing member, malformed conversation, text over ``max_seq_len``)
raise `BadSampleError` naming the shard and key, or with ``on_error="count"`` are counted per shard with their
keys (never silently dropped); a missing or unreadable shard always raises `ShardError`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from adapters.chat import (IGNORE_INDEX, Message, encode_header, encode_training_example, image_input_id,
                           video_input_id)
from adapters.multimodal import ImageBatch
from adapters.tokenizer import Tokenizer
from common.conversation import (IMAGE_PLACEHOLDER, PLACEHOLDERS, VIDEO_PLACEHOLDER, ConversationError,
                                 check_conversation)
from media.image import ImageLoadError, load_image_bytes
from media.tar import ShardError, read_tar
from vision.tiling import TiledImage, TilingConfig, TilingError, collate_tiled, tile_image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


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


def sample_text(raw: RawSample) -> str:
    if "txt" in raw.members:
        data = raw.members["txt"]
    else:
        meta = json.loads(raw.members["json"]) if "json" in raw.members else {}
        data = meta.get("caption") or meta.get("text")
        if data is None:
            raise BadSampleError(f"{raw.shard}: sample {raw.key} has no text (txt, or caption/text in json; "
                                 f"has {sorted(raw.members)})")
    try:
        return (data.decode("utf-8-sig") if isinstance(data, bytes) else str(data)).strip()
    except UnicodeDecodeError as e:
        raise BadSampleError(f"{raw.shard}: sample {raw.key}.txt is not UTF-8 ({e})") from e


def sample_meta(raw: RawSample, fmt: str) -> dict:
    """The ``meta`` object of the sample's ``key.json``: where the shard builders put a sidecar's own fields
    (``question``, ``answer``, ``kind``, ``messages``, ...). Missing or malformed: a `BadSampleError`."""
    if "json" not in raw.members:
        raise BadSampleError(f"{raw.shard}: sample {raw.key} has no json (data.format {fmt} reads key.json's "
                             f"meta; has {sorted(raw.members)})")
    try:
        record = json.loads(raw.members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSampleError(f"{raw.shard}: sample {raw.key}.json is not valid JSON ({e})") from e
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise BadSampleError(f"{raw.shard}: sample {raw.key}.json has no 'meta' object (data.format {fmt} reads "
                             "the sidecar fields the shard builders keep there)")
    return meta


def qa_fields(raw: RawSample) -> tuple[str, str]:
    """(question, answer) from the sample's ``key.json`` meta; a missing one is a `BadSampleError` naming it."""
    meta = sample_meta(raw, "qa")
    fields = []
    for name in ("question", "answer"):
        value = meta.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadSampleError(f"{raw.shard}: sample {raw.key}.json has no meta {name!r} (a non-empty string; "
                                 "data.format qa needs question and answer)")
        fields.append(value.strip())
    return fields[0], fields[1]


def encode_sample(tok: Tokenizer, media_id: int, raw: RawSample, fmt: str, prompt: str) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one media-text sample.

    ``caption``: ``<bos><media>text<eos>``, labels on the text and eos (pre-training on pairs);
    ``chat``: ``prompt`` as the user turn with the media before it, the text as the assistant answer;
    ``qa``: the sample's own ``question`` (key.json) as the user turn with the media before it, its
    ``answer`` as the assistant turn. Chat and qa label the answer and its ``<|eot_id|>`` only.
    """
    if fmt == "caption":
        ids = tok.encode(sample_text(raw)) + [tok.eos_id]
        return [tok.bos_id, media_id, *ids], [IGNORE_INDEX, IGNORE_INDEX, *ids]
    media = {"n_images": 1} if media_id == image_input_id(tok) else {"n_videos": 1}
    if fmt == "qa":
        question, answer = qa_fields(raw)
    else:
        question, answer = prompt or f"Describe the {'image' if 'n_images' in media else 'video'}.", sample_text(raw)
    return encode_training_example(tok, [Message("user", question, **media), Message("assistant", answer)])


def tile_member(raw: RawSample, ext: str, tiling: TilingConfig) -> TiledImage:
    """The sample's image member ``key.<ext>`` decoded and tiled; undecodable: a `BadSampleError` naming it."""
    try:
        return tile_image(load_image_bytes(raw.members[ext], name=f"{raw.shard}:{raw.key}.{ext}"), tiling)
    except (ImageLoadError, TilingError) as e:
        raise BadSampleError(f"{raw.shard}: sample {raw.key}: {e}") from e


class ImageCaptionCodec:
    """key.jpg (png/webp) + key.txt (or json caption) -> tiles through `vision.tiling` + caption ids."""

    def __init__(self, tok: Tokenizer, tiling: TilingConfig, fmt: str = "caption", prompt: str = ""):
        self.tok, self.tiling, self.fmt, self.prompt = tok, tiling, fmt, prompt

    def decode(self, raw: RawSample) -> Example:
        ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
        if ext is None:
            raise BadSampleError(f"{raw.shard}: sample {raw.key} has no image (has {sorted(raw.members)})")
        tiled = tile_member(raw, ext, self.tiling)
        tokens, labels = encode_sample(self.tok, image_input_id(self.tok), raw, self.fmt, self.prompt)
        return Example(tokens, labels, tiled, raw)

    def collate(self, examples: list[Example]) -> dict:
        return self.collate_rows([[e] for e in examples])

    def collate_rows(self, rows: list[list[Example]]) -> dict:
        return {"images": ImageBatch.from_collated(collate_tiled([[e.media for e in row] for row in rows])).trimmed()}


def conversation_messages(raw: RawSample) -> list[Message]:
    """The turns of key.json meta ``conversations``, checked by `common.conversation.check_conversation`: an
    optional leading system turn, then user and assistant alternating from user to a non-empty assistant answer;
    ``<|image|>`` in user turns only. Any other layout is a `BadSampleError` naming the shard, key and field."""
    try:
        turns = check_conversation(sample_meta(raw, "conversation").get("conversations"))
    except ConversationError as e:
        raise BadSampleError(f"{raw.shard}: sample {raw.key}.json: {e} (data.format conversation)") from e
    return [Message(role, content) for role, content in turns]


def sample_media(raw: RawSample, exts: tuple[str, ...] = IMAGE_EXTS, what: str = "image") -> list[str]:
    """Member names of the sample's images (or videos, with ``VIDEO_EXTS``) in order: ``key.0.jpg``,
    ``key.1.png``, ... (a lone ``key.jpg`` is image 0). Two members for one index, or a gap in the numbering,
    is a `BadSampleError`."""
    found: dict[int, list[str]] = {}
    for name in raw.members:
        stem, _, ext = name.rpartition(".")
        if ext in exts and (not stem or stem.isdigit()):  # "jpg" (stem "") or "0.jpg", "1.png", ...
            found.setdefault(int(stem or 0), []).append(name)
    for index, names in sorted(found.items()):
        if len(names) > 1:
            raise BadSampleError(f"{raw.shard}: sample {raw.key}: members {sorted(names)} are all {what} {index}")
    if sorted(found) != list(range(len(found))):
        missing = min(set(range(len(found))) - set(found))
        raise BadSampleError(f"{raw.shard}: sample {raw.key}: {what} {missing} (key.{missing}.{exts[0]} / ...) is "
                             f"missing but later {what}s are there (has {sorted(raw.members)})")
    return [found[i][0] for i in range(len(found))]


def encode_conversation(tok: Tokenizer, messages: list[Message], placeholder: str = IMAGE_PLACEHOLDER
                        ) -> tuple[list[int], list[int]]:
    """(tokens, labels): the Llama 3 chat format of `adapters.chat.encode_training_example` with each
    ``placeholder`` (``<|image|>``, or ``<|video|>``) of a user turn replaced by its media token where it
    stands; labels on every assistant turn's content and its ``<|eot_id|>`` only."""
    media_id = video_input_id(tok) if placeholder == VIDEO_PLACEHOLDER else image_input_id(tok)
    tokens, labels = [tok.bos_id], [IGNORE_INDEX]
    for m in messages:
        first, *rest = m.content.strip().split(placeholder)
        body = tok.encode(first)
        for text in rest:
            body += [media_id, *tok.encode(text)]
        header = encode_header(tok, m.role)
        tokens += [*header, *body, tok.eot_id]
        labels += [IGNORE_INDEX] * len(header)
        labels += [*body, tok.eot_id] if m.role == "assistant" else [IGNORE_INDEX] * (len(body) + 1)
    return tokens, labels


def check_placeholders(raw: RawSample, messages: list[Message], names: list[str], placeholder: str,
                       what: str) -> None:
    """One ``placeholder`` per media member, and no placeholder of the other kind (a `BadSampleError`)."""
    n = sum(m.content.count(placeholder) for m in messages)
    if n != len(names):
        raise BadSampleError(f"{raw.shard}: sample {raw.key}.json: conversations hold {n} {placeholder} "
                             f"placeholder(s) but the sample has {len(names)} {what}(s) {names}; each {what} needs "
                             "one placeholder, in order")
    other = next(p for p in PLACEHOLDERS if p != placeholder)
    if any(other in m.content for m in messages):
        raise BadSampleError(f"{raw.shard}: sample {raw.key}.json: a {other} placeholder in a {what} conversation "
                             f"(this kind's conversations hold {what}s only)")


class ImageConversationCodec:
    """key.json meta ``conversations`` + key.0.jpg, key.1.jpg, ... -> a multi-turn, multi-image chat example
    (``data.format: conversation``); text-only conversations (no image, no placeholder) mix in the same shards.
    The example's media is the list of its tiled images in placeholder order; a row of several samples
    (``pack_rows``) carries all their images in order, and `text_image_mask` matches the k-th image token of
    a row to its k-th image."""

    def __init__(self, tok: Tokenizer, tiling: TilingConfig):
        self.tok, self.tiling = tok, tiling

    def decode(self, raw: RawSample) -> Example:
        messages = conversation_messages(raw)
        names = sample_media(raw)
        check_placeholders(raw, messages, names, IMAGE_PLACEHOLDER, "image")
        tokens, labels = encode_conversation(self.tok, messages)
        return Example(tokens, labels, [tile_member(raw, name, self.tiling) for name in names], raw)

    def collate(self, examples: list[Example]) -> dict:
        return self.collate_rows([[e] for e in examples])

    def collate_rows(self, rows: list[list[Example]]) -> dict:
        """-> ``images``: an `ImageBatch` (B, I, ...) with I the most images of any row, at least one slot so
        an all-text micro-batch still has the image tensors' shape (no real image: cross-attention is skipped)."""
        images = [[image for e in row for image in e.media] for row in rows]
        collated = collate_tiled(images, max_images=max(1, *map(len, images)), cfg=self.tiling)
        return {"images": ImageBatch.from_collated(collated).trimmed()}


class VideoCaptionCodec:
    """key.mp4 + key.txt -> ``num_frames`` uniform frames through `media.video` + `vision.frames` tiling."""

    def __init__(self, tok: Tokenizer, tile_size: int, num_frames: int, fmt: str = "caption", prompt: str = ""):
        from vision.frames import video_tiling
        from media.video import VideoReader

        self.tok, self.fmt, self.prompt, self.num_frames = tok, fmt, prompt, num_frames
        self.tiling, self.reader = video_tiling(tile_size), VideoReader(timeout_s=None)

    def decode(self, raw: RawSample) -> Example:
        ext = next((e for e in VIDEO_EXTS if e in raw.members), None)
        if ext is None:
            raise BadSampleError(f"{raw.shard}: sample {raw.key} has no video (has {sorted(raw.members)})")
        tokens, labels = encode_sample(self.tok, video_input_id(self.tok), raw, self.fmt, self.prompt)
        return Example(tokens, labels, self.tiled(raw, ext), raw)

    def tiled(self, raw: RawSample, member: str):
        """The sample's video member ``key.<member>``: ``num_frames`` frames, tiled (a `BadSampleError`
        naming it when it does not decode)."""
        from media.video import VideoReadError
        from vision.frames import tile_frames

        try:
            frames = self.reader.sample(raw.members[member], self.num_frames, name=f"{raw.shard}:{raw.key}.{member}")
            return tile_frames(frames, self.tiling)
        except (VideoReadError, TilingError) as e:
            raise BadSampleError(f"{raw.shard}: sample {raw.key}: {e}") from e

    def collate(self, examples: list[Example]) -> dict:
        return self.collate_rows([[e] for e in examples])

    def collate_rows(self, rows: list[list[Example]]) -> dict:
        from adapters.video_adapter import VideoBatch
        from vision.frames import collate_videos

        return {"videos": VideoBatch.from_collated(collate_videos([[e.media for e in row] for row in rows])).trimmed()}


class VideoConversationCodec:
    """key.json meta ``conversations`` + key.0.mp4, key.1.mp4, ... -> a multi-turn chat example whose ``<|video|>``
    placeholders stand for the sample's videos in order (``data.format: conversation``, video kind): each video
    ``num_frames`` uniform frames, as `VideoCaptionCodec` reads them; text-only conversations mix in."""

    def __init__(self, tok: Tokenizer, tile_size: int, num_frames: int):
        self.tok, self.frames = tok, VideoCaptionCodec(tok, tile_size, num_frames)

    def decode(self, raw: RawSample) -> Example:
        messages = conversation_messages(raw)
        names = sample_media(raw, VIDEO_EXTS, "video")
        check_placeholders(raw, messages, names, VIDEO_PLACEHOLDER, "video")
        tokens, labels = encode_conversation(self.tok, messages, VIDEO_PLACEHOLDER)
        return Example(tokens, labels, [self.frames.tiled(raw, name) for name in names], raw)

    def collate(self, examples: list[Example]) -> dict:
        return self.collate_rows([[e] for e in examples])

    def collate_rows(self, rows: list[list[Example]]) -> dict:
        """-> ``videos``: a `VideoBatch` (B, V, ...), V the most videos of any row; none for an all-text batch."""
        from adapters.video_adapter import VideoBatch
        from vision.frames import collate_videos

        videos = [[video for e in row for video in e.media] for row in rows]
        if not any(videos):
            return {}
        return {"videos": VideoBatch.from_collated(collate_videos(videos)).trimmed()}


class SpeechCodec:
    """key.flac + key.txt -> 16 kHz mono wave + the ASR chat example (``prompt`` as the system turn; empty:
    the default English ASR prompt). Collates to `SpeechLlama.forward`'s keyword arguments."""

    def __init__(self, tok: Tokenizer, sample_rate: int, prompt: str = ""):
        from speech.adapter import asr_prompt

        self.tok, self.sample_rate = tok, sample_rate
        self.prompt = prompt or asr_prompt("English")

    def decode(self, raw: RawSample) -> Example:
        from speech.adapter import encode_speech_training_example
        from media.audio import AUDIO_EXTS, AudioReadError, load_audio

        ext = next((e for e in AUDIO_EXTS if e in raw.members), None)
        if ext is None:
            raise BadSampleError(f"{raw.shard}: sample {raw.key} has no audio (has {sorted(raw.members)})")
        try:
            audio = load_audio(raw.members[ext], self.sample_rate)
        except AudioReadError as e:
            raise BadSampleError(f"{raw.shard}: sample {raw.key}: {e}") from e
        tokens, labels = encode_speech_training_example(self.tok, self.prompt, sample_text(raw))
        return Example(tokens, labels, torch.from_numpy(np.asarray(audio.samples, dtype=np.float32)), raw)

    def collate(self, examples: list[Example]) -> dict:
        lengths = torch.tensor([len(e.media) for e in examples])
        waves = torch.zeros(len(examples), int(lengths.max()))
        for i, e in enumerate(examples):
            waves[i, : len(e.media)] = e.media
        return {"waves": waves, "wave_lengths": lengths,
                "token_lengths": torch.tensor([len(e.tokens) for e in examples])}


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
