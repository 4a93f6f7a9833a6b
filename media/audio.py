"""Reading speech audio: any libsndfile format (wav, flac, ogg, mp3) -> mono float32 at 16 kHz.

    audio = load_audio("utt.flac")              # Audio: samples (T,) float32, 16 kHz, <= 60 s
    pieces = chunk_audio(load_audio("talk.wav", max_seconds=None))   # long-form ASR: 60 s pieces

Decoding is soundfile (libsndfile), resampling is soxr ("HQ"); torchaudio is not used (it is in
maintenance mode, pytorch/audio#3902). Multi-channel audio is mixed down by the channel mean.

Long files: Llama 3 handles speech segments of up to 60 s (sec. 8), so ``max_seconds=60`` is the
default. ``long="crop"`` keeps the *first* ``max_seconds`` (deterministic, so a shard builder and an
eval see the same audio); ``long="error"`` raises instead. The random 6,000-frame crop of BEST-RQ
pre-training is a training-time augmentation on the features, not done here. For long-form ASR, load
with ``max_seconds=None`` and split with `chunk_audio`.

Every failure (missing, empty, corrupt, unsupported, truncated flac, NaN/inf samples, too long with
``long="error"``) raises `AudioReadError` whose message starts with the file name ("<bytes>" for bytes).

Only what is kept is decoded: the frame count comes from the header, so a 10-hour file cropped to 60 s
reads 60 s (not 10 hours, ~2.7 GiB of float32, before dropping it), and ``long="error"`` raises before
decoding anything. ``Audio.source_duration_s`` keeps the whole file's length.

Truncation: libsndfile reports a cut flac as an error ("flac decoder lost sync") and a cut OGG as
malformed, but reads a cut WAV as its prefix (the frame count is clamped to the bytes present). A WAV
whose header declares more audio than the file holds is an error here: its transcript describes audio
that is not there. (A ``data`` size of 0 or 0xFFFFFFFF, which streaming writers leave when they cannot
seek back, declares nothing and is read as is.)
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
MAX_SECONDS = 60.0  # the paper's longest speech segment (sec. 8)
SILENCE_DB = -60.0  # rms_db below this is "silent": about 16-bit dither level, far below quiet speech (~-40)
CLIP_LEVEL = 0.999  # |x| at or above this fraction of full scale counts as clipped
RMS_FLOOR_DB = -200.0  # rms_db of digital silence (20 * log10(1e-10)) instead of -inf
AUDIO_EXTS = ("flac", "wav", "ogg", "opus", "mp3")  # what libsndfile (>= 1.1) decodes
WRITE_SUFFIXES = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
AudioSource = str | os.PathLike | bytes


class AudioReadError(ValueError):
    """An audio file could not be read. ``str(err)`` is "<name>: <reason>"."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.name, self.reason))


@dataclass
class Audio:
    """samples (T,) float32 mono at ``sample_rate``; source_rate / source_channels describe the file.

    clipped_fraction: fraction of the file's samples (all channels, before mixing and resampling, within
    the kept part) with |x| >= 0.999 of full scale. rms_db: 20 * log10(RMS) of ``samples`` in dBFS, where a
    full-scale square wave is 0 dBFS and a full-scale sine -3 dBFS; digital silence is -200.
    offset_s: where ``samples`` starts in the source (non-zero for `chunk_audio` pieces).
    source_duration_s: the whole file's length from its header (longer than ``duration_s`` when cropped).
    """

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int
    duration_s: float
    clipped_fraction: float
    rms_db: float
    offset_s: float = 0.0
    source_duration_s: float | None = None

    @property
    def is_silent(self) -> bool:
        """RMS below `SILENCE_DB` (-60 dBFS): nothing a VAD or an ASR model could use."""
        return self.rms_db < SILENCE_DB


def source_name(src: AudioSource) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fsdecode(src)


def rms_db(samples: np.ndarray) -> float:
    """20 * log10(RMS) in dBFS, floored at -200 dB (digital silence)."""
    if samples.size == 0:
        return RMS_FLOOR_DB
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64))))
    return max(20.0 * math.log10(rms), RMS_FLOOR_DB) if rms > 0 else RMS_FLOOR_DB


def _open(src: AudioSource, name: str) -> tuple[io.BytesIO | Path, int]:
    """-> (what soundfile opens, size in bytes); a missing or empty input is an AudioReadError."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        file, size = io.BytesIO(bytes(src)), len(src)
    else:
        file = Path(os.fspath(src))
        if not file.is_file():
            raise AudioReadError(name, "no such file" if not file.exists() else "not a regular file")
        size = file.stat().st_size
    if size == 0:
        raise AudioReadError(name, "empty file (0 bytes)")
    return file, size


def wav_data_shortfall(head: bytes, size: int) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF/WAVE file's ``data`` chunk when it declares more than the file
    holds, else None. ``head`` is the file's start (it must reach the data chunk's header); a data size
    of 0 or 0xFFFFFFFF (left by writers that cannot seek back) declares nothing."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"data":
            present = size - (pos + 8)
            if length in (0, 0xFFFFFFFF) or length <= present:
                return None
            return length, present
        pos += 8 + length + (length & 1)  # chunks are word-aligned
    return None


_WAV_HEAD_BYTES = 1 << 16  # fmt, fact, LIST... chunks before "data" fit in this


def _read(src: AudioSource, name: str, max_seconds: float | None, long: str) -> tuple[np.ndarray, int, int]:
    """-> (samples (T, C) float32 of at most ``max_seconds``, sample rate, frames in the whole file), every
    soundfile failure as an AudioReadError. Frames past ``max_seconds`` are never decoded."""
    file, size = _open(src, name)
    try:
        with sf.SoundFile(file) as snd:
            sr, n_src = int(snd.samplerate), int(snd.frames)
            if snd.format in ("WAV", "WAVEX"):
                _check_wav(file, size, name, snd.channels * _bytes_per_sample(snd.subtype), sr)
            if max_seconds is not None and n_src > max_seconds * sr:
                if long == "error":
                    raise AudioReadError(name, f"{n_src / sr:.2f} s is longer than max_seconds={max_seconds:g}")
                n_read = math.ceil(max_seconds * sr)
            else:
                n_read = n_src
            data = snd.read(n_read, dtype="float32", always_2d=True)
    except AudioReadError:
        raise
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:  # LibsndfileError: SoundFileError
        msg = str(e)
        if msg.startswith("Error opening "):  # "Error opening <repr of the file object>: <reason>"
            msg = msg.rsplit(": ", 1)[-1]
        raise AudioReadError(name, f"not readable by libsndfile ({type(e).__name__}: {msg})") from None
    if data.shape[0] == 0:
        raise AudioReadError(name, "no audio samples (0 frames)")
    if not np.isfinite(data).all():
        raise AudioReadError(name, f"{int((~np.isfinite(data)).sum())} NaN/inf samples")
    return data, sr, n_src


def _bytes_per_sample(subtype: str) -> int:
    return {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
            "ULAW": 1, "ALAW": 1}.get(subtype, 0)


def _check_wav(file: io.BytesIO | Path, size: int, name: str, frame_bytes: int, sr: int) -> None:
    """A WAV that declares more audio than it holds is an AudioReadError (libsndfile would clamp it)."""
    if isinstance(file, io.BytesIO):
        head = file.getbuffer()[:_WAV_HEAD_BYTES].tobytes()
    else:
        with open(file, "rb") as f:
            head = f.read(_WAV_HEAD_BYTES)
    short = wav_data_shortfall(head, size)
    if short is None:
        return
    declared, present = short
    if frame_bytes:
        what = (f"{declared // frame_bytes} frames ({declared / frame_bytes / sr:.2f} s), the file holds "
                f"{present // frame_bytes} ({present / frame_bytes / sr:.2f} s)")
    else:
        what = f"{declared} bytes of audio, the file holds {present}"
    raise AudioReadError(name, f"truncated WAV: its header declares {what}")


def load_audio(
    src: AudioSource,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = MAX_SECONDS,
    long: str = "crop",
) -> Audio:
    """Read ``src`` (path or encoded bytes) as mono float32 at ``sample_rate``.

    Longer than ``max_seconds``: ``long="crop"`` keeps the first ``max_seconds``, ``long="error"``
    raises AudioReadError; ``max_seconds=None`` keeps everything.
    """
    if long not in ("crop", "error"):
        raise ValueError(f'long must be "crop" or "error", got {long!r}')
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
    name = source_name(src)
    # Cropped while reading (no decoding of audio we drop); the resampler then sees the cut as the end of
    # the signal, which only changes the last few milliseconds of the kept audio.
    data, sr, n_src = _read(src, name, max_seconds, long)
    channels = data.shape[1]
    out_len = round(n_src * sample_rate / sr)
    if data.shape[0] < n_src:
        out_len = round(max_seconds * sample_rate)
    clipped = float(np.mean(np.abs(data) >= CLIP_LEVEL))
    mono = data.mean(axis=1, dtype=np.float32) if channels > 1 else data[:, 0]
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    mono = np.ascontiguousarray(mono[:out_len], dtype=np.float32)
    if len(mono) == 0:
        raise AudioReadError(name, f"too short: {n_src} samples at {sr} Hz give none at {sample_rate} Hz")
    return Audio(mono, sample_rate, sr, channels, len(mono) / sample_rate, clipped, rms_db(mono),
                 source_duration_s=n_src / sr)


def chunk_audio(audio: Audio, seconds: float = MAX_SECONDS) -> list[Audio]:
    """Consecutive pieces of at most ``seconds`` (the last may be shorter), for long-form ASR.

    Each piece's ``offset_s`` is its start in the source; its rms_db is its own, and its
    clipped_fraction is measured on its 16 kHz samples (the source samples are gone by now).
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    n = round(seconds * audio.sample_rate)
    if n < 1:
        raise ValueError(f"seconds={seconds!r} is shorter than one sample at {audio.sample_rate} Hz")
    pieces = []
    for start in range(0, len(audio.samples), n):
        x = audio.samples[start : start + n]
        pieces.append(Audio(
            samples=x,
            sample_rate=audio.sample_rate,
            source_rate=audio.source_rate,
            source_channels=audio.source_channels,
            duration_s=len(x) / audio.sample_rate,
            clipped_fraction=float(np.mean(np.abs(x) >= CLIP_LEVEL)),
            rms_db=rms_db(x),
            offset_s=audio.offset_s + start / audio.sample_rate,
            source_duration_s=audio.source_duration_s,
        ))
    return pieces


def write_audio(
    path: str | os.PathLike, samples: np.ndarray, sample_rate: int, subtype: str | None = None
) -> Path:
    """Write (T,) or (T, C) samples; the format comes from the suffix (.wav, .flac, .ogg). The default
    subtype is soundfile's (16-bit PCM for wav/flac, Vorbis for ogg), which clips values beyond +-1."""
    path = Path(path)
    fmt = WRITE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use one of {sorted(WRITE_SUFFIXES)}")
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2) or samples.shape[0] == 0:
        raise ValueError(f"{path}: samples must be (T,) or (T, C) with T > 0, got shape {samples.shape}")
    sf.write(path, samples, sample_rate, format=fmt, subtype=subtype)
    return path
