"""Speech front end: load_audio (formats, mono mix, resampling, every bad file an AudioReadError naming
it, crop/chunk of long audio) and the log-mel features (filterbank and log-mel parity with librosa,
exact batching, per-utterance normalisation).

Audio is synthesised: sines, chirps, noise, and a real speech clip from espeak-ng when it is installed.
"""

import pickle
import subprocess
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from speech.audio import (
    SILENCE_DB,
    Audio,
    AudioReadError,
    chunk_audio,
    load_audio,
    wav_data_shortfall,
    write_audio,
)
from speech.features import LogMel, LogMelConfig, mel_filterbank, normalize_features
from tests.system_deps import require_binary

SR = 16_000


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def chirp(seconds: float = 2.0) -> np.ndarray:
    """50 Hz -> 7.5 kHz sweep plus a little noise: energy in every mel bin at some point."""
    t = np.arange(round(seconds * SR)) / SR
    f0, f1 = 50.0, 7_500.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    noise = np.random.default_rng(0).standard_normal(len(t)) * 1e-2
    return (0.5 * np.sin(phase) + noise).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


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


# ---------------------------------------------------------------- features


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


# ---------------------------------------------------------------- load_audio


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg"])
def test_load_formats(tmp_path, suffix):
    x = sine(440, 1.0, SR)
    path = write_audio(tmp_path / f"tone{suffix}", x, SR)
    for src in (path, str(path), path.read_bytes()):
        audio = load_audio(src)
        assert isinstance(audio, Audio) and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
        assert (audio.sample_rate, audio.source_rate, audio.source_channels) == (SR, SR, 1)
        assert len(audio.samples) == SR and audio.duration_s == 1.0 and audio.offset_s == 0.0
        if suffix == ".ogg":  # lossy: the tone survives, the samples do not
            assert peak_hz(audio.samples, SR) == 440
            assert abs(audio.rms_db - 20 * np.log10(0.5 / np.sqrt(2))) < 0.5
        else:  # 16-bit PCM
            np.testing.assert_allclose(audio.samples, x, atol=1 / 32_768)
        assert audio.clipped_fraction == 0.0 and not audio.is_silent


def test_stereo_is_channel_mean(tmp_path):
    left, right = sine(440, 0.5, SR, 0.3), sine(1_000, 0.5, SR, 0.6)
    path = write_audio(tmp_path / "stereo.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.source_channels == 2 and audio.samples.shape == (len(left),)
    np.testing.assert_array_equal(audio.samples, (left + right) / 2)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100])
def test_resampling_keeps_length_and_pitch(tmp_path, rate):
    path = write_audio(tmp_path / f"tone{rate}.flac", sine(1_000, 2.0, rate), rate)
    audio = load_audio(path)
    assert audio.source_rate == rate and audio.sample_rate == SR
    assert len(audio.samples) == 2 * SR and audio.duration_s == 2.0
    assert peak_hz(audio.samples, SR) == 1_000  # 0.5 Hz FFT resolution over 2 s
    mid = audio.samples[SR // 2 : -SR // 2]  # away from the resampler's edge transients
    assert abs(np.abs(mid).max() - 0.5) < 0.01


def test_empty_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioReadError, match=r"empty\.wav: empty file"):
        load_audio(empty)
    with pytest.raises(AudioReadError, match=r"^<bytes>: empty file"):
        load_audio(b"")
    no_frames = tmp_path / "no_frames.wav"
    sf.write(no_frames, np.zeros(0, np.float32), SR)  # a valid header with 0 samples
    with pytest.raises(AudioReadError, match=r"no_frames\.wav: no audio samples"):
        load_audio(no_frames)
    with pytest.raises(AudioReadError, match=r"missing\.wav: no such file"):
        load_audio(tmp_path / "missing.wav")
    one = write_audio(tmp_path / "one.wav", np.full(1, 0.5, np.float32), 44_100)
    with pytest.raises(AudioReadError, match=r"one\.wav: too short"):
        load_audio(one)


def test_corrupt_files_name_the_file(tmp_path):
    junk = np.random.default_rng(3).bytes(4_096)
    path = tmp_path / "junk.flac"
    path.write_bytes(junk)
    with pytest.raises(AudioReadError, match=r"junk\.flac: not readable .*Format not recognised"):
        load_audio(path)
    with pytest.raises(AudioReadError, match=r"^<bytes>: not readable") as err:
        load_audio(junk)
    again = pickle.loads(pickle.dumps(err.value))  # crosses DataLoader worker processes intact
    assert (type(again), again.name, again.reason) == (AudioReadError, "<bytes>", err.value.reason)
    nan = tmp_path / "nan.wav"
    x = sine(440, 0.1, SR)
    x[10], x[20] = np.nan, np.inf
    write_audio(nan, x, SR, subtype="FLOAT")
    with pytest.raises(AudioReadError, match=r"nan\.wav: 2 NaN/inf samples"):
        load_audio(nan)


def test_truncated_files(tmp_path):
    """libsndfile raises on a cut flac ("decoder lost sync"); a cut wav, which libsndfile would read as its
    prefix, is an error too: its header declares audio the file does not hold."""
    x = (0.1 * np.random.default_rng(4).standard_normal(3 * SR)).astype(np.float32)
    flac = write_audio(tmp_path / "full.flac", x, SR).read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(flac[: len(flac) // 2])
    with pytest.raises(AudioReadError, match=r"cut\.flac: .*lost sync"):
        load_audio(cut)
    wav = write_audio(tmp_path / "full.wav", x, SR).read_bytes()
    held = (len(wav) // 2 - 44) // 2
    with pytest.raises(AudioReadError, match=rf"<bytes>: truncated WAV: its header declares 48000 frames "
                                             rf"\(3\.00 s\), the file holds {held} \(1\.50 s\)"):
        load_audio(wav[: len(wav) // 2])
    (tmp_path / "cut.wav").write_bytes(wav[: len(wav) // 2])
    with pytest.raises(AudioReadError, match=r"cut\.wav: truncated WAV"):
        load_audio(tmp_path / "cut.wav")


def test_streamed_wav_without_a_data_size_reads_whole(tmp_path):
    """Writers that cannot seek back (a pipe) leave the data size 0xFFFFFFFF: that declares nothing."""
    x = sine(440, 1.0, SR, amp=0.2)
    wav = bytearray(write_audio(tmp_path / "x.wav", x, SR).read_bytes())
    assert wav[36:40] == b"data"
    wav[40:44] = (0xFFFFFFFF).to_bytes(4, "little")
    audio = load_audio(bytes(wav))
    np.testing.assert_allclose(audio.samples, x, atol=1 / 32_768)
    assert wav_data_shortfall(bytes(wav[:64]), len(wav)) is None
    assert wav_data_shortfall(b"not a wav at all", 100) is None


def test_long_audio_decodes_only_what_is_kept(tmp_path):
    """A 10-minute file cropped to 10 s decodes 10 s: peak memory stays near what 10 s cost (decoded,
    resampled, copied: ~1.6 MB), far below the whole file as float32, and the header's length is kept."""
    import tracemalloc

    rate = 8_000
    path = write_audio(tmp_path / "ten_min.wav", sine(200, 600.0, rate, amp=0.1), rate)
    tracemalloc.start()
    try:
        audio = load_audio(path, max_seconds=10.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert audio.duration_s == 10.0 and audio.source_duration_s == 600.0
    whole = 600 * rate * 4  # the whole file as float32: 19.2 MB
    assert peak < whole / 4, f"peak {peak / 1e6:.1f} MB: the whole file was decoded"
    with pytest.raises(AudioReadError, match="600.00 s is longer"):
        load_audio(path, max_seconds=60.0, long="error")


def test_silent_and_clipped(tmp_path):
    silent = load_audio(write_audio(tmp_path / "silent.wav", np.zeros(SR, np.float32), SR))
    assert silent.is_silent and silent.rms_db == -200.0 and silent.clipped_fraction == 0.0
    quiet = load_audio(write_audio(tmp_path / "quiet.wav", sine(440, 1.0, SR, amp=0.01), SR))
    assert not quiet.is_silent and SILENCE_DB < quiet.rms_db < -40
    loud = sine(440, 1.0, SR, amp=1.5)  # 16-bit PCM clips it at full scale on write
    clipped = load_audio(write_audio(tmp_path / "clipped.wav", loud, SR))
    expected = np.mean(np.abs(np.clip(loud, -1, 1)) >= 0.999)
    assert clipped.clipped_fraction > 0.3 and abs(clipped.clipped_fraction - expected) < 0.01


def test_long_audio_crop_error_and_chunks(tmp_path):
    rate = 22_050  # crop happens before resampling: check the lengths come out exact anyway
    path = write_audio(tmp_path / "long.flac", sine(300, 70.0, rate, amp=0.1), rate)
    audio = load_audio(path)  # max_seconds=60, long="crop"
    assert len(audio.samples) == 60 * SR and audio.duration_s == 60.0
    assert len(load_audio(path, max_seconds=None).samples) == 70 * SR
    with pytest.raises(AudioReadError, match=r"long\.flac: 70\.00 s is longer than max_seconds=60"):
        load_audio(path, long="error")
    assert len(load_audio(path, max_seconds=70.0, long="error").samples) == 70 * SR
    with pytest.raises(ValueError, match="long"):
        load_audio(path, long="truncate")

    talk_path = write_audio(tmp_path / "talk.flac", sine(300, 150.0, SR, amp=0.1), SR)
    talk = load_audio(talk_path, max_seconds=None)
    pieces = chunk_audio(talk)
    assert [p.duration_s for p in pieces] == [60.0, 60.0, 30.0]
    assert [p.offset_s for p in pieces] == [0.0, 60.0, 120.0]
    np.testing.assert_array_equal(np.concatenate([p.samples for p in pieces]), talk.samples)
    assert all(p.source_rate == SR and abs(p.rms_db - talk.rms_db) < 0.1 for p in pieces)


def test_write_audio_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        write_audio(tmp_path / "x.mp4", np.zeros(10, np.float32), SR)
