"""The audio shard builder: speech-transcript pairs -> per-sample checks + VAD -> webdataset shards.

Inputs come through the shared readers: a folder of audio files with sidecar transcripts (``x.wav`` /
``x.flac`` / ``x.ogg`` / ``x.opus`` / ``x.mp3`` + ``x.txt``, or ``x.json`` with ``text_key``), a JSONL /
parquet manifest (``{"audio": path, "text": ...}``; paths relative to the manifest, inside its folder unless
``allow_outside_root``), or webdataset tars (``key.flac`` + ``key.txt``; a ``.tar``, glob or brace pattern). Stages, in order, each
dropping or failing a sample with a reason (``data_curation.records``): transcript present -> decode
(``media.audio.load_audio``: mono, 16 kHz; an unreadable file, or a WAV whose header declares more audio
than it holds, is an error naming it) -> duration (``min_duration_s`` .. ``max_duration_s``, the whole file's
length from its header: a longer clip is dropped, never cut, since the transcript is of the whole clip, and
only its first ``max_duration_s`` are ever decoded) -> silence (RMS below ``silence_db``) -> clipping (share of full-scale samples above
``max_clipped_fraction``) -> VAD (``data_curation.vad``: speech fraction above ``vad.threshold``, 0.7).
No global pass, so each chunk of ``samples_per_shard`` inputs becomes its shard directly, as in
``video_shards``; both run through ``shard_jobs``, with the same files, resume rule and report:

* ``shard_i.tar``: ``key.flac`` (16 kHz mono 16-bit FLAC of the decoded audio), ``key.txt`` (the transcript),
  ``key.json`` (duration, source rate / channels, RMS, clipped fraction, VAD score, mean speech
  probability and speech segments, the input's other metadata);
* ``shard_i.parquet``: a status row (ok / dropped / error, stage, reason, measurements) for every input of
  chunk ``i``; ``shard_i_stats.json``: its counts, written last, the resume marker;
* ``report.json`` and ``report/*.png``: counts per stage and reason, duration / VAD score / level statistics.

A chunk's input files are held in a worker's memory while it is processed (``samples_per_shard`` x average
file size, one chunk per worker; the chunks waiting sit in Ray's object store, spilled to disk past its
memory): 500 clips of 10 s 16-bit WAV are about 160 MB.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf

from common.config import config_to_dict, dataclass_from_dict, read_yaml_mapping
from data_curation.curation_config import CURATION_YAML, ConfigError, check_job_fields
from data_curation.input_files import DEFAULT_MAX_AUDIO_BYTES, CurationInputError
from data_curation.readers import read_folder, read_manifest
from data_curation.records import Sample
from data_curation.engine import StepClock
from data_curation.shard_jobs import (BuildResult, StageSetupError, _atomic_write, _summary, report_head,
                                      run_shard_job, write_status_shard)
from data_curation.vad import VadConfig
from data_curation.wds_reader import read_webdataset
from media.audio import AUDIO_EXTS, SAMPLE_RATE
from media.tar import is_pattern


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AudioCurationConfig:
    samples_per_shard: int = 500
    workers: int = 2
    audio_key: str = "audio"  # manifest column holding the audio path (relative to the manifest) or bytes
    text_key: str = "text"  # manifest column / sidecar .json field holding the transcript
    max_sample_bytes: int = DEFAULT_MAX_AUDIO_BYTES  # the reader's cap on one sample's bytes (a chunk is in memory)
    allow_outside_root: bool = False  # manifest rows / folder symlinks may name files outside the input folder
    min_duration_s: float = 0.5
    max_duration_s: float = 60.0  # the paper's longest speech segment (sec. 8); longer clips are dropped
    silence_db: float = -60.0  # RMS in dBFS below which a clip is silent (media.audio.SILENCE_DB)
    max_clipped_fraction: float = 0.001  # share of samples at full scale (|x| >= 0.999) above which: dropped
    vad: VadConfig = field(default_factory=VadConfig)

    def __post_init__(self) -> None:
        check_job_fields(self)
        if not 0 <= self.min_duration_s < self.max_duration_s:
            raise ConfigError(f"need 0 <= min_duration_s < max_duration_s, got {self.min_duration_s}, "
                              f"{self.max_duration_s}")
        if not 0 <= self.max_clipped_fraction <= 1:
            raise ConfigError(f"max_clipped_fraction: {self.max_clipped_fraction} is not in [0, 1]")


def load_audio_config(path: str | Path | None, overrides: dict | None = None) -> AudioCurationConfig:
    """Read ``audio_curation.yaml`` (None: all defaults); ``overrides`` is merged over the top level.
    Unknown keys, at any level, are a ``ConfigError`` naming them; ``vad: null`` disables the VAD."""
    where = "config" if path is None else str(path)
    data = {**(read_yaml_mapping(path, ConfigError) if path is not None else {}), **(overrides or {})}
    return dataclass_from_dict(AudioCurationConfig, data, where, CURATION_YAML)


# --------------------------------------------------------------------------------------------- readers


def open_audio_input(spec: str | Path, *, audio_key: str = "audio", text_key: str = "text",
                     max_sample_bytes: int = DEFAULT_MAX_AUDIO_BYTES,
                     allow_outside_root: bool = False) -> Iterator[Sample]:
    """A folder of audio files with sidecar transcripts, a JSONL / parquet manifest, or webdataset tars (a
    ``.tar``, a glob or brace pattern) of ``key.flac`` (any of ``AUDIO_EXTS``) + ``key.txt`` / ``key.json``;
    the file's bytes travel in ``Sample.image_bytes``, the transcript in ``Sample.caption``. Orphan sidecars
    and other files are error Samples of their own; job-level problems raise ``CurationInputError``.
    ``max_sample_bytes`` and ``allow_outside_root``: as in ``readers.open_input``."""
    text, path = str(spec), Path(spec)
    tars = dict(caption_key=text_key, media_exts=AUDIO_EXTS, media="audio", max_sample_bytes=max_sample_bytes)
    if isinstance(spec, str) and not path.exists() and is_pattern(text):
        return read_webdataset(text, **tars)
    if not path.exists():
        raise CurationInputError(f"input not found: {path}")
    if path.is_dir():
        return read_folder(path, caption_key=text_key, media_exts=frozenset(f".{e}" for e in AUDIO_EXTS),
                           media="audio", max_sample_bytes=max_sample_bytes, allow_outside_root=allow_outside_root)
    if path.suffix.lower() in (".jsonl", ".parquet"):
        return read_manifest(path, image_key=audio_key, caption_key=text_key, media="audio",
                             max_sample_bytes=max_sample_bytes, allow_outside_root=allow_outside_root)
    if path.suffix.lower() == ".tar":
        return read_webdataset([path], **tars)
    raise CurationInputError(f"unknown input kind: {path} (expected a folder of audio files with transcripts, "
                             "a .jsonl / .parquet manifest, or .tar shards)")


# ---------------------------------------------------------------------------------------------- stages


class AudioProcessor:
    """Runs the per-sample stages; built once per worker (the VAD model loads once)."""

    def __init__(self, cfg: AudioCurationConfig):
        self.cfg = cfg
        self.clock = StepClock()
        try:
            from data_curation.vad import VoiceActivity

            self.vad = VoiceActivity(cfg.vad) if cfg.vad.enabled else None
        except Exception as e:  # one message naming the model, before any work starts
            raise StageSetupError(f"cannot set up the audio curation stages: {type(e).__name__}: {e}") from e

    def process(self, samples: list[Sample]) -> list[Sample]:
        """Sets every sample's status; a kept sample's ``image_bytes`` become its 16 kHz FLAC, the others'
        are released (they would only be carried to the writer)."""
        for s in samples:
            try:
                s.image_bytes = self._per_sample(s) if s.ok else None
            except Exception as e:  # an unexpected failure on one sample never stops the job
                s.image_bytes = None
                s.fail(s.stage or "stage", f"{s.source}: {type(e).__name__}: {e}")
            self.clock.stop()
        return samples

    def _per_sample(self, s: Sample) -> bytes | None:
        from media.audio import AudioReadError, load_audio

        cfg, f = self.cfg, s.fields
        if not s.caption:
            s.drop("text", "empty_transcript")
            return None
        self.clock.enter(s, "decode")
        if s.image_bytes is None:
            s.fail("decode", f"{s.source}: no audio bytes")
            return None
        try:
            audio = load_audio(s.image_bytes, SAMPLE_RATE, max_seconds=cfg.max_duration_s, long="crop")
        except AudioReadError as e:  # its name is "<bytes>": name the input instead
            s.fail("decode", f"{s.source}: {e.reason}")
            return None
        duration = audio.source_duration_s  # the whole file's, from its header: only max_duration_s was decoded
        f.update(duration_s=round(duration, 3), source_rate=audio.source_rate,
                 source_channels=audio.source_channels, rms_db=round(audio.rms_db, 2),
                 clipped_fraction=round(audio.clipped_fraction, 6))
        lo, hi, db, clipped = cfg.min_duration_s, cfg.max_duration_s, audio.rms_db, audio.clipped_fraction
        max_clip = cfg.max_clipped_fraction
        checks = (("duration", duration < lo, f"too_short({duration:.2f}<{lo:g}s)"),
                  ("duration", duration > hi, f"too_long({duration:.2f}>{hi:g}s)"),
                  ("silence", db < cfg.silence_db, f"silent(rms {db:.1f}<{cfg.silence_db:g} dBFS)"),
                  ("clipping", clipped > max_clip, f"clipped({clipped:.4f}>{max_clip:g})"))
        for stage, failed, reason in checks:
            if failed:
                s.drop(stage, reason)
                return None
        if self.vad is not None:
            self.clock.enter(s, "vad")
            vad = self.vad.analyze(audio.samples)
            f.update(vad_score=round(vad.score, 4), vad_mean_prob=round(vad.mean_prob, 4),
                     speech_segments=[[round(a, 3), round(b, 3)] for a, b in vad.segments])
            if not vad.score > cfg.vad.threshold:  # "keep VAD score above 0.7"
                s.drop("vad", f"vad_score({vad.score:.3f}<={cfg.vad.threshold:g})")
                return None
        self.clock.enter(s, "encode")
        s.stage = None
        flac = io.BytesIO()
        sf.write(flac, audio.samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return flac.getvalue()


# ---------------------------------------------------------------------------------------------- shards


SCORE_COLUMNS = ("duration_s", "source_rate", "source_channels", "rms_db", "clipped_fraction", "vad_score")


def _members(s: Sample) -> dict[str, bytes | str]:
    record = {"text": s.caption, "source": s.source, "status": s.status, **s.fields, "meta": s.meta}
    return {"flac": s.image_bytes, "txt": s.caption, "json": json.dumps(record, default=str).encode()}


def write_audio_shard(out: Path, index: int, samples: list[Sample]) -> dict:
    """``shard_i.tar`` (kept samples: key.flac, key.txt, key.json), ``shard_i.parquet`` (every input) and,
    last, ``shard_i_stats.json``."""
    return write_status_shard(out, index, samples, _members, SCORE_COLUMNS)


# ---------------------------------------------------------------------------------------------- report


def _audio_stats(rows: list[dict]) -> dict:
    durations = [r["duration_s"] for r in rows if r["duration_s"] is not None]
    return {
        "clips": len(rows),
        "hours": round(sum(durations) / 3600, 4),
        "duration_s": _summary(durations),
        "vad_score": _summary([r["vad_score"] for r in rows if r["vad_score"] is not None]),
        "rms_db": _summary([r["rms_db"] for r in rows if r["rms_db"] is not None]),
        "clipped_fraction": _summary([r["clipped_fraction"] for r in rows if r["clipped_fraction"] is not None]),
        **{c: {str(int(k)): n for k, n in sorted(Counter(r[c] for r in rows).items())}
           for c in ("source_rate", "source_channels")},
    }


def _histograms(out: Path, decoded: list[dict], kept: list[dict], cfg: AudioCurationConfig) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report").mkdir(exist_ok=True)
    written = []
    for column, xlabel, line in (("duration_s", "duration (s)", None),
                                 ("vad_score", "VAD score (speech fraction)", cfg.vad.threshold)):
        decoded_v = [r[column] for r in decoded if r[column] is not None]
        if not decoded_v:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.histogram_bin_edges(decoded_v, bins=40)
        ax.hist(decoded_v, bins=bins, alpha=0.6, label=f"decoded ({len(decoded_v)})")
        ax.hist([r[column] for r in kept], bins=bins, alpha=0.6, label=f"kept ({len(kept)})")
        if line is not None and cfg.vad.enabled:
            ax.axvline(line, color="red", linestyle="--", label=f"threshold {line:g}")
        ax.set(xlabel=xlabel, ylabel="clips")
        ax.legend()
        fig.tight_layout()
        name = f"report/{column.removesuffix('_s')}_hist.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def write_audio_report(out: Path, n_shards: int, cfg: AudioCurationConfig, seconds: dict, engine: dict) -> dict:
    """Aggregate every shard's status parquet into ``report.json`` + plots; checks the counts add up."""
    report, decoded, kept = report_head(out, n_shards, seconds, engine, decoded=lambda r: r["source_rate"] is not None,
                                        stats=_audio_stats, unit="clip")
    report["vad"] = config_to_dict(cfg.vad)
    report["plots"] = _histograms(out, decoded, kept, cfg)
    _atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    return report


# ---------------------------------------------------------------------------------------------- driver


def build_audio_shards(input_spec: str | Path, out_dir: str | Path, cfg: AudioCurationConfig,
                       progress: bool = True, max_chunks: int | None = None, address: str | None = None) -> BuildResult:
    """Curate the clips of ``input_spec`` into ``out_dir`` (resuming finished shards) and write the report.
    Runs on Ray (``engine``: a local instance, or the cluster at ``address``). ``max_chunks`` stops after
    that many new shards (to simulate an interrupted job in tests). A rerun
    with nothing left to do loads no model and rewrites nothing."""
    read = partial(open_audio_input, input_spec, audio_key=cfg.audio_key, text_key=cfg.text_key,
                   max_sample_bytes=cfg.max_sample_bytes, allow_outside_root=cfg.allow_outside_root)
    return run_shard_job(input_spec, read, Path(out_dir), cfg, make_processor=AudioProcessor,
                         write_shard=write_audio_shard, write_report=write_audio_report, progress=progress,
                         max_chunks=max_chunks, address=address)
