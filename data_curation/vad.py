"""Voice activity detection for speech curation (Llama 3 sec. 8: pre-training speech is filtered with a VAD,
keeping clips whose VAD score is above 0.7), on silero-vad's TorchScript model packaged in the PyPI wheel.

    vad = VoiceActivity(VadConfig())            # loads the packaged model once; nothing is downloaded
    vad.score(load_audio("utt.wav").samples)   # 0.94: the share of the clip that is speech

**The VAD score is the speech fraction**: the share of the clip's duration covered by silero's speech
segments. Silero gives a speech probability per 32 ms window (512 samples at 16 kHz); its own segmenter
turns those into segments (speech starts at ``speech_prob``, ends ``speech_prob - 0.15`` lower, pauses
shorter than ``min_silence_ms`` are bridged, segments shorter than ``min_speech_ms`` dropped, each padded
by ``speech_pad_ms``). So ``threshold: 0.7`` reads "at least 70% of the clip is speech": a clip with 1 s of
speech in 10 s of silence or music goes, a clean utterance stays.

Why not the mean window probability: it mixes confidence with coverage. Probabilities ramp up and down
over several windows at every onset and offset, so a clean one-second utterance from espeak-ng averages
0.68 (its speech fraction: 0.77) and would be dropped, while long noisy speech at probability 0.6 scores
below the bar though it is all speech. The mean is still reported (``VadResult.mean_prob``) next to the score.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from data_curation.curation_config import ConfigError

SAMPLE_RATE = 16_000  # silero runs at 8 or 16 kHz; everything here is 16 kHz (media.audio.load_audio)
WINDOW = 512  # samples per silero window at 16 kHz (32 ms)


class VadLoadError(RuntimeError):
    """The silero-vad model cannot be loaded (package missing, model file missing or not a silero model)."""


@dataclass(frozen=True)
class VadConfig:
    enabled: bool = True
    threshold: float = 0.7  # keep a clip when its speech fraction is above this (Llama 3 sec. 8)
    model: str | None = None  # a silero-vad (v5+) TorchScript file; None: the one inside the silero-vad wheel
    speech_prob: float = 0.5  # silero's window probability where a segment starts (silero's default)
    min_speech_ms: int = 250  # shorter segments are not speech
    min_silence_ms: int = 100  # shorter pauses do not split a segment
    speech_pad_ms: int = 30  # each segment is widened by this on both sides (within the clip)

    def __post_init__(self) -> None:
        if not (0 <= self.threshold < 1 and 0 < self.speech_prob < 1):
            raise ConfigError(f"threshold must be in [0, 1) and speech_prob in (0, 1), got {self.threshold}, "
                             f"{self.speech_prob}")
        if min(self.min_speech_ms, self.min_silence_ms, self.speech_pad_ms) < 0:
            raise ConfigError("min_speech_ms, min_silence_ms and speech_pad_ms must be >= 0")


@dataclass(frozen=True)
class VadResult:
    """score: speech fraction in [0, 1]; mean_prob: mean window probability; segments: (start_s, end_s)."""

    score: float
    mean_prob: float
    segments: list[tuple[float, float]]


class VoiceActivity:
    """silero-vad loaded once (per process); every call runs it over a whole clip from a reset state."""

    def __init__(self, cfg: VadConfig = VadConfig()):
        self.cfg = cfg
        self.model = _load_model(cfg.model)

    def analyze(self, samples: np.ndarray) -> VadResult:
        """samples (T,) float at 16 kHz -> score, mean probability and speech segments, in one model pass."""
        from silero_vad import get_speech_timestamps_from_probs

        x = np.asarray(samples, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"expected mono samples (T,) with T > 0 at 16 kHz, got shape {x.shape}")
        threads = torch.get_num_threads()
        # One thread: a 32 ms window is far too small to split, and OpenMP threads waiting on each other made
        # a 4.8 s clip take 3.6-23 s instead of 0.15 s with 2 threads on a busy 2-core machine.
        torch.set_num_threads(1)
        try:
            with torch.no_grad():  # audio_forward resets the model state, pads the tail, scans every window
                probs = self.model.audio_forward(torch.from_numpy(x), SAMPLE_RATE)[0].tolist()
        finally:
            torch.set_num_threads(threads)
        cfg = self.cfg
        stamps = get_speech_timestamps_from_probs(
            probs, sampling_rate=SAMPLE_RATE, threshold=cfg.speech_prob, min_speech_duration_ms=cfg.min_speech_ms,
            min_silence_duration_ms=cfg.min_silence_ms, speech_pad_ms=cfg.speech_pad_ms,
            audio_length_samples=x.size)
        spans = [(max(0, int(s["start"])), min(x.size, int(s["end"]))) for s in stamps]
        inside = np.zeros(x.size, bool)  # a mask, not a sum of lengths: padded segments could touch
        for start, end in spans:
            inside[start:end] = True
        return VadResult(score=float(inside.mean()), mean_prob=float(np.mean(probs)),
                         segments=[(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in spans])

    def score(self, samples: np.ndarray) -> float:
        """The VAD score of a clip (T,) at 16 kHz: the fraction of its duration inside speech segments."""
        return self.analyze(samples).score

    def speech_segments(self, samples: np.ndarray) -> list[tuple[float, float]]:
        """(start_s, end_s) of each speech segment of a clip (T,) at 16 kHz."""
        return self.analyze(samples).segments


def _load_model(path: str | None) -> torch.jit.ScriptModule:
    """The packaged silero model (no network: it is a file inside the wheel), or a TorchScript file."""
    try:
        from silero_vad import load_silero_vad
    except ImportError as e:
        raise VadLoadError(f"silero-vad is not installed (pip install 'silero-vad>=6'): {e}") from None
    where = path or "the model packaged in silero-vad"
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice, once per worker
            warnings.simplefilter("ignore", FutureWarning)  # and silero's importlib.resources.path notice
            warnings.simplefilter("ignore", DeprecationWarning)
            model = load_silero_vad() if path is None else torch.jit.load(path, map_location="cpu")
    except Exception as e:  # FileNotFoundError, RuntimeError (not a TorchScript archive), ...
        raise VadLoadError(f"cannot load the silero VAD model from {where}: {type(e).__name__}: {e}") from None
    if not hasattr(model, "audio_forward"):
        raise VadLoadError(f"{where} is not a silero-vad v5+ model (it has no audio_forward)")
    return model.eval()
