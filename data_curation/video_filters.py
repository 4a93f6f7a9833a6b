"""Per-video filters (Llama 3 sec. 7.4): caption cleaning, OCR text overlay, CLIP frame/video score, motion.

Each function takes decoded frames (``media.video.SampledFrames.frames``, (K, H, W, 3) uint8 RGB) or a
caption and returns a number; the shard builder (``data_curation.video_shards``) turns numbers into
drop decisions. Units, so thresholds mean the same thing on every video:

* **motion score**: mean Farneback optical-flow magnitude between consecutive frames sampled at
  ``fps`` (2 by default, as video2dataset and Data-Juicer do), measured on grayscale frames resized so
  their short side is ``short_side`` px, divided by the diagonal of that resized frame. So it is the
  average displacement of a pixel between two samples 0.5 s apart, as a **fraction of the frame
  diagonal**: 0 for a still image, ~0.01 when content moves 1% of the diagonal per half second,
  independent of the video's resolution (video2dataset's score is in pixels of a 16 px frame instead,
  curation notes sec. 4.2).
* **OCR overlay**: the fraction of a frame's area covered by the boxes of words Tesseract reads with
  confidence >= ``min_conf``, on the frames at 25 / 50 / 75% of the video, reduced by mean (default:
  overlays persist, a sign in one shot does not) or max.
* **CLIP scores**: cosine similarities in [-1, 1]; the frame score uses the middle frame, the video
  score the mean of the normalised frame embeddings (re-normalised). The paper uses a video-text
  contrastive model for the second; mean pooling of CLIP frame embeddings is the usual stand-in
  (CLIP4Clip's "meanP").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from data_curation.filters import CaptionRules, ClipScorer, caption_reason
from data_curation.ocr import OCRResult, TesseractOCR
from media.video import MAX_FRAMES, SampledFrames, VideoInfo, VideoReader, VideoSource

# ------------------------------------------------------------------------------------------ caption


@dataclass(frozen=True)
class VideoCaptionRules(CaptionRules):
    """``CaptionRules`` plus case fixing; video captions must be a little longer (paper: "a minimum length")."""

    min_words: int = 3
    min_chars: int = 10
    fix_case: bool = True


_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([^\W\d_])")
_PRONOUN_I = re.compile(r"\bi\b")


def clean_caption(text: str, fix_case: bool = True) -> str:
    """Whitespace collapsed; with ``fix_case``, an all-lowercase or ALL-CAPS caption becomes sentence case
    (first letter of each sentence and the pronoun "I" upper case) and a mixed-case caption gets its
    first word capitalised when that word is all lowercase (so "iPhone" is left alone)."""
    text = " ".join(text.split())
    if not fix_case or not text:
        return text
    cased = [c for c in text if c.islower() or c.isupper()]  # letters of scripts that have case
    if len(cased) >= 2 and (all(c.islower() for c in cased) or all(c.isupper() for c in cased)):
        text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text.lower())
        return _PRONOUN_I.sub("I", text)
    first = text.split(" ", 1)[0]
    if first.islower() and first[0].isalpha():
        text = text[0].upper() + text[1:]
    return text


def video_caption_reason(text: str | None,
                         rules: VideoCaptionRules = VideoCaptionRules()) -> tuple[str, str | None]:
    """(cleaned caption, reason or None): ``clean_caption`` then ``caption_reason`` on the cleaned text."""
    cleaned = clean_caption(text or "", rules.fix_case)
    return cleaned, caption_reason(cleaned, rules)


# ------------------------------------------------------------------------------------------- frames


def frame_positions(k: int, fractions: Sequence[float]) -> list[int]:
    """Positions in K uniformly sampled frames (first and last included) nearest to ``fractions`` of the
    video; exact when K - 1 is a multiple of 4 for quartiles (the default K = 9)."""
    return [int(round(q * (k - 1))) for q in fractions]


def motion_num_frames(duration_s: float, fps: float = 2.0, max_frames: int = MAX_FRAMES) -> int:
    """clamp(round(duration * fps), 2, max_frames): how many frames sample a video at ``fps``."""
    return int(min(max(round(duration_s * fps), 2), max_frames))


def sample_for_motion(reader: VideoReader, source: VideoSource, name: str | None = None, fps: float = 2.0,
                      max_frames: int = MAX_FRAMES, info: VideoInfo | None = None) -> SampledFrames:
    """Frames spread uniformly over the video at about ``fps`` (at most ``max_frames``, at least 2).
    ``info`` (from ``reader.probe``) saves a second probe. Raises ``VideoReadError``."""
    if info is None:
        info = reader.probe(source, name)
    return reader.sample(source, motion_num_frames(info.duration_s, fps, max_frames), name=name)


# ------------------------------------------------------------------------------------------- motion


def _gray(frame: np.ndarray, short_side: int) -> np.ndarray:
    gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    if short_side and min(h, w) != short_side:
        scale = short_side / min(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return gray


def motion_score(frames: np.ndarray, short_side: int = 64) -> float:
    """Mean optical-flow magnitude over consecutive frame pairs / resized frame diagonal (module docstring).

    frames: (K, H, W, 3) uint8 RGB, in time order (pass only distinct frames: a short video's repeated
    frames would add zero-motion pairs). Resized (up or down) to a ``short_side`` px short side, so
    Farneback's pixel-sized windows see the same share of every video; 0 keeps the native size.
    Farneback parameters are video2dataset's: (0.5, 3, 15, 3, 5, 1.2, 0). Fewer than 2 frames: 0.0.
    """
    if len(frames) < 2:
        return 0.0
    grays = [_gray(f, short_side) for f in frames]
    mags = []
    for prev, nxt in zip(grays, grays[1:]):
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # (h, w, 2) px
        mags.append(float(np.sqrt((flow.astype(np.float64) ** 2).sum(-1)).mean()))
    h, w = grays[0].shape
    return float(np.mean(mags) / np.hypot(h, w))


# ---------------------------------------------------------------------------------------------- OCR


def text_area_fraction(result: OCRResult, width: int, height: int) -> float:
    """Share of a ``width`` x ``height`` frame covered by the union of ``result``'s word boxes."""
    mask = np.zeros((height, width), dtype=bool)
    for word in result.words:
        x, y, w, h = word["box"]
        mask[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = True
    return float(mask.mean()) if mask.size else 0.0


@dataclass
class TextOverlay:
    score: float  # reduced over frames
    per_frame: list[float]
    text: str  # the words read, frames separated by " | "


def text_overlay(ocr: TesseractOCR, frames: np.ndarray, reduce: str = "mean") -> TextOverlay:
    """OCR each frame ((K, H, W, 3) uint8) -> text-covered area fraction per frame, reduced by mean or max."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    areas, texts = [], []
    for frame in frames:
        result = ocr.read(Image.fromarray(frame))
        areas.append(text_area_fraction(result, frame.shape[1], frame.shape[0]))
        texts.append(" ".join(result.text.split()))
    score = (max(areas) if reduce == "max" else float(np.mean(areas))) if areas else 0.0
    return TextOverlay(float(score), areas, " | ".join(t for t in texts if t))


# --------------------------------------------------------------------------------------------- CLIP


@torch.inference_mode()
def clip_frame_embeddings(scorer: ClipScorer, frames: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """(K, D) float32 L2-normalised image embeddings of frames (K, H, W, 3) uint8, as ``ClipScorer.score``
    computes them (its ``preprocess`` and ``model.encode_image``)."""
    out = []
    for i in range(0, len(frames), batch_size):
        pixels = torch.stack([scorer.preprocess(Image.fromarray(f)) for f in frames[i:i + batch_size]])
        out.append(scorer.model.encode_image(pixels.to(scorer.device), normalize=True).float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def clip_text_embedding(scorer: ClipScorer, caption: str) -> torch.Tensor:
    """(D,) float32 L2-normalised text embedding."""
    tokens = scorer.tokenizer([caption]).to(scorer.device)
    return scorer.model.encode_text(tokens, normalize=True).float().cpu()[0]


def clip_video_scores(scorer: ClipScorer, frames: np.ndarray, caption: str, frame_index: int | None = None,
                      batch_size: int = 64) -> tuple[float, float]:
    """(frame score, video score) of frames (K, H, W, 3) with ``caption``: cosine of the caption with
    frame ``frame_index`` (default: the middle one) and with the re-normalised mean frame embedding."""
    if len(frames) == 0:
        raise ValueError("clip_video_scores: no frames")
    img = clip_frame_embeddings(scorer, frames, batch_size)  # (K, D)
    txt = clip_text_embedding(scorer, caption)  # (D,)
    index = (len(frames) - 1) // 2 if frame_index is None else frame_index
    video = torch.nn.functional.normalize(img.mean(0), dim=0)
    frame_score = float((img[index] @ txt).clamp(-1.0, 1.0))
    video_score = float((video @ txt).clamp(-1.0, 1.0))
    return frame_score, video_score
