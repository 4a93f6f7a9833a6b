"""media.audio: load_audio (formats, mono mix, resampling, every bad file an AudioReadError naming it, crop
and chunk of long audio) and write_audio. Audio is synthesised: sines and noise."""

import pickle

import numpy as np
import pytest
import soundfile as sf

from media.audio import (
    SILENCE_DB,
    Audio,
    AudioReadError,
    chunk_audio,
    load_audio,
    wav_data_shortfall,
    write_audio,
)

SR = 16_000


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


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
