"""speech.features: the log-mel front end (filterbank and log-mel parity with librosa, exact batching,
per-utterance normalisation). Audio is synthesised: chirps, noise, and a real speech clip from espeak-ng
when it is installed.
"""

import subprocess
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch

from media.audio import load_audio
from speech.features import LogMel, LogMelConfig, mel_filterbank, normalize_features
from tests.system_deps import require_binary

SR = 16_000


def chirp(seconds: float = 2.0) -> np.ndarray:
    """50 Hz -> 7.5 kHz sweep plus a little noise: energy in every mel bin at some point."""
    t = np.arange(round(seconds * SR)) / SR
    f0, f1 = 50.0, 7_500.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    noise = np.random.default_rng(0).standard_normal(len(t)) * 1e-2
    return (0.5 * np.sin(phase) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    text = "The quick brown fox jumps over the lazy dog. Speech recognition needs clean features."
    subprocess.run([require_binary("espeak-ng"), "-w", str(path), text], check=True, capture_output=True, timeout=30)
    return path


def librosa_logmel(y: np.ndarray, pad_mode: str) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=y, sr=SR, n_fft=400, hop_length=160, win_length=400, window="hann", center=True,
        pad_mode=pad_mode, power=2.0, n_mels=80, fmin=0, fmax=8000,
    )
    return mel.T  # (frames, 80) power


def test_filterbank_matches_librosa():
    ours = mel_filterbank(LogMelConfig())
    ref = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80, fmin=0, fmax=8000)  # htk=False, norm="slaney"
    assert ours.shape == (80, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


def assert_logmel_matches(y: np.ndarray, pad_mode: str) -> None:
    feats, frame_lengths = LogMel(LogMelConfig(pad_mode=pad_mode))(torch.from_numpy(y)[None])
    ref = librosa_logmel(y, pad_mode)
    assert feats.shape == (1, 1 + len(y) // 160, 80) == (1, *ref.shape)
    assert frame_lengths.tolist() == [ref.shape[0]]
    # fp32 STFT round-off is relative to the frame's energy, so the log error grows in bins far below
    # the frame's loudest: measured up to 8e-5 within 50 dB of it, up to 1e-3 within 90 dB.
    ours = feats[0].numpy()
    rel = ref / np.maximum(ref.max(axis=1, keepdims=True), 1e-30)  # espeak clips start with digital silence
    above_floor = ref > 1e-9
    loud = above_floor & (rel > 1e-5)
    assert loud.mean() > 0.3
    np.testing.assert_allclose(ours[loud], np.log(ref[loud]), rtol=0, atol=2e-4)
    quiet = above_floor & (rel > 1e-9)
    np.testing.assert_allclose(ours[quiet], np.log(ref[quiet]), rtol=0, atol=5e-3)
    silent = ref < 1e-12  # digital silence sits on the floor on both sides
    np.testing.assert_array_equal(ours[silent], np.float32(np.log(1e-10)))


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_logmel_matches_librosa_on_chirp(pad_mode):
    assert_logmel_matches(chirp(), pad_mode)


def test_logmel_matches_librosa_on_speech(speech_wav):
    audio = load_audio(speech_wav)
    assert audio.source_rate == 22_050 and audio.sample_rate == SR and not audio.is_silent
    assert_logmel_matches(audio.samples, "reflect")


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_logmel_batching_is_exact(pad_mode):
    """A sample's valid frames do not depend on its batch-mates or on what its padding holds (the end
    of a short sample must reflect its own audio, not the batch's padding); frames past it are 0."""
    logmel = LogMel(LogMelConfig(pad_mode=pad_mode))
    rng = np.random.default_rng(1)
    lengths = [100, 201, 1_000, 4_321, 16_000]  # 100 < n_fft // 2: reflection repeats (as np.pad does)
    waves = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in lengths]
    T = max(lengths) + 999
    batch = torch.full((len(lengths), T), 7.0)  # garbage padding: must be ignored
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    feats, frame_lengths = logmel(batch, torch.tensor(lengths))
    assert feats.shape == (len(lengths), 1 + T // 160, 80)
    assert frame_lengths.tolist() == [1 + n // 160 for n in lengths]
    for i, w in enumerate(waves):
        alone, n = logmel(w[None])
        assert n.tolist() == [frame_lengths[i].item()]
        torch.testing.assert_close(feats[i, : n.item()], alone[0], rtol=0, atol=1e-6)
        assert (feats[i, n.item():] == 0).all()


def test_logmel_reflect_padding_is_numpy_reflect():
    """The per-sample padding is np.pad(mode="reflect"), also for samples shorter than the pad."""
    logmel = LogMel()
    for n in (37, 200, 201, 1_000):
        x = torch.randn(1, n)
        padded = logmel._pad(x, torch.tensor([n]))
        np.testing.assert_array_equal(padded[0].numpy(), np.pad(x[0].numpy(), 200, mode="reflect"))


def test_logmel_is_fp32_under_bf16():
    wave = torch.from_numpy(chirp(0.5))[None]
    ref, _ = LogMel()(wave)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = LogMel()(wave)
    cast, _ = LogMel().to(torch.bfloat16)(wave)  # buffers cast to bf16 are rebuilt in fp32
    assert auto.dtype == cast.dtype == torch.float32
    torch.testing.assert_close(auto, ref, rtol=0, atol=0)
    torch.testing.assert_close(cast, ref, rtol=0, atol=0)
    LogMel()(wave.bfloat16())  # bf16 input is accepted (upcast)


def test_logmel_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        LogMel()(torch.zeros(2, 100), torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="lengths"):
        LogMel()(torch.zeros(2, 100), torch.tensor([50, 101]))
    with pytest.raises(ValueError, match="pad_mode"):
        LogMelConfig(pad_mode="edge")


def test_normalize_features_masks_padding():
    logmel = LogMel()
    rng = np.random.default_rng(2)
    a, b = chirp(1.0), rng.standard_normal(5_000).astype(np.float32) * 0.1
    batch = torch.zeros(2, len(a))
    batch[0], batch[1, : len(b)] = torch.from_numpy(a), torch.from_numpy(b)
    feats, frame_lengths = logmel(batch, torch.tensor([len(a), len(b)]))
    norm = normalize_features(feats, frame_lengths)
    for i, n in enumerate(frame_lengths.tolist()):
        valid = norm[i, :n]
        torch.testing.assert_close(valid.mean(0), torch.zeros(80), rtol=0, atol=1e-4)
        torch.testing.assert_close(valid.std(0, unbiased=False), torch.ones(80), rtol=0, atol=1e-3)
        assert (norm[i, n:] == 0).all()
        alone = normalize_features(*logmel(batch[i : i + 1, : len(a) if i == 0 else len(b)]))
        torch.testing.assert_close(valid, alone[0], rtol=0, atol=1e-5)
    silent = normalize_features(*logmel(torch.zeros(1, 1_600)))  # constant bins -> 0, not NaN
    assert torch.isfinite(silent).all() and (silent == 0).all()
