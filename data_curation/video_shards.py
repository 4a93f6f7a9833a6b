"""The video shard builder (Llama 3 sec. 7.4): video-text pairs -> per-sample filters -> webdataset shards.

Stages, in order, each dropping or failing a sample with a reason (``data_curation.records``):
caption rules + case fixing -> language id -> decode (probe, then ``decode.frames`` uniform frames) ->
OCR text overlay (frames at 25/50/75%) -> CLIP middle-frame score -> CLIP video score (mean of the
frame embeddings) -> motion score (frames at 2 fps). No aesthetic or resolution filter, as in the paper;
no de-duplication or resampling, so unlike ``shards.py`` there is no global pass and each chunk of
``samples_per_shard`` inputs becomes its shard directly:

* ``shard_i.tar``: ``key.mp4`` (the input's bytes, not re-encoded; the extension follows the container:
  mp4 / mov / webm / mkv / avi), ``key.txt`` (the cleaned caption), ``key.json`` (scores, duration, fps,
  size, status, the input's other metadata);
* ``shard_i.parquet``: a status row (ok / dropped / error, stage, reason, scores) for every input of
  chunk ``i``; ``shard_i_stats.json``: its counts, written last, the resume marker. Every file is written
  to a temporary name and renamed, so a rerun after a kill skips finished shards and redoes the rest;
* ``report.json`` and ``report/*.png``: counts per stage and reason, duration / resolution / aspect ratio /
  motion score statistics and histograms.

Every chunk's videos are held in a worker's memory while it is processed (``samples_per_shard`` x average
size, one chunk per worker; the chunks waiting sit in Ray's object store, spilled to disk past its memory),
hence the small default of 100 per shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from common.config import config_to_dict, dataclass_from_dict, read_yaml_mapping
from data_curation.curation_config import CURATION_YAML, ConfigError, LanguageConfig, check_job_fields
from data_curation.input_files import DEFAULT_MAX_VIDEO_BYTES, CurationInputError
from data_curation.readers import read_folder, read_manifest
from data_curation.records import Sample
from data_curation.engine import StepClock
from data_curation.shard_jobs import (BuildResult, StageSetupError, _atomic_write, _share, _summary, report_head,
                                      run_shard_job, write_status_shard)
from data_curation.video_filters import VideoCaptionRules
from data_curation.wds_reader import read_webdataset
from media.tar import is_pattern

VIDEO_EXTS = ("mp4", "m4v", "mov", "webm", "mkv", "avi")  # also the webdataset member preference order

# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DecodeConfig:
    backend: str = "auto"  # media.video: auto (decord, PyAV fallback) | decord | pyav
    timeout_s: float = 60.0  # per decode call; a hung decoder is killed and the sample is an error
    frames: int = 9  # uniform frames for OCR (25/50/75%: exact when frames - 1 is a multiple of 4) and CLIP


@dataclass(frozen=True)
class VideoOCRConfig:
    enabled: bool = True
    lang: str = "eng"
    min_conf: float = 60.0  # words below this Tesseract confidence do not count
    timeout: float = 30.0  # seconds per frame
    max_area: float = 0.1  # drop when text boxes cover more than this share of the frame
    reduce: str = "mean"  # over the 3 frames: mean | max


@dataclass(frozen=True)
class VideoClipConfig:
    enabled: bool = True
    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    frame_threshold: float = 0.2  # middle frame vs caption (cosine)
    video_threshold: float = 0.2  # mean frame embedding vs caption (cosine)
    batch_size: int = 64


@dataclass(frozen=True)
class MotionConfig:
    enabled: bool = True
    fps: float = 2.0  # frames sampled per second of video (2 to 64 frames)
    max_frames: int = 64
    short_side: int = 64  # frames resized to this short side before optical flow (0: native size)
    min_score: float = 0.002  # mean flow / frame diagonal per 1/fps seconds; below: static, dropped


@dataclass(frozen=True)
class VideoCurationConfig:
    samples_per_shard: int = 100
    workers: int = 2
    video_key: str = "video"  # manifest column holding the video path (relative to the manifest) or bytes
    caption_key: str = "caption"  # manifest column / sidecar or member JSON field holding the caption
    max_sample_bytes: int = DEFAULT_MAX_VIDEO_BYTES  # the reader's cap on one sample's bytes (a chunk is in memory)
    allow_outside_root: bool = False  # manifest rows / folder symlinks may name files outside the input folder
    caption: VideoCaptionRules = field(default_factory=VideoCaptionRules)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    ocr: VideoOCRConfig = field(default_factory=VideoOCRConfig)
    clip: VideoClipConfig = field(default_factory=VideoClipConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)

    def __post_init__(self) -> None:
        check_job_fields(self)
        if self.decode.backend not in ("auto", "decord", "pyav"):
            raise ConfigError(f"decode.backend: {self.decode.backend!r} is not auto | decord | pyav")
        if not 1 <= self.decode.frames <= 64:
            raise ConfigError(f"decode.frames: {self.decode.frames} is not in [1, 64]")
        if self.ocr.reduce not in ("mean", "max"):
            raise ConfigError(f"ocr.reduce: {self.ocr.reduce!r} is not mean | max")
        if self.motion.fps <= 0 or not 2 <= self.motion.max_frames <= 64 or self.motion.short_side < 0:
            raise ConfigError("motion: fps must be > 0, max_frames in [2, 64], short_side >= 0")


def load_video_config(path: str | Path | None, overrides: dict | None = None) -> VideoCurationConfig:
    """Read ``video_curation.yaml`` (None: all defaults); ``overrides`` is merged over the top level.
    Unknown keys, at any level, are a ``ConfigError`` naming them; a stage set to null is disabled."""
    where = str(path) if path is not None else "config"
    data = {**(read_yaml_mapping(path, ConfigError) if path is not None else {}), **(overrides or {})}
    return dataclass_from_dict(VideoCurationConfig, data, where, CURATION_YAML)


# --------------------------------------------------------------------------------------------- readers


def open_video_input(spec: str | Path, *, video_key: str = "video", caption_key: str = "caption",
                     max_sample_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
                     allow_outside_root: bool = False) -> Iterator[Sample]:
    """A folder of videos with sidecar captions, a JSONL / parquet manifest (``video_key`` + caption), or
    webdataset tars (a ``.tar``, a glob or brace pattern) of ``key.mp4`` + ``key.txt`` / ``key.json``.
    The video's bytes travel in ``Sample.image_bytes``. Job-level problems raise ``CurationInputError``.
    ``max_sample_bytes`` and ``allow_outside_root``: as in ``readers.open_input``."""
    text, path = str(spec), Path(spec)
    if isinstance(spec, str) and not path.exists() and is_pattern(text):
        return read_video_webdataset(text, caption_key=caption_key, max_sample_bytes=max_sample_bytes)
    if not path.exists():
        raise CurationInputError(f"input not found: {path}")
    if path.is_dir():
        return read_video_folder(path, caption_key=caption_key, max_sample_bytes=max_sample_bytes,
                                 allow_outside_root=allow_outside_root)
    if path.suffix.lower() in (".jsonl", ".parquet"):
        return read_manifest(path, image_key=video_key, caption_key=caption_key, media="video",
                             max_sample_bytes=max_sample_bytes, allow_outside_root=allow_outside_root)
    if path.suffix.lower() == ".tar":
        return read_video_webdataset([path], caption_key=caption_key, max_sample_bytes=max_sample_bytes)
    raise CurationInputError(f"unknown input kind: {path} (expected a folder, .jsonl, .parquet, .tar or a "
                             "pattern of .tar shards)")


def read_video_folder(path: str | Path, *, caption_key: str = "caption",
                      max_sample_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
                      allow_outside_root: bool = False) -> Iterator[Sample]:
    """``readers.read_folder`` for videos (``VIDEO_EXTS``): sidecar ``x.txt`` / ``x.json`` captions; orphan
    sidecars and other files are error Samples of their own."""
    return read_folder(path, caption_key=caption_key, media_exts=frozenset(f".{e}" for e in VIDEO_EXTS),
                       media="video", max_sample_bytes=max_sample_bytes, allow_outside_root=allow_outside_root)


def read_video_webdataset(paths: str | Path | Iterable[str | Path], *, caption_key: str = "caption",
                          max_sample_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> Iterator[Sample]:
    """``wds_reader.read_webdataset`` for videos: groups of ``key.<video ext>`` + ``key.txt`` / ``key.json``
    (video2dataset's layout). A truncated shard gives an error Sample naming it; a missing one raises."""
    return read_webdataset(paths, caption_key=caption_key, media_exts=VIDEO_EXTS, media="video",
                           max_sample_bytes=max_sample_bytes)


def container_ext(data: bytes, source: str = "") -> str:
    """The tar member extension for a video's bytes: from the container's magic bytes, else the source's
    suffix, else mp4."""
    if data[4:8] == b"ftyp":
        return "mov" if data[8:12] == b"qt  " else "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in data[:64] else "mkv"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    suffix = Path(source.rsplit(":", 1)[-1]).suffix.lower().lstrip(".")
    return suffix if suffix in VIDEO_EXTS else "mp4"


# ---------------------------------------------------------------------------------------------- stages


def _reader_name(s: Sample) -> str:
    """The name ``VideoReader`` reports errors under and picks its decoder by (PyAV for .webm / .avi): the
    source, plus the sniffed container as a suffix when the source has none (manifest rows)."""
    if Path(s.source.rsplit(":", 1)[-1]).suffix.lower().lstrip(".") in VIDEO_EXTS:
        return s.source
    return f"{s.source}#.{container_ext(s.image_bytes or b'')}"


class VideoProcessor:
    """Runs the per-sample stages; built once per worker (models load once)."""

    def __init__(self, cfg: VideoCurationConfig):
        try:
            self._setup(cfg)
        except Exception as e:  # one message naming the stage's file or model, before any work starts
            raise StageSetupError(f"cannot set up the video curation stages: {type(e).__name__}: {e}") from e

    def _setup(self, cfg: VideoCurationConfig) -> None:
        import cv2
        import torch

        from media.video import VideoReader

        cv2.setNumThreads(torch.get_num_threads())  # the worker's share (the engine sets torch's), not every core
        self.cfg = cfg
        self.clock = StepClock()
        self.reader = VideoReader(cfg.decode.backend, cfg.decode.timeout_s)
        self.lang = self.ocr = self.clip = None
        if cfg.language.enabled:
            from data_curation.filters import LanguageId

            self.lang = LanguageId(cfg.language.allowed, cfg.language.min_score)
        if cfg.ocr.enabled:
            from data_curation.ocr import TesseractOCR

            self.ocr = TesseractOCR(lang=cfg.ocr.lang, min_conf=cfg.ocr.min_conf, timeout=cfg.ocr.timeout)
        if cfg.clip.enabled:
            from data_curation.filters import ClipScorer

            self.clip = ClipScorer.load(cfg.clip.model, cfg.clip.pretrained)

    def process(self, samples: list[Sample]) -> list[Sample]:
        for s in samples:
            if s.ok:
                try:
                    self._per_sample(s)
                except Exception as e:  # an unexpected failure on one sample never stops the job
                    s.fail(s.stage or "stage", f"{type(e).__name__}: {e}")
                self.clock.stop()
        return samples

    def _per_sample(self, s: Sample) -> None:
        from data_curation.video_filters import (clip_video_scores, frame_positions, motion_score,
                                                 sample_for_motion, text_overlay, video_caption_reason)
        from media.video import VideoReadError

        cfg, f = self.cfg, s.fields
        self.clock.enter(s, "caption")
        cleaned, reason = video_caption_reason(s.caption, cfg.caption)
        if cleaned != s.caption:
            f["caption_raw"] = s.caption
        s.caption = cleaned
        if reason:
            s.drop("caption", reason)
            return
        if self.lang is not None:
            self.clock.enter(s, "language")
            reason, lang, score = self.lang.reason(s.caption)
            f.update(lang=lang, lang_score=round(float(score), 4))
            if reason:
                s.drop("language", reason)
                return
        self.clock.enter(s, "decode")
        if s.image_bytes is None:
            s.fail("decode", f"{s.source}: no video bytes")
            return
        name = _reader_name(s)
        try:
            info = self.reader.probe(s.image_bytes, name)
            f.update(duration_s=round(info.duration_s, 3), fps=round(info.fps, 3), n_frames=info.n_frames,
                     width=info.width, height=info.height)
            content = self.reader.sample(s.image_bytes, cfg.decode.frames, name) if self.ocr or self.clip else None
        except VideoReadError as e:
            s.fail("decode", str(e))
            return
        if self.ocr is not None:
            self.clock.enter(s, "ocr")
            at = frame_positions(len(content.frames), (0.25, 0.5, 0.75))
            overlay = text_overlay(self.ocr, content.frames[at], cfg.ocr.reduce)
            f.update(ocr_area=round(overlay.score, 5), ocr_area_per_frame=[round(a, 5) for a in overlay.per_frame],
                     ocr_text=overlay.text)
            if overlay.score > cfg.ocr.max_area:
                s.drop("ocr", f"text_area({overlay.score:.3f}>{cfg.ocr.max_area})")
                return
        if self.clip is not None:
            self.clock.enter(s, "clip_frame")
            mid = frame_positions(len(content.frames), (0.5,))[0]
            frame_score, video_score = clip_video_scores(self.clip, content.frames, s.caption, mid,
                                                         cfg.clip.batch_size)
            f.update(clip_frame_score=round(frame_score, 5), clip_video_score=round(video_score, 5))
            if frame_score < cfg.clip.frame_threshold:
                s.drop("clip_frame", f"clip_frame_score({frame_score:.3f}<{cfg.clip.frame_threshold})")
                return
            if video_score < cfg.clip.video_threshold:
                s.drop("clip_video", f"clip_video_score({video_score:.3f}<{cfg.clip.video_threshold})")
                return
        if cfg.motion.enabled:
            self.clock.enter(s, "motion")
            try:
                frames = sample_for_motion(self.reader, s.image_bytes, name, cfg.motion.fps, cfg.motion.max_frames,
                                           info=info)
            except VideoReadError as e:
                s.fail("motion", str(e))
                return
            score = motion_score(frames.frames[frames.frame_mask], cfg.motion.short_side)
            f.update(motion_score=round(score, 6), motion_frames=int(frames.frame_mask.sum()))
            if score < cfg.motion.min_score:
                s.drop("motion", f"low_motion({score:.5f}<{cfg.motion.min_score})")
                return
        s.stage = None


# ---------------------------------------------------------------------------------------------- shards


SCORE_COLUMNS = ("duration_s", "fps", "width", "height", "motion_score", "ocr_area", "clip_frame_score",
                 "clip_video_score")


def _members(s: Sample) -> dict[str, bytes | str]:
    record = {"caption": s.caption, "source": s.source, "status": s.status, **s.fields, "meta": s.meta}
    return {container_ext(s.image_bytes, s.source): s.image_bytes, "txt": s.caption,
            "json": json.dumps(record, default=str).encode()}


def write_video_shard(out: Path, index: int, samples: list[Sample]) -> dict:
    """``shard_i.tar`` (kept samples), ``shard_i.parquet`` (every input) and, last, ``shard_i_stats.json``."""
    return write_status_shard(out, index, samples, _members, SCORE_COLUMNS)


# ---------------------------------------------------------------------------------------------- report


def _video_stats(rows: list[dict]) -> dict:
    """The paper's statistics (sec. 7.4: mean / median duration, share under a minute, short side over
    720 px, aspect ratios between 1:2 and 2:1) plus the motion score."""
    sized = [r for r in rows if r["width"] and r["height"]]
    durations = [r["duration_s"] for r in rows if r["duration_s"] is not None]
    short = [min(r["width"], r["height"]) for r in sized]
    aspect = [r["width"] / r["height"] for r in sized]
    return {
        "videos": len(rows),
        "duration_s": {**_summary(durations), "share_under_60s": _share([d < 60 for d in durations])},
        "short_side": {**_summary(short), "share_over_720": _share([x > 720 for x in short])},
        "aspect_ratio": {**_summary(aspect), "share_1to2_to_2to1": _share([0.5 <= a <= 2.0 for a in aspect])},
        "motion_score": _summary([r["motion_score"] for r in rows if r["motion_score"] is not None]),
    }


def _plots(out: Path, decoded: list[dict], kept: list[dict], cfg: VideoCurationConfig) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = out / "report"
    rep.mkdir(exist_ok=True)
    specs = [("duration_hist.png", lambda r: r["duration_s"], "duration (s)", None),
             ("resolution_hist.png", lambda r: min(r["width"], r["height"]), "short side (px)", None),
             ("aspect_ratio_hist.png", lambda r: r["width"] / r["height"], "aspect ratio (width / height)", None),
             ("motion_score_hist.png", lambda r: r["motion_score"], "motion score (mean flow / frame diagonal)",
              cfg.motion.min_score if cfg.motion.enabled else None)]
    written = []
    for name, get, xlabel, threshold in specs:
        series = {label: [get(r) for r in rows if r["width"] and get(r) is not None]
                  for label, rows in (("decoded", decoded), ("kept", kept))}
        if not series["decoded"]:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.histogram_bin_edges(series["decoded"], bins=40)
        for label, values in series.items():
            ax.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})")
        if threshold is not None:
            ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
        ax.set(xlabel=xlabel, ylabel="videos", title=name.removesuffix("_hist.png").replace("_", " "))
        ax.legend()
        fig.tight_layout()
        fig.savefig(rep / name, dpi=100)
        plt.close(fig)
        written.append(f"report/{name}")
    return written


def write_video_report(out: Path, n_shards: int, cfg: VideoCurationConfig, seconds: dict, engine: dict) -> dict:
    """Aggregate every shard's status parquet into ``report.json`` + plots; checks the counts add up."""
    report, decoded, kept = report_head(out, n_shards, seconds, engine, decoded=lambda r: bool(r["width"]),
                                        stats=_video_stats, unit="video")
    report["stages_enabled"] = {k: v.get("enabled", True) for k, v in config_to_dict(cfg).items()
                                if isinstance(v, dict)}
    report["plots"] = _plots(out, decoded, kept, cfg)
    _atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    return report


# ---------------------------------------------------------------------------------------------- driver


def build_video_shards(input_spec: str | Path, out_dir: str | Path, cfg: VideoCurationConfig, progress: bool = True,
                       max_chunks: int | None = None, address: str | None = None) -> BuildResult:
    """Curate the videos of ``input_spec`` into ``out_dir`` (resuming finished shards) and write the report.
    Runs on Ray (``engine``: a local instance, or the cluster at ``address``). ``max_chunks`` stops after
    that many new shards (to simulate an interrupted job in tests). A rerun
    with nothing left to do loads no model and rewrites nothing."""
    read = partial(open_video_input, input_spec, video_key=cfg.video_key, caption_key=cfg.caption_key,
                   max_sample_bytes=cfg.max_sample_bytes, allow_outside_root=cfg.allow_outside_root)
    return run_shard_job(input_spec, read, Path(out_dir), cfg, make_processor=VideoProcessor,
                         write_shard=write_video_shard, write_report=write_video_report, progress=progress,
                         max_chunks=max_chunks, unit="video", address=address)
