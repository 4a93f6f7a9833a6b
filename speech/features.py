"""Log-mel front end: 80 mel bins, 25 ms Hann window, 10 ms hop at 16 kHz (Llama 3 sec. 8, speech encoder).

    logmel = LogMel(LogMelConfig())
    feats, frame_lengths = logmel(wave, lengths)   # wave (B, T) at 16 kHz -> feats (B, 1 + T // 160, 80)
    feats = normalize_features(feats, frame_lengths)

The filterbank is librosa's default (Slaney mel scale, Slaney area normalisation), computed here and
checked against ``librosa.filters.mel`` in the tests; the full log-mel matches
``librosa.feature.melspectrogram(..., center=True, pad_mode=cfg.pad_mode)`` followed by a natural log.

Batching is exact: a sample's valid frames do not depend on its batch-mates or on the padding after it
(see `LogMel._pad`), and frames past a sample's length are 0.

`normalize_features` gives per-utterance zero-mean, unit-variance bins: BEST-RQ's random-projection
quantizer collapses to a few codes on unnormalised inputs, and a learnable LayerNorm would move its
targets (notes/video_speech_train.md sec. 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LogMelConfig:
    sample_rate: int = 16_000
    n_fft: int = 400  # = the window: no zero-padded FFT, 201 bins of 40 Hz
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms: 100 frames/s, 60 s -> 6,001 frames (the paper's "6,000")
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8_000.0  # Nyquist at 16 kHz
    # log(max(mel power, floor)), natural log: 1e-10 (-100 dB, Whisper's clamp) is below the mel energy
    # of 1-LSB 16-bit noise (~1e-8), so in practice only digital silence sits on the floor.
    log_floor: float = 1e-10
    # center=True: frame t is centred on sample t * hop, so a wave of T samples gives 1 + T // hop frames
    # and frame t lines up with time t * 10 ms (librosa / torch.stft / Whisper convention).
    center: bool = True
    # How a centred frame sees past the ends of its sample: "reflect" (torch.stft's and Whisper's
    # default, no artificial half-silent edge frames) or "constant" (zeros, librosa's default).
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"need 0 < win_length <= n_fft, got {self.win_length}, {self.n_fft}")
        if self.hop_length < 1 or self.n_mels < 1:
            raise ValueError(f"hop_length and n_mels must be >= 1, got {self.hop_length}, {self.n_mels}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got {self.f_min}, {self.f_max}")
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f'pad_mode must be "reflect" or "constant", got {self.pad_mode!r}')
        if not self.log_floor > 0:
            raise ValueError(f"log_floor must be > 0, got {self.log_floor}")

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def num_frames(self, n_samples: torch.Tensor | int) -> torch.Tensor | int:
        """Frames for ``n_samples`` samples: 1 + T // hop with center=True (even n_fft)."""
        pad = 2 * (self.n_fft // 2) if self.center else 0
        return 1 + (n_samples + pad - self.n_fft) // self.hop_length


# Slaney's mel scale (Auditory Toolbox; librosa htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3  # Hz per mel on the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15 mels
_LOGSTEP = np.log(6.4) / 27.0  # 27 mels per factor 6.4 in frequency


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    lin = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    lin = _F_SP * mel
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, lin)


def mel_filterbank(cfg: LogMelConfig) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float32 triangular filters on the Slaney mel scale, each scaled to unit
    area over Hz (Slaney normalisation: 2 / bandwidth).
    Equals librosa.filters.mel(htk=False, norm="slaney")."""
    fft_hz = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_freqs)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(cfg.f_min), hz_to_mel(cfg.f_max), cfg.n_mels + 2))
    width = np.diff(edges_hz)  # (n_mels + 1,)
    ramps = edges_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_freqs)
    rising = -ramps[:-2] / width[:-1, None]
    falling = ramps[2:] / width[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


class LogMel(nn.Module):
    """wave (B, T) float at cfg.sample_rate, lengths (B,) samples -> (feats (B, N, n_mels) float32,
    frame_lengths (B,) long), N = cfg.num_frames(T). Always computed in fp32 (autocast off)."""

    def __init__(self, cfg: LogMelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LogMelConfig()
        # Derived from the config, so not saved: checkpoints stay independent of front-end numerics.
        self.register_buffer("mel_fb", mel_filterbank(self.cfg), persistent=False)
        window = torch.hann_window(self.cfg.win_length, periodic=True)  # librosa's "hann" (fftbins=True)
        self.register_buffer("window", window, persistent=False)

    def _fp32_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # module.to(bfloat16) casts buffers too; rebuild them rather than run the STFT on rounded values.
        if self.mel_fb.dtype == torch.float32 and self.window.dtype == torch.float32:
            return self.mel_fb, self.window
        window = torch.hann_window(self.cfg.win_length, periodic=True, device=device)
        return mel_filterbank(self.cfg).to(device), window

    def _pad(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T + 2p), p = n_fft // 2: each sample padded as if it were alone.

        torch.stft(center=True) pads the *batch* tensor, so the right edge of a short sample would
        reflect the batch's zero padding instead of its own audio, and its last frames would change with
        its batch-mates. Instead we build each sample's own centre padding here (its reflection, or
        zeros, placed right after its last sample) and run the STFT with center=False. A valid frame t
        reads padded samples [t * hop, t * hop + n_fft) which, for t < num_frames(len), lie inside the
        sample's own padded signal, so the result is exactly the single-sample one.
        """
        B, T = wave.shape
        p = self.cfg.n_fft // 2
        t = torch.arange(T, device=wave.device)
        wave = wave.masked_fill(t >= lengths[:, None], 0.0)  # whatever the caller padded with
        out = nn.functional.pad(wave, (p, p))
        if self.cfg.pad_mode == "constant" or p == 0:
            return out  # zeros on both sides of every sample already
        L = lengths[:, None]
        k = torch.arange(p, device=wave.device)
        # Reflection without repeating the edge sample (numpy "reflect"), periodic with period 2(L - 1)
        # so samples shorter than p still get a defined padding (as np.pad does).
        period = (2 * (L - 1)).clamp(min=1)

        def reflect(i: torch.Tensor) -> torch.Tensor:  # source index i (B, p), -p <= i < L + p -> [0, L)
            i = i.abs() % period
            return torch.where(i >= L, period - i, i)

        # out[:, j] holds source index j - p: the p on the left are -p..-1, the p after the sample L..L+p-1.
        out[:, :p] = wave.gather(1, reflect(k[None, :] - p))
        out.scatter_(1, L + p + k[None, :], wave.gather(1, reflect(L + k[None, :])))
        return out

    def forward(
        self, wave: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if wave.ndim != 2:
            raise ValueError(f"wave must be (B, T), got shape {tuple(wave.shape)}")
        B, T = wave.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=wave.device)
        lengths = lengths.to(device=wave.device, dtype=torch.long)
        if lengths.shape != (B,) or B and (lengths.min() < 1 or lengths.max() > T):
            raise ValueError(f"lengths must be (B,) = ({B},) with 1 <= length <= T = {T}, "
                             f"got {lengths.tolist()}")
        cfg = self.cfg
        mel_fb, window = self._fp32_buffers(wave.device)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            x = wave.float()
            if cfg.center:
                x = self._pad(x, lengths)
            spec = torch.stft(x, cfg.n_fft, cfg.hop_length, cfg.win_length, window, center=False,
                              return_complex=True)  # (B, n_freqs, N)
            power = spec.real.square() + spec.imag.square()
            feats = torch.log(torch.matmul(mel_fb, power).clamp(min=cfg.log_floor)).transpose(1, 2)
        frame_lengths = cfg.num_frames(lengths)
        valid = torch.arange(feats.shape[1], device=feats.device) < frame_lengths[:, None]
        return feats.masked_fill(~valid[..., None], 0.0).contiguous(), frame_lengths


def normalize_features(feats: torch.Tensor, frame_lengths: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance, per-bin zero mean and unit variance over the valid frames.

    feats (B, N, M), frame_lengths (B,) -> (B, N, M) float32, (x - mean) / sqrt(var + eps) with the
    population variance; padded frames stay 0. A constant bin (e.g. silence on the log floor) becomes 0.
    """
    x = feats.float()
    valid = (torch.arange(x.shape[1], device=x.device) < frame_lengths.to(x.device)[:, None])[..., None]
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = x.masked_fill(~valid, 0.0).sum(1, keepdim=True) / n
    centred = (x - mean).masked_fill(~valid, 0.0)
    var = centred.square().sum(1, keepdim=True) / n
    return centred * torch.rsqrt(var + eps)
