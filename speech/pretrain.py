"""BEST-RQ pre-training of the speech encoder on audio shards or a folder of audio files (Llama 3 sec. 8.1).

    clips = AudioClips.from_shards("shards/")          # or from_folder("audio/"), from_arrays([...])
    cfg = PretrainConfig(preset="tiny", steps=200, bestrq=BestRQConfig(n_codebooks=4, codebook_size=256))
    report = pretrain_encoder(clips, cfg, "runs/encoder")
    encoder = load_pretrained_encoder("runs/encoder")   # a ConformerEncoder, what a speech model loads

Data. `AudioClips` indexes every ``*.flac`` member of webdataset tars (``data_curation.audio_shards``
writes ``shard_NNNNN.tar`` with ``key.flac`` at 16 kHz mono) or every audio file under a folder. Indexing
reads each tar once, sequentially, and checks every member's header with libsndfile (its duration goes into
the report); afterwards a clip is read by seeking to its byte offset, so memory holds the index only.
Nothing is skipped: an unreadable tar, member or file raises `AudioSourceError` naming it (the tar and the
member), at indexing or when the clip is first decoded.

Batches. Clips are drawn without replacement, reshuffled every epoch, decoded to 16 kHz mono
(`speech.audio.load_audio`) and right-padded; log-mel by `speech.features.LogMel`; `speech.bestrq.BestRQ`
normalises per utterance, masks and computes the loss. A clip over ``max_seconds`` is randomly cropped to
it: sec. 8.1 crops utterances over 60 s to 6,000 frames. The whole clip is decoded before the crop, so
split hour-long recordings first (the shard builder already drops clips over 60 s).

Optimisation: AdamW (betas 0.9 / 0.98, weight decay on matrices only), linear warmup then cosine decay to
0, gradient clipping. The paper gives no BEST-RQ optimiser settings; the defaults here are common choices.

Outputs in ``out_dir``: ``encoder.safetensors`` (the `ConformerEncoder` state dict alone),
``encoder_config.json`` (format tag + the Conformer, BEST-RQ and log-mel configs), ``bestrq.safetensors``
(the whole `BestRQ` state: encoder, heads, frozen quantizer buffers; `load_bestrq` rebuilds it) and, last,
``report.json`` (config, loss / accuracy per step, data and timing figures).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from adapters.checkpoint import CheckpointError, load_state_dict_strict, read_json, read_safetensors_file
from common.config import config_to_dict, dataclass_from_dict
from common.tar import expand_shards, has_tar_end_marker
from speech.audio import AUDIO_EXTS, SAMPLE_RATE, AudioReadError, load_audio
from speech.bestrq import BestRQ, BestRQConfig
from speech.conformer import ConformerConfig, ConformerEncoder, conformer_config
from speech.features import LogMel, LogMelConfig

FORMAT = "llama3-speech-encoder/1"
SHARD_AUDIO_EXT = ".flac"  # the audio member of a webdataset sample (data_curation.audio_shards)


class AudioSourceError(ValueError):
    """Pre-training audio that cannot be used: a missing or empty input, an unreadable tar, member or file.
    The message names the path (``shard.tar:member`` for a tar member)."""


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ClipRef:
    """One clip: a whole file (``offset`` None), ``size`` bytes at ``offset`` in a tar, or samples."""

    name: str  # in messages: a path, or "shard.tar:key.flac"
    duration_s: float
    path: Path | None = None
    offset: int | None = None
    size: int = 0
    samples: np.ndarray | None = None  # (T,) float32 at 16 kHz


class AudioClips(Sequence):
    """An index of clips; ``load(i, max_seconds, rng)`` -> (T,) float32 at 16 kHz, randomly cropped."""

    def __init__(self, clips: list[ClipRef], source: str, empty: str = "no audio clips"):
        if not clips:
            raise AudioSourceError(f"{source}: {empty}")
        self.clips, self.source = clips, source

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> ClipRef:
        return self.clips[i]

    @property
    def hours(self) -> float:
        return sum(c.duration_s for c in self.clips) / 3600

    @classmethod
    def from_shards(cls, spec: str | Path | Sequence[str | Path]) -> AudioClips:
        """A folder of ``*.tar`` shards, one ``.tar``, a glob / brace pattern, or a list of tars."""
        if isinstance(spec, (str, Path)) and Path(spec).is_dir():
            shards = sorted(Path(spec).glob("*.tar"))
            if not shards:
                raise AudioSourceError(f"{spec}: no *.tar shards in this folder")
        else:
            shards = expand_shards(spec, AudioSourceError)
        clips = [clip for shard in shards for clip in _index_shard(shard)]
        return cls(clips, str(spec), f"no {SHARD_AUDIO_EXT} member in {len(shards)} shard(s)")

    @classmethod
    def from_folder(cls, folder: str | Path) -> AudioClips:
        """Every audio file (flac, wav, ogg, opus, mp3) under ``folder``, recursively, in path order."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AudioSourceError(f"{folder}: not a folder")
        exts = {f".{e}" for e in AUDIO_EXTS}
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file())
        clips = [ClipRef(str(f), _duration(f, str(f)), path=f) for f in files]
        return cls(clips, str(folder), f"no audio files ({', '.join(sorted(exts))}) in this folder")

    @classmethod
    def from_arrays(cls, waves: Sequence[np.ndarray]) -> AudioClips:
        """Clips already decoded: (T,) float arrays at 16 kHz, T >= 1."""
        clips = [ClipRef(f"<array {i}>", len(w) / SAMPLE_RATE, samples=np.asarray(w, np.float32))
                 for i, w in enumerate(waves)]
        bad = next((c for c in clips if c.samples.ndim != 1 or not len(c.samples)), None)
        if bad is not None:
            raise AudioSourceError(f"{bad.name}: shape {bad.samples.shape}, expected (T,) with T >= 1")
        return cls(clips, "<arrays>")

    def load(self, i: int, max_seconds: float | None, rng: np.random.Generator) -> np.ndarray:
        """Clip ``i`` as (T,) float32 at 16 kHz; longer than ``max_seconds``: a random crop of that length."""
        c = self.clips[i]
        if c.samples is not None:
            x = c.samples
        else:
            try:
                x = load_audio(c.path if c.offset is None else _read_member(c), max_seconds=None).samples
            except AudioReadError as e:
                raise AudioSourceError(f"{c.name}: {e.reason}") from None
        n = len(x) if max_seconds is None else round(max_seconds * SAMPLE_RATE)
        if len(x) <= n:
            return x
        start = int(rng.integers(0, len(x) - n + 1))
        return x[start : start + n]


def _duration(src: Path | bytes, name: str) -> float:
    """Seconds from the header; an unreadable one raises AudioSourceError naming ``name``."""
    try:
        info = sf.info(io.BytesIO(src) if isinstance(src, bytes) else str(src))
    except Exception as e:  # libsndfile raises several error types
        raise AudioSourceError(f"{name}: not readable as audio ({type(e).__name__}: {e})") from None
    if info.frames <= 0:
        raise AudioSourceError(f"{name}: no audio samples (0 frames)")
    return info.frames / info.samplerate


def _index_shard(shard: Path) -> list[ClipRef]:
    """The ``.flac`` members of one tar, headers checked; any damage raises naming the tar and member."""
    clips, last = [], "(start of shard)"
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for info in tf:
                last = info.name
                if not (info.isfile() and info.name.lower().endswith(SHARD_AUDIO_EXT)):
                    continue
                member = tf.extractfile(info)
                data = member.read() if member is not None else b""
                name = f"{shard}:{info.name}"
                clips.append(ClipRef(name, _duration(data, name), path=shard, offset=info.offset_data,
                                     size=len(data)))
            end = tf.offset
    except FileNotFoundError:
        raise AudioSourceError(f"{shard}: shard not found") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        msg = f"{shard}: unreadable or truncated tar at or after member {last} ({e})"
        raise AudioSourceError(msg) from None
    if not has_tar_end_marker(shard, end):  # tarfile stops silently at a cut or garbage header
        raise AudioSourceError(f"{shard}: truncated or corrupt tar after member {last} "
                               "(no end-of-archive marker)")
    return clips


def _read_member(c: ClipRef) -> bytes:
    with open(c.path, "rb") as f:
        f.seek(c.offset)
        data = f.read(c.size)
    if len(data) != c.size:
        raise AudioSourceError(f"{c.name}: {len(data)} of {c.size} bytes left (the tar changed since "
                               "indexing)")
    return data


def shuffled_indices(n: int, rng: np.random.Generator) -> Iterator[int]:
    """0..n-1 in a fresh random order every epoch, forever."""
    while True:
        yield from rng.permutation(n).tolist()


def pad_waves(waves: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """(T_i,) arrays -> (B, max T_i) float32, zero right-padded, and (B,) lengths."""
    lengths = torch.tensor([len(w) for w in waves])
    return nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True), lengths


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    preset: str = "1B"  # speech.conformer preset ("tiny" for tests and CPU runs)
    steps: int = 10_000
    batch_size: int = 8
    lr: float = 5e-4
    warmup: int = 1000  # steps of linear warmup, then cosine decay to 0 at `steps`
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    seed: int = 0  # init, clip order and crops, masks and noise (the quantizer has BestRQConfig.seed)
    max_seconds: float = 60.0  # random crop of longer clips: 6,000 frames (sec. 8.1)
    log_every: int = 50
    bestrq: BestRQConfig = field(default_factory=BestRQConfig)
    features: LogMelConfig = field(default_factory=LogMelConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup < 0 or self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"PretrainConfig: need warmup >= 0, lr > 0, weight_decay >= 0, grad_clip >= 0; "
                             f"got {self.warmup}, {self.lr}, {self.weight_decay}, {self.grad_clip}")
        if not self.max_seconds * SAMPLE_RATE >= 1:
            raise ValueError(f"PretrainConfig.max_seconds must be > 0, got {self.max_seconds!r}")
        if self.features.sample_rate != SAMPLE_RATE:
            raise ValueError(f"PretrainConfig.features.sample_rate must be {SAMPLE_RATE}, the decoding rate")


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


# ------------------------------------------------------------------------------------------- training


def train_bestrq(source: AudioClips | Sequence[np.ndarray], cfg: PretrainConfig, progress: bool = True,
                 device: str | torch.device | None = None) -> tuple[BestRQ, dict]:
    """Train `BestRQ` on ``source`` for ``cfg.steps``; returns the model (eval mode, on ``device``: default
    cuda when available) and the report (see `pretrain_encoder`)."""
    clips = source if isinstance(source, AudioClips) else AudioClips.from_arrays(source)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model = build_bestrq(conformer_config(cfg.preset), cfg.bestrq, cfg.features).to(device).train()
    logmel = LogMel(cfg.features).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg))
    rng = np.random.default_rng(cfg.seed)
    order = shuffled_indices(len(clips), rng)
    g = torch.Generator().manual_seed(cfg.seed)  # CPU: the same masks on every device
    curves = {k: [] for k in ("loss", "accuracy", "target_perplexity", "masked_fraction")}
    log, seen_s, data_s, start = [], 0.0, 0.0, time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="BEST-RQ", disable=not progress, mininterval=2)
    for step in bar:
        t0 = time.perf_counter()
        waves = [clips.load(next(order), cfg.max_seconds, rng) for _ in range(cfg.batch_size)]
        wave, lengths = pad_waves(waves)
        seen_s += lengths.sum().item() / SAMPLE_RATE
        data_s += time.perf_counter() - t0
        mel, frames = logmel(wave.to(device), lengths.to(device))
        out = model(mel, frames, generator=g)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"step {step}: BEST-RQ loss is {out['loss'].item()}")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = opt.param_groups[0]["lr"]  # this step's
        opt.step()
        sched.step()
        for k, values in curves.items():
            values.append(round(out[k].item(), 5))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            window = {k: round(float(np.mean(v[-cfg.log_every:])), 4) for k, v in curves.items()}
            log.append({"step": step + 1, **window, "lr": lr})
            bar.set_postfix(loss=f"{window['loss']:.3f}", acc=f"{window['accuracy']:.3f}")
            if progress:
                tqdm.write(json.dumps(log[-1]), file=sys.stderr)
    seconds = time.perf_counter() - start
    report = build_report(cfg, clips, model, curves, log, clips_seen=cfg.steps * cfg.batch_size,
                          seen_s=seen_s, data_s=data_s, seconds=seconds, device=device)
    return model.eval(), report


def lr_multiplier(cfg: PretrainConfig):
    """LR multiplier of step s (0-based): linear warmup over ``cfg.warmup`` steps, cosine decay to 0 at
    ``cfg.steps``; a `LambdaLR` lambda, shared by the single-process and the DeepSpeed loops."""
    warmup = max(cfg.warmup, 1)
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))


def build_report(cfg: PretrainConfig, clips: AudioClips, model: BestRQ, curves: dict[str, list[float]],
                 log: list[dict], *, clips_seen: int, seen_s: float, data_s: float, seconds: float,
                 device: str | torch.device) -> dict:
    """The report of a run (see `pretrain_encoder`): ``curves`` hold one value per step."""
    k = min(5, len(curves["loss"]))
    return {
        "format": FORMAT, "config": dataclasses.asdict(cfg), "device": str(device),
        "encoder_params": model.encoder.num_params(),
        "clips": len(clips), "audio_hours": round(clips.hours, 4), "source": clips.source,
        "steps": cfg.steps, "clips_seen": clips_seen, "hours_seen": round(seen_s / 3600, 4),
        "seconds": round(seconds, 2), "data_seconds": round(data_s, 2), "seed": cfg.seed,
        "first_loss": round(float(np.mean(curves["loss"][:k])), 4),
        "last_loss": round(float(np.mean(curves["loss"][-k:])), 4),
        "first_accuracy": round(float(np.mean(curves["accuracy"][:k])), 4),
        "last_accuracy": round(float(np.mean(curves["accuracy"][-k:])), 4),
        "chance_loss": round(math.log(cfg.bestrq.codebook_size), 4),
        "log": log, **curves,
    }


def save_pretrained(model: BestRQ, features: LogMelConfig, out_dir: str | Path) -> Path:
    """``encoder.safetensors`` + ``encoder_config.json`` + ``bestrq.safetensors`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "encoder": config_to_dict(model.encoder.cfg),
            "bestrq": config_to_dict(model.cfg), "features": config_to_dict(features)}
    (out / "encoder_config.json").write_text(json.dumps(meta, indent=2))
    for name, module in (("encoder", model.encoder), ("bestrq", model)):
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                  str(out / f"{name}.safetensors"))
    return out


def pretrain_encoder(source: AudioClips | Sequence[np.ndarray], cfg: PretrainConfig, out_dir: str | Path,
                     progress: bool = True, device: str | torch.device | None = None) -> dict:
    """Train (`train_bestrq`), save (`save_pretrained`) and write ``report.json`` last; returns the report:
    the resolved config, per-step ``loss`` / ``accuracy`` / ``target_perplexity`` / ``masked_fraction``,
    ``log`` (their means every ``log_every`` steps, with the learning rate), first / last loss and accuracy
    (means over 5 steps) beside ``chance_loss`` = ln(codebook_size), clips and hours in the source and seen,
    seconds (``data_seconds`` of them reading and decoding audio), device, seed and the files written."""
    model, report = train_bestrq(source, cfg, progress=progress, device=device)
    return save_run(model, cfg.features, report, out_dir)


def save_run(model: BestRQ, features: LogMelConfig, report: dict, out_dir: str | Path) -> dict:
    """`save_pretrained`, then ``report.json`` (with ``files`` added) last, as the completion marker."""
    out = save_pretrained(model, features, out_dir)
    report["files"] = {name: str(out / name) for name in
                       ("encoder.safetensors", "encoder_config.json", "bestrq.safetensors", "report.json")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


# ------------------------------------------------------------------------------------------- loading


def _config(cls, d, where: str):
    """``cls(**d)`` with exactly ``cls``'s fields (our own file: every field is written, none defaulted),
    read by the strict reader (types, bounds); anything else is a CheckpointError naming ``where``."""
    if isinstance(d, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise CheckpointError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    return dataclass_from_dict(cls, d, where)


def read_encoder_config(path: str | Path) -> tuple[ConformerConfig, BestRQConfig, LogMelConfig]:
    """The configs of ``path/encoder_config.json``, strictly: a wrong format tag, unknown or missing keys,
    or a value a config rejects raise ``CheckpointError`` naming the file and the section."""
    cfg_file = Path(path) / "encoder_config.json"
    meta = read_json(cfg_file)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_file}: expected an object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format {meta.get('format')!r} is not {FORMAT!r}")
    sections = {"encoder": ConformerConfig, "bestrq": BestRQConfig, "features": LogMelConfig}
    unknown = sorted(set(meta) - {"format", *sections})
    if unknown:
        raise CheckpointError(f"{cfg_file}: unknown keys {unknown}")
    return tuple(_config(cls, meta.get(key), f"{cfg_file}: {key}") for key, cls in sections.items())


def load_pretrained_encoder(path: str | Path) -> ConformerEncoder:
    """The `ConformerEncoder` saved by `pretrain_encoder` in ``path`` (eval mode, CPU). Strict: unknown or
    missing config keys or weights raise ``CheckpointError`` naming the file."""
    encoder_cfg, _, _ = read_encoder_config(path)
    weights = Path(path) / "encoder.safetensors"
    sd = read_safetensors_file(weights)
    with torch.device("meta"):
        encoder = ConformerEncoder(encoder_cfg)
    load_state_dict_strict(encoder, sd, str(weights))
    return encoder.eval()


def load_bestrq(path: str | Path) -> BestRQ:
    """The whole `BestRQ` (encoder, heads, quantizer buffers) from ``path/bestrq.safetensors``, to resume."""
    encoder_cfg, bestrq_cfg, features_cfg = read_encoder_config(path)
    weights = Path(path) / "bestrq.safetensors"
    sd = read_safetensors_file(weights)
    model = build_bestrq(encoder_cfg, bestrq_cfg, features_cfg)
    load_state_dict_strict(model, sd, str(weights))
    return model.eval()
