"""The BEST-RQ model of speech-encoder pre-training (Llama 3 sec. 8.1): its factory, parameter groups,
export and loaders. The training itself is the trainer's ``bestrq`` kind (`training.bestrq`):

    python -m scripts.train --config configs/run_bestrq_synthetic.yaml
    encoder = load_pretrained_encoder("runs/synthetic/bestrq/export")  # what a speech model loads

Outputs in ``out_dir``: the ``speech-encoder`` export of `common.export` (`save_pretrained`:
``config.json`` with the Conformer, BEST-RQ and log-mel configs, ``model.safetensors`` with the whole
`BestRQ` state, the encoder under ``encoder.``; `load_pretrained_encoder` reads the encoder alone,
`load_bestrq` the whole model) and, last, ``report.json`` (what the caller
reports: the ``bestrq`` kind writes its run config and per-step curves).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from adapters.checkpoint import load_state_dict_strict
from common.export import WEIGHTS, read_export, read_export_meta, write_export
from speech.bestrq import BestRQ, BestRQConfig
from speech.conformer import ConformerConfig, ConformerEncoder
from speech.features import LogMelConfig

KIND = "speech-encoder"  # the export kind of a pre-trained encoder (`common.export`)


# ---------------------------------------------------------------------------------------------- model


def build_bestrq(encoder: ConformerConfig, bestrq: BestRQConfig, features: LogMelConfig) -> BestRQ:
    """`BestRQ` around a fresh `ConformerEncoder`; the three configs must agree on mels and stacking."""
    if not encoder.n_mels == bestrq.n_mels == features.n_mels:
        raise ValueError(f"n_mels differ: encoder {encoder.n_mels}, bestrq {bestrq.n_mels}, "
                         f"features {features.n_mels}")
    if encoder.stack != bestrq.stack:
        raise ValueError(f"stack differs: encoder {encoder.stack}, bestrq {bestrq.stack}")
    return BestRQ(ConformerEncoder(encoder), dim=encoder.dim, cfg=bestrq)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices and conv kernels, none on biases and LayerNorm gains; each parameter in one group."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    assert len(decay) + len(rest) == sum(1 for p in model.parameters() if p.requires_grad)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def save_pretrained(model: BestRQ, features: LogMelConfig, out_dir: str | Path) -> Path:
    """The ``speech-encoder`` export into ``out_dir``: ``config.json`` (an `EncoderExportConfig`) +
    ``model.safetensors`` (the whole `BestRQ` state: the encoder under ``encoder.``, heads, quantizer)."""
    return write_export(out_dir, KIND, EncoderExportConfig(model.encoder.cfg, model.cfg, features),
                        model.state_dict())


def save_run(model: BestRQ, features: LogMelConfig, report: dict, out_dir: str | Path) -> dict:
    """`save_pretrained`, then ``report.json`` (with ``files`` added) last, as the completion marker."""
    out = save_pretrained(model, features, out_dir)
    report["files"] = {name: str(out / name) for name in
                       ("config.json", "model.safetensors", "report.json")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class EncoderExportConfig:
    """The ``config`` of a speech-encoder export: the three configs `build_bestrq` takes."""

    encoder: ConformerConfig
    bestrq: BestRQConfig
    features: LogMelConfig


def read_encoder_config(path: str | Path) -> EncoderExportConfig:
    """The configs of the speech-encoder export at ``path``, strictly: another format, unknown or missing
    keys, or a value a config rejects raise ``CheckpointError`` naming the file and the field."""
    return read_export_meta(path, (KIND,), config_cls=EncoderExportConfig)[1]["config"]


def load_pretrained_encoder(path: str | Path) -> ConformerEncoder:
    """The `ConformerEncoder` of the export `save_pretrained` wrote in ``path`` (eval mode, CPU). Strict:
    unknown or missing config keys or weights raise ``CheckpointError`` naming the file."""
    cfg, sd = _read_encoder_export(path)
    with torch.device("meta"):
        encoder = ConformerEncoder(cfg.encoder)
    encoder_sd = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    load_state_dict_strict(encoder, encoder_sd, f"{Path(path) / WEIGHTS} (encoder.*)")
    return encoder.eval()


def load_bestrq(path: str | Path) -> BestRQ:
    """The whole `BestRQ` (encoder, heads, quantizer buffers) of the export at ``path``, to resume."""
    cfg, sd = _read_encoder_export(path)
    model = build_bestrq(cfg.encoder, cfg.bestrq, cfg.features)
    load_state_dict_strict(model, sd, str(Path(path) / WEIGHTS))
    return model.eval()


def _read_encoder_export(path: str | Path) -> tuple[EncoderExportConfig, dict[str, Tensor]]:
    _, meta, sd = read_export(path, (KIND,), config_cls=EncoderExportConfig)
    return meta["config"], sd
