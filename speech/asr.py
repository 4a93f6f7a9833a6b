"""The tiny speech model the tests and the learning proof build (its export: `speech.model_io`).

The proof that the speech adapter learns (spoken digits, held-out WER) runs on the production road:
``python -m scripts.bench_learning speech`` (scripts/learning_speech.py).
"""

from __future__ import annotations

from dataclasses import replace

from adapters.tokenizer import Tokenizer
from speech.adapter import SpeechLlamaConfig, speech_llama_config


def tiny_asr_config(tok: Tokenizer) -> SpeechLlamaConfig:
    """The tiny speech preset with the LM's vocabulary sized to ``tok``."""
    cfg = speech_llama_config("tiny")
    return replace(cfg, lm=replace(cfg.lm, vocab_size=tok.n_words))
