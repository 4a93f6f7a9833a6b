"""The shard builder's configuration (``curation.yaml``): one dataclass per stage, strict keys.

A stage set to ``null`` / ``enabled: false`` is skipped and says so in the report. Unknown keys are an
error naming the section, so a typo never silently disables a filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import dataclass_from_dict, read_yaml_mapping, yaml_options
from data_curation.filters import CaptionRules, ImageRules
from data_curation.input_files import DEFAULT_MAX_SAMPLE_BYTES


class ConfigError(ValueError):
    """A curation config that cannot be used; the message names the file and the field."""


# how every shard builder reads its YAML: missing keys keep their defaults, a stage set to null is off
CURATION_YAML = yaml_options(ConfigError, null_section="disabled")


def check_job_fields(cfg: Any) -> None:
    """The fields every shard builder's config has: ``samples_per_shard`` and ``workers`` >= 1, the reader's
    per-sample byte cap ``max_sample_bytes`` >= 1 and ``allow_outside_root`` a bool (a YAML string "false"
    must not read as true). Both reader fields decide which inputs are read, so they belong to the config a
    resume must match."""
    if cfg.samples_per_shard < 1 or cfg.workers < 1:
        raise ConfigError("samples_per_shard and workers must be >= 1")
    if isinstance(cfg.max_sample_bytes, bool) or not isinstance(cfg.max_sample_bytes, int) or cfg.max_sample_bytes < 1:
        raise ConfigError(f"max_sample_bytes: {cfg.max_sample_bytes!r} is not a whole number of bytes >= 1")
    if not isinstance(cfg.allow_outside_root, bool):
        raise ConfigError(f"allow_outside_root: {cfg.allow_outside_root!r} is not true or false")


@dataclass(frozen=True)
class LanguageConfig:
    enabled: bool = True
    allowed: tuple[str, ...] = ("en",)
    min_score: float = 0.5


@dataclass(frozen=True)
class SafetyConfig:
    enabled: bool = True
    blur_faces: bool = True
    blocklist: str | None = None  # pHash blocklist file (one hex hash per line)
    max_distance: int = 8
    classifier: str | None = None  # "module:function" returning an unsafe score in [0, 1]
    classifier_threshold: float = 0.5


@dataclass(frozen=True)
class OCRConfig:
    enabled: bool = True
    lang: str = "eng"
    min_conf: float = 60.0
    timeout: float = 30.0
    detect_text: bool = True  # Tesseract only where ocr.text_regions finds a word-like region


@dataclass(frozen=True)
class ClipConfig:
    enabled: bool = True
    model: str = "ViT-B-32"  # open_clip model name (or a custom config registered by the caller)
    pretrained: str | None = "laion2b_s34b_b79k"  # open_clip tag or a local checkpoint path
    threshold: float = 0.2  # drop pairs whose image-text cosine similarity is below
    batch_size: int = 64


@dataclass(frozen=True)
class DedupStageConfig:
    enabled: bool = True
    sscd: str | None = None  # SSCD TorchScript file or our state dict (required when enabled)
    threshold: float = 0.75
    keep: str = "clip"  # which pair of a duplicate component survives: clip | longest_caption | first
    clusters: int | None = None
    clusters_per_vector: int = 24  # each vector is searched in its 24 nearest clusters (measured recall)
    batch_size: int = 32


@dataclass(frozen=True)
class ResampleConfig:
    enabled: bool = True
    t: float = 20_000
    vocab: str = "default"  # "default" (wordfreq) or a file with one entry per line
    prob: str = "sqrt"  # the paper's sqrt(t / f); "linear" = MetaCLIP's t / f
    keep_unmatched: bool = False
    seed: int = 0


@dataclass(frozen=True)
class CurationConfig:
    samples_per_shard: int = 1000  # input samples per shard (each input belongs to exactly one shard)
    workers: int = 2
    jpeg_quality: int = 95  # images that a stage changed (face blur) are re-encoded; others copied as is
    max_pixels: int = 178_956_970
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES  # the reader's cap on one sample's bytes (files, members)
    allow_outside_root: bool = False  # manifest rows / folder symlinks may name files outside the input folder
    image_folder: str | None = None  # where a LLaVA JSON input's image paths start (None: the JSON file's folder)
    caption: CaptionRules = field(default_factory=CaptionRules)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image: ImageRules = field(default_factory=ImageRules)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    ocr: OCRConfig = field(default_factory=OCRConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    dedup: DedupStageConfig = field(default_factory=DedupStageConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)

    def __post_init__(self) -> None:
        check_job_fields(self)
        if self.dedup.enabled and not self.dedup.sscd:
            raise ConfigError("dedup.sscd: the SSCD model file is required when dedup is enabled "
                              "(or set dedup: {enabled: false})")
        if self.dedup.keep not in ("clip", "longest_caption", "first"):
            raise ConfigError(f"dedup.keep: {self.dedup.keep!r} is not clip | longest_caption | first")
        if self.dedup.enabled and self.dedup.keep == "clip" and not self.clip.enabled:
            raise ConfigError("dedup.keep: 'clip' needs the clip stage enabled")
        if self.resample.prob not in ("sqrt", "linear"):
            raise ConfigError(f"resample.prob: {self.resample.prob!r} is not sqrt | linear")


def load_config(path: str | Path | None, overrides: dict | None = None) -> CurationConfig:
    """Read ``curation.yaml`` (None: all defaults); ``overrides`` is merged over the top level."""
    data = read_yaml_mapping(path, ConfigError) if path is not None else {}
    where = str(path) if path is not None else "config"
    return dataclass_from_dict(CurationConfig, {**data, **(overrides or {})}, where, CURATION_YAML)

