"""Sample codecs: a raw shard sample -> an `Example` (tokens, labels, media), and a list of them -> the model's
keyword arguments. One codec per (kind, data.format); `training.spec` picks it, `training.data.TrainBatches` runs it.

Formats (see `training.config.DataConfig.format`): caption / chat / qa pairs of one image or video
(`ImageCaptionCodec`, `VideoCaptionCodec`), multi-turn conversations with ``<|image|>`` / ``<|video|>``
placeholders for the sample's media members ``key.0.jpg``, ``key.1.jpg``, ... (`ImageConversationCodec`,
`VideoConversationCodec`), and speech's ASR chat examples (`SpeechCodec`); the text, clip, bestrq and
preference kinds keep their codecs beside their models (`training.text_lm`, `training.clip`,
`training.bestrq`, `training.preference`). A sample a codec cannot use raises `BadSampleError` naming its shard,
key and field.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from adapters.chat import (IGNORE_INDEX, Message, encode_header, encode_training_example, image_input_id,
                           video_input_id)
from adapters.multimodal import ImageBatch
from adapters.tokenizer import Tokenizer
from common.conversation import (IMAGE_PLACEHOLDER, PLACEHOLDERS, VIDEO_PLACEHOLDER, ConversationError,
                                 check_conversation)
from media.image import ImageLoadError, load_image_bytes
from training.data import BadSampleError, Example, RawSample
from vision.tiling import TiledImage, TilingConfig, TilingError, collate_tiled, tile_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


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
