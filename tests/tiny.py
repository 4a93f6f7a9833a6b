"""Tiny models and tokenizers the tests build through the real factories (the ``tiny`` presets)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from adapters.chat import IGNORE_INDEX
from adapters.llama import build_llama
from adapters.multimodal import MultimodalConfig, MultimodalLlama, build_multimodal, multimodal_config
from adapters.tokenizer import Tokenizer
from adapters.tokenizer import build_tiny_tokenizer as _build_tiny_tokenizer
from adapters.video_adapter import VideoAdapterConfig
from speech.adapter import SpeechLlamaConfig, speech_llama_config
from synthetic.shapes import corpus_text


def build_tiny_tokenizer(out_dir: str | Path, n_merges: int = 120, texts: list[str] | None = None) -> Tokenizer:
    """`adapters.tokenizer.build_tiny_tokenizer` on ``texts``, by default the shapes-VQA strings."""
    return _build_tiny_tokenizer(out_dir, corpus_text() if texts is None else texts, n_merges)


def build_tiny_vqa_model(tok: Tokenizer, seed: int = 0) -> MultimodalLlama:
    """The untrained tiny image model, its LM's vocabulary sized to ``tok``."""
    torch.manual_seed(seed)
    cfg = multimodal_config("tiny")
    cfg = replace(cfg, lm=replace(cfg.lm, vocab_size=tok.n_words))
    return build_multimodal(cfg, build_llama(cfg.lm))


def tiny_video_config(tok: Tokenizer, num_frames: int = 16) -> MultimodalConfig:
    """The tiny video preset, frozen encoder; ``every=1`` since the tiny LM has only 2 image blocks."""
    cfg = multimodal_config("tiny", video=VideoAdapterConfig(max_frames=num_frames, every=1))
    return replace(cfg, lm=replace(cfg.lm, vocab_size=tok.n_words), train_vision=False)


def tiny_asr_config(tok: Tokenizer) -> SpeechLlamaConfig:
    """The tiny speech preset with the LM's vocabulary sized to ``tok``."""
    cfg = speech_llama_config("tiny")
    return replace(cfg, lm=replace(cfg.lm, vocab_size=tok.n_words))


def pad_examples(tok: Tokenizer, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) pairs -> right-padded (B, T) tensors (pad id / ignored labels)."""
    T = max(len(t) for t, _ in rows)
    tokens = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (t, lab) in enumerate(rows):
        tokens[i, : len(t)], labels[i, : len(lab)] = torch.tensor(t), torch.tensor(lab)
    return tokens, labels


def conversation_shards(shards: Path, tok_dir: Path, tile_size: int = 56, max_tiles: int = 2):
    """(samples, key.json metas, tokenizer, codec) of the conversation shards under ``shards`` (in order): a tiny
    tokenizer trained on their turns and the trainer's `ImageConversationCodec` to decode them."""
    import json

    from training.codecs import ImageConversationCodec
    from training.data import ShardStream
    from vision.tiling import TilingConfig

    raws = [r for shard in sorted(Path(shards).glob("shard_*.tar")) for r in ShardStream([shard], shuffle_buffer=1).epoch(0)]
    metas = [json.loads(r.members["json"])["meta"] for r in raws]
    tok = build_tiny_tokenizer(tok_dir, texts=[t["content"].replace("<|image|>", "") for m in metas
                                               for t in m["conversations"]])
    return raws, metas, tok, ImageConversationCodec(tok, TilingConfig(tile_size=tile_size, max_tiles=max_tiles))
