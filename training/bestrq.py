"""The ``bestrq`` kind: BEST-RQ self-supervised pre-training of the speech encoder (Llama 3 sec. 8.1).

The model is `speech.pretrain.build_bestrq`: a `ConformerEncoder` of ``model.preset`` ("tiny", "1B") under
the frozen random-projection quantizer and one head per codebook of ``model.bestrq`` (`BestRQConfig`: 16
codebooks of 8,192 codes, the paper's masking). It trains on the audio shards the audio curation writes
(``key.flac``, or any of `media.audio.AUDIO_EXTS`; a transcript, if any, is not read): each clip is
decoded to 16 kHz mono and, when longer than ``data.crop_seconds``, randomly cropped to it (sec. 8.1
crops utterances over 60 s to 6,000 frames). The crop's offset is drawn from (``data.seed``, epoch, shard
file name, key), so a resumed run crops every clip as the uninterrupted one did, and each epoch crops
anew. A micro-batch is ``data.max_rows`` clips, right-padded; log-mel (`speech.features.LogMel`, fp32
whatever the engine's dtype) runs inside the task, on the engine's device. Masks and noise come from the
global torch RNG, which the trainer's checkpoints save and restore.

The task returns the loss and, as metrics the trainer logs per step (``losses.jsonl``, tensorboard),
masked-prediction ``accuracy``, ``target_perplexity`` (near 1: the quantizer sees constant inputs) and
``masked_fraction``. Parameter groups: `speech.pretrain.param_groups` (decay on matrices only).

Export (``run_dir/export``): `speech.pretrain.save_run`, i.e. ``encoder.safetensors`` +
``encoder_config.json`` + ``bestrq.safetensors`` + ``report.json`` (the run config, the per-step curves
read back from ``losses.jsonl``, first / last loss and accuracy beside ``chance_loss`` = ln(codebook
size)). The speech kind's ``model.encoder_from`` takes that directory.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from common.config import config_to_dict
from media.audio import AUDIO_EXTS, SAMPLE_RATE, AudioReadError, load_audio
from speech.bestrq import BestRQ
from speech.features import LogMel, LogMelConfig
from training.data import BadSampleError, Example, RawSample

if TYPE_CHECKING:
    from training.config import RunConfig
    from training.spec import TrainSpec

FEATURES = LogMelConfig()  # the speech kind's front end: 80 log-mel bins at 16 kHz, 10 ms hop
METRICS = ("accuracy", "target_perplexity", "masked_fraction")  # BestRQ outputs logged beside the loss


def build_bestrq_model(cfg: "RunConfig", tok: None = None) -> BestRQ:
    from speech.conformer import conformer_config
    from speech.pretrain import build_bestrq
    from training.spec import TrainError

    torch.manual_seed(cfg.model.seed)
    try:
        return build_bestrq(conformer_config(cfg.model.preset), cfg.model.bestrq, FEATURES)
    except ValueError as e:  # an unknown preset, or mels / stacking that differ from the Conformer's
        raise TrainError(f"model.preset {cfg.model.preset!r} / model.bestrq: {e}") from None


class BestRQTask(nn.Module):
    """Log-mel + `BestRQ`; ``tokens`` / ``labels`` (the trainer's uniform arguments) are empty."""

    def __init__(self, model: BestRQ):
        super().__init__()
        self.model, self.logmel = model, LogMel(FEATURES)

    def forward(self, tokens: Tensor, labels: Tensor, waves: Tensor, wave_lengths: Tensor) -> dict[str, Tensor]:
        """waves (B, T) float at 16 kHz, right-padded; wave_lengths (B,) samples."""
        mel, frames = self.logmel(waves.float(), wave_lengths)
        out = self.model(mel, frames)
        return {"loss": out["loss"], **{k: out[k] for k in METRICS}}


class BestRQCodec:
    """An audio member -> (T,) float32 wave at 16 kHz, at most ``crop_seconds`` long (a random crop)."""

    def __init__(self, crop_seconds: float, seed: int):
        self.crop = round(crop_seconds * SAMPLE_RATE)
        if self.crop < 1:
            raise ValueError(f"data.crop_seconds {crop_seconds} is less than one sample at {SAMPLE_RATE} Hz")
        self.seed = seed

    def decode(self, raw: RawSample) -> Example:
        ext = next((e for e in AUDIO_EXTS if e in raw.members), None)
        if ext is None:
            raise BadSampleError(f"{raw.shard}: sample {raw.key} has no audio ({', '.join(AUDIO_EXTS)}; "
                                 f"has {sorted(raw.members)})")
        try:
            x = load_audio(raw.members[ext], SAMPLE_RATE, max_seconds=None).samples
        except AudioReadError as e:
            raise BadSampleError(f"{raw.shard}: sample {raw.key}.{ext}: {e}") from e
        if len(x) > self.crop:
            # Seeded by the sample, not by a running generator: a resume that re-decodes a held-back sample
            # crops it as the uninterrupted run did. The shard's name, not its path: the shards may move.
            name = zlib.crc32(f"{Path(raw.shard).name}:{raw.key}".encode())
            start = int(np.random.default_rng([self.seed, raw.epoch, name]).integers(0, len(x) - self.crop + 1))
            x = x[start : start + self.crop]
        return Example([], [], torch.from_numpy(np.asarray(x, dtype=np.float32)), raw)

    def collate(self, examples: list[Example]) -> dict:
        """-> waves (B, max T) zero right-padded, wave_lengths (B,)."""
        waves = nn.utils.rnn.pad_sequence([e.media for e in examples], batch_first=True)
        return {"waves": waves, "wave_lengths": torch.tensor([len(e.media) for e in examples])}


def bestrq_codec(cfg: "RunConfig", tok: None, model: nn.Module) -> BestRQCodec:
    return BestRQCodec(cfg.data.crop_seconds, cfg.data.seed)


def bestrq_param_groups(cfg: "RunConfig", model: nn.Module) -> list[dict]:
    from speech.pretrain import param_groups

    return [{**g, "lr": cfg.optim.lr} for g in param_groups(model, cfg.optim.weight_decay)]


def run_report(model: BestRQ, cfg: "RunConfig") -> dict:
    """The export's report: the run config, the per-step curves of ``run_dir/losses.jsonl`` (every step of
    the run, a resumed one included), and first / last loss and accuracy (means over 5 steps)."""
    from training.spec import TrainError

    log = Path(cfg.train.run_dir) / "losses.jsonl"
    try:
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{log}: not readable for the BEST-RQ report ({e})") from None
    curves = {k: [r[k] for r in records] for k in ("loss", *METRICS)}
    k = min(5, len(records))
    return {"config": config_to_dict(cfg), "encoder_params": model.encoder.num_params(), "steps": len(records),
            "first_loss": float(np.mean(curves["loss"][:k])), "last_loss": float(np.mean(curves["loss"][-k:])),
            "first_accuracy": float(np.mean(curves["accuracy"][:k])),
            "last_accuracy": float(np.mean(curves["accuracy"][-k:])),
            "chance_loss": math.log(model.cfg.codebook_size), **curves}


def export_bestrq(model: nn.Module, cfg: "RunConfig", out: Path) -> Path:
    from speech.pretrain import save_run

    save_run(model, FEATURES, run_report(model, cfg), out)
    return out


def bestrq_spec() -> "TrainSpec":
    """The registry row of `training.spec.SPECS`. No text is read: the default ``data.format`` only."""
    from training.spec import TrainSpec, task_of

    return TrainSpec("bestrq", build_bestrq_model, task_of(BestRQTask), bestrq_codec, bestrq_param_groups, export_bestrq,
                     formats=("caption",), needs_tokenizer=False)
