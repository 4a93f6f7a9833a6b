"""The speech model's export: the ``speech`` kind of `common.export`.

    save_speech_checkpoint(model, "ckpt", tok.path); model = load_speech_checkpoint("ckpt")

``config.json`` (format + the `SpeechLlamaConfig`) + ``model.safetensors`` (the whole state dict, frozen
LM included) + ``tokenizer.model``: what the trainer's speech kind exports and ``scripts.demo_asr`` /
``scripts.eval_asr`` load. Loading is strict and shares its steps with the image model's
(`adapters.model_io.load_lm_model`): unknown or missing keys and weights raise `CheckpointError` naming
the file, another kind's or a foreign directory an `ExportFormatError` naming both formats.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.model_io import lm_model_state_dict, load_lm_model
from common.export import WEIGHTS, read_export, write_export
from speech.adapter import SpeechLlama, SpeechLlamaConfig
from speech.features import LogMel

KIND = "speech"


def save_speech_checkpoint(model: SpeechLlama, out_dir: str | Path,
                           tokenizer_path: str | Path | None = None) -> Path:
    """The export of ``model`` (frozen LM included) into ``out_dir``, with ``tokenizer.model`` when given."""
    return write_export(out_dir, KIND, model.cfg, lm_model_state_dict(model), tokenizer_path)


def load_speech_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> SpeechLlama:
    """Inverse of `save_speech_checkpoint`, strict. The model comes back in eval mode with the LM frozen."""
    _, meta, sd = read_export(path, (KIND,), config_cls=SpeechLlamaConfig)
    cfg = meta["config"]
    model = load_lm_model(SpeechLlama, cfg, sd, str(Path(path) / WEIGHTS), dtype)
    model.features = LogMel(cfg.features)  # its mel filters are buffers built from the config, not saved
    return model.eval()
