"""Our speech checkpoint format, and the tiny speech model the tests build.

    save_speech_checkpoint(model, "ckpt", tok.path); model = load_speech_checkpoint("ckpt")

A checkpoint is ``config.json`` (format + the `SpeechLlamaConfig`) + ``model.safetensors`` (the whole state
dict, frozen LM included) + ``tokenizer.model``: what the trainer's speech kind exports and
``scripts.demo_asr`` / ``scripts.eval_asr`` load. Loading is strict (unknown or missing keys and weights
raise `CheckpointError` naming the file).

The proof that the speech adapter learns (spoken digits, held-out WER) runs on the production road:
``python -m scripts.bench_learning speech`` (scripts/learning_speech.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from adapters.checkpoint import (CheckpointError, cast_floats, load_state_dict_strict, read_json,
                                 read_safetensors_file)
from common.config import config_to_dict, dataclass_from_dict
from adapters.llama import Llama, rope_frequencies
from adapters.model_io import write_checkpoint_dir
from adapters.tokenizer import Tokenizer
from speech.adapter import SpeechLlama, SpeechLlamaConfig, speech_llama_config
from speech.features import LogMel
FORMAT = "llama3-speech/1"


def tiny_asr_config(tok: Tokenizer) -> SpeechLlamaConfig:
    """The tiny speech preset with the LM's vocabulary sized to ``tok``."""
    cfg = speech_llama_config("tiny")
    return replace(cfg, lm=replace(cfg.lm, vocab_size=tok.n_words))


def speech_config_from_dict(d: dict, where: str = "config.json") -> SpeechLlamaConfig:
    """Strict inverse of ``config_to_dict`` on a `SpeechLlamaConfig`; errors name ``where`` and the key."""
    return dataclass_from_dict(SpeechLlamaConfig, d, where)


def save_speech_checkpoint(model: SpeechLlama, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``config.json`` (format + the `SpeechLlamaConfig` as a dict) + ``model.safetensors`` (the whole
    state dict, frozen LM included) + ``tokenizer.model`` when given. Returns ``out_dir``."""
    meta = {"format": FORMAT, "config": config_to_dict(model.cfg)}
    return write_checkpoint_dir(out_dir, meta, model.state_dict(), tokenizer_path)


def load_speech_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> SpeechLlama:
    """Inverse of `save_speech_checkpoint`, strict: unknown or missing config keys or weights raise
    ``CheckpointError`` naming the file. The model comes back in eval mode with the LM frozen."""
    path = Path(path)
    cfg_file = path / "config.json"
    meta = read_json(cfg_file)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_file}: expected an object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format {meta.get('format')!r} is not {FORMAT!r}")
    unknown = set(meta) - {"format", "config"}
    if unknown:
        raise CheckpointError(f"{cfg_file}: unknown keys {sorted(unknown)}")
    cfg = speech_config_from_dict(meta.get("config"), str(cfg_file))
    weights = path / "model.safetensors"
    sd = read_safetensors_file(weights)
    sd = cast_floats(sd, dtype)
    with torch.device("meta"):
        model = SpeechLlama(cfg, Llama(cfg.lm))
    load_state_dict_strict(model, sd, str(weights))
    # Non-persistent buffers (derived from the config, not saved) stay on the meta device: rebuild them.
    model.lm.inv_freq = rope_frequencies(cfg.lm.head_dim, cfg.lm.rope_theta, cfg.lm.rope_scaling)
    model.features = LogMel(cfg.features)
    model.lm.freeze()
    return model.eval()
