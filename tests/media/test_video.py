"""VideoReader: the right K frames from decord and PyAV alike, every bad file a VideoReadError naming it,
and a watchdog that kills hung or crashed decoders without leaving processes or scratch files behind.

Synthetic clips are encoded with PyAV. Frame i has its left half at grey level 8 * i (its right half
is noise, so that the files have enough bytes to cut), so decoded pixels say which frame came back.
"""

import multiprocessing as mp
import os
import pickle
import re
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pytest

import media.video as reader_mod
from media.video import (
    BACKENDS,
    MAX_FRAMES,
    DecordBackend,
    PyAVBackend,
    VideoInfo,
    VideoReader,
    VideoReadError,
    VideoTimeoutError,
    source_name,
    uniform_indices,
)

N, FPS, W, H = 30, 10, 96, 64  # the main clip: 30 frames, 3 s
LEVEL = 8  # grey step per frame index
TIMEOUT = 20.0  # watchdog for real decodes: generous, these take ~50 ms


# ---------------------------------------------------------------- synthetic clips


def encode(path: Path, n: int, codec: str = "libx264", container_options: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.bit_rate = 2_000_000  # mpeg4's default 200 kb/s blurs the grey levels by more than 2
        for i in range(n):
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            img[:, : W // 2] = LEVEL * i
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path


def encode_audio_only(path: Path) -> Path:
    rate = 16_000
    tone = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)[None]  # 1 s of 440 Hz
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    c = {
        "mp4": encode(d / "clip.mp4", N),  # H.264 with B-frames, moov atom at the end
        "mp4_faststart": encode(d / "faststart.mp4", N, container_options={"movflags": "faststart"}),
        "short": encode(d / "short.mp4", 5),
        "webm": encode(d / "clip.webm", N, codec="libvpx"),  # VP8
        "avi": encode(d / "clip.avi", N, codec="mpeg4"),
        "audio": encode_audio_only(d / "tone.m4a"),
    }
    data = c["mp4"].read_bytes()
    assert data.find(b"moov") > data.find(b"mdat")
    data = c["mp4_faststart"].read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    return c


def frame_ids(frames: np.ndarray) -> np.ndarray:
    """The source frame index each decoded frame shows (its left quarter's grey level / LEVEL)."""
    means = frames[:, :, : W // 4].reshape(len(frames), -1).mean(axis=1)
    ids = np.round(means / LEVEL).astype(np.int64)
    assert np.all(np.abs(means - LEVEL * ids) < 2.5), means  # close to a level, not a blend of two
    return ids


def expect_error(source, backend: str, k: int = 8, timeout_s: float | None = TIMEOUT, match: str = "",
                 name: str | None = None) -> VideoReadError:
    t0 = time.monotonic()
    with pytest.raises(VideoReadError) as info:
        VideoReader(backend, timeout_s=timeout_s).sample(source, k, name=name)
    err = info.value
    assert not isinstance(err, VideoTimeoutError), err
    assert time.monotonic() - t0 < 10
    prefix = source_name(source, name)
    assert str(err).startswith(f"{prefix}: "), err
    assert err.name == prefix
    assert match in err.reason, err
    if backend == "auto" and Path(prefix).suffix not in (".webm", ".avi"):
        assert "decord: " in err.reason and "pyav: " in err.reason, err  # both backends' reasons
    return err


# ---------------------------------------------------------------- leak checks around every test


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch):
    """Every watchdog child is reaped and every scratch frames file is deleted by the end of the test."""
    scratch, pids = [], []
    real_mkstemp, real_fork = tempfile.mkstemp, os.fork

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        scratch.append(path)
        return fd, path

    def fork():
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fork", fork)
    yield scratch, pids
    for pid in pids:
        with pytest.raises(ChildProcessError):  # already reaped: no zombie, no live child
            os.waitpid(pid, os.WNOHANG)
    leftover = [p for p in scratch if os.path.exists(p)]
    assert not leftover, leftover


# ---------------------------------------------------------------- uniform_indices


@pytest.mark.parametrize("n,k", [(30, 8), (30, 30), (31, 2), (1000, 64), (65, 64), (64, 64)])
def test_uniform_indices_spread_over_whole_video(n, k):
    idx, mask = uniform_indices(n, k)
    assert idx.dtype == np.int64 and idx.shape == (k,) and mask.shape == (k,)
    assert idx[0] == 0 and idx[-1] == n - 1
    steps = np.diff(idx)
    assert np.all(steps >= 1) and steps.max() - steps.min() <= 1  # uniform up to rounding
    assert mask.all()


def test_uniform_indices_single_frame_is_the_middle_one():
    assert uniform_indices(1, 1)[0].tolist() == [0]
    assert uniform_indices(31, 1)[0].tolist() == [15]
    assert uniform_indices(30, 1)[0].tolist() == [14]
    assert uniform_indices(30, 1)[1].tolist() == [True]


@pytest.mark.parametrize("k", [2, 8, 63, 64])
def test_uniform_indices_short_video_repeats_in_order(k):
    for n in range(1, k):
        idx, mask = uniform_indices(n, k)
        assert idx[0] == 0 and idx[-1] == n - 1
        assert np.all(np.diff(idx) >= 0)  # temporal order kept
        assert len(np.unique(idx)) == n  # every frame used
        assert mask.sum() == n
        assert mask[0] and np.array_equal(mask[1:], idx[1:] != idx[:-1])  # False exactly on repeats
        counts = np.bincount(idx)
        assert counts.max() - counts.min() <= 1  # repeats spread evenly


@pytest.mark.parametrize("n,k", [(0, 8), (-3, 8), (10, 0), (10, -1), (10, MAX_FRAMES + 1), (10, 2.5),
                                 (10.0, 4), (None, 4)])
def test_uniform_indices_bad_arguments(n, k):
    with pytest.raises(ValueError):
        uniform_indices(n, k)


# ---------------------------------------------------------------- decoding the right frames


@pytest.mark.parametrize("kind", ["mp4", "mp4_faststart", "avi"])
@pytest.mark.parametrize("k", [1, 8, 30])
def test_decord_and_pyav_return_the_same_right_frames(clips, kind, k):
    out = {be: VideoReader(be, timeout_s=TIMEOUT).sample(clips[kind], k) for be in ("decord", "pyav")}
    want_idx, want_mask = uniform_indices(N, k)
    for be, clip in out.items():
        assert clip.backend == be
        assert clip.frames.shape == (k, H, W, 3) and clip.frames.dtype == np.uint8
        assert clip.frames.flags.c_contiguous
        np.testing.assert_array_equal(clip.indices, want_idx)
        np.testing.assert_array_equal(clip.frame_mask, want_mask)
        np.testing.assert_array_equal(frame_ids(clip.frames), want_idx)
        assert clip.info == VideoInfo(N, float(FPS), W, H)
        assert clip.info.duration_s == pytest.approx(N / FPS)
    diff = np.abs(out["decord"].frames.astype(int) - out["pyav"].frames.astype(int))
    assert diff.mean() < 1.0, diff.mean()


def test_sampled_frames_are_the_first_last_and_evenly_spaced(clips):
    clip = VideoReader("auto", timeout_s=TIMEOUT).sample(clips["mp4"], 8)
    assert clip.backend == "decord"
    assert frame_ids(clip.frames).tolist() == [0, 4, 8, 12, 17, 21, 25, 29]


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_short_video_repeats_frames_with_mask(clips, backend):
    clip = VideoReader(backend, timeout_s=TIMEOUT).sample(clips["short"], 8)
    assert clip.info.n_frames == 5
    assert clip.indices.tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    assert clip.frame_mask.tolist() == [True, False, True, False, True, True, False, True]
    np.testing.assert_array_equal(frame_ids(clip.frames), clip.indices)
    for j in np.flatnonzero(~clip.frame_mask):  # a repeat is the very same image
        np.testing.assert_array_equal(clip.frames[j], clip.frames[j - 1])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_max_frames_from_a_shorter_video(clips, backend):
    clip = VideoReader(backend, timeout_s=TIMEOUT).sample(clips["mp4"], MAX_FRAMES)
    assert clip.frames.shape == (MAX_FRAMES, H, W, 3)
    assert clip.frame_mask.sum() == N
    assert sorted(set(frame_ids(clip.frames).tolist())) == list(range(N))


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_input(clips, backend, wrap):
    from_path = VideoReader(backend, timeout_s=TIMEOUT).sample(clips["mp4"], 8)
    clip = VideoReader(backend, timeout_s=TIMEOUT).sample(wrap(clips["mp4"].read_bytes()), 8)
    assert clip.backend == from_path.backend
    assert clip.info == from_path.info
    np.testing.assert_array_equal(clip.indices, from_path.indices)
    np.testing.assert_array_equal(clip.frames, from_path.frames)


@pytest.mark.parametrize("kind", ["webm", "avi"])
def test_webm_and_avi_route_to_pyav_in_auto_mode(clips, kind):
    with av.open(str(clips[kind])) as container:
        assert container.streams.video[0].codec_context.name == {"webm": "vp8", "avi": "mpeg4"}[kind]
    clip = VideoReader("auto", timeout_s=TIMEOUT).sample(clips[kind], 8)
    assert clip.backend == "pyav"
    np.testing.assert_array_equal(frame_ids(clip.frames), uniform_indices(N, 8)[0])
    # Bytes route by the name they are given.
    data = clips[kind].read_bytes()
    assert VideoReader("auto", timeout_s=None).sample(data, 8, name=f"x/y.{kind.upper()}").backend == "pyav"


def test_auto_without_decord_uses_pyav(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    clip = VideoReader("auto", timeout_s=None).sample(clips["mp4"], 4)
    assert clip.backend == "pyav"


def test_probe(clips):
    assert VideoReader().probe(clips["mp4"]) == VideoInfo(N, float(FPS), W, H)
    assert VideoReader("decord").probe(clips["mp4"]) == VideoInfo(N, float(FPS), W, H)
    assert VideoReader().probe(clips["webm"].read_bytes()) == VideoInfo(N, float(FPS), W, H)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_in_process_and_watchdog_give_the_same_frames(clips, backend):
    a = VideoReader(backend, timeout_s=None).sample(clips["mp4"], 16)
    b = VideoReader(backend, timeout_s=TIMEOUT).sample(clips["mp4"], 16)
    assert a.info == b.info and a.backend == b.backend
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.frame_mask, b.frame_mask)
    np.testing.assert_array_equal(a.frames, b.frames)


# ---------------------------------------------------------------- files that must be rejected


def _bad_file(clips, tmp_path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "nope.mp4"
    if kind == "directory":
        return tmp_path
    if kind == "empty":
        (tmp_path / "empty.mp4").write_bytes(b"")
        return tmp_path / "empty.mp4"
    if kind == "random":
        p = tmp_path / "random.mp4"
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
        return p
    if kind == "text":
        p = tmp_path / "notes.mp4"
        p.write_text("not a video\n" * 200)
        return p
    if kind == "audio_only":
        return clips["audio"]
    if kind == "truncated":  # moov atom (the index) is in the lost half
        return cut(clips["mp4"], tmp_path / "half.mp4", 0.5)
    if kind == "truncated_faststart":  # index intact, half the frame data gone
        return cut(clips["mp4_faststart"], tmp_path / "half_faststart.mp4", 0.5)
    if kind == "header_cut":  # the moov atom (at the end) cut where the codec parameters start
        data = clips["mp4"].read_bytes()
        p = tmp_path / "moov_cut.mp4"
        p.write_bytes(data[: data.index(b"stsd", data.rindex(b"moov"))])
        return p
    raise AssertionError(kind)


REASONS = {"missing": "no such file", "directory": "no such file", "empty": "empty file"}
BAD = ["missing", "directory", "empty", "random", "text", "audio_only", "truncated", "truncated_faststart",
       "header_cut"]


@pytest.mark.parametrize("timeout_s", [TIMEOUT, None], ids=["watchdog", "in_process"])
@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
@pytest.mark.parametrize("kind", BAD)
def test_bad_files_raise_video_read_error_naming_the_file(clips, tmp_path, kind, backend, timeout_s):
    path = _bad_file(clips, tmp_path, kind)
    err = expect_error(path, backend, timeout_s=timeout_s, match=REASONS.get(kind, ""))
    if kind == "audio_only" and backend != "decord":
        assert "no video stream (streams: audio)" in err.reason
    if kind == "truncated_faststart" and backend != "decord":
        assert "truncated" in err.reason
    if kind == "header_cut" and backend != "decord":
        assert "video stream has no codec parameters" in err.reason
    # The same bytes without a path: named <bytes>, or by the caller.
    if path.is_file():
        expect_error(path.read_bytes(), backend, timeout_s=timeout_s)
        expect_error(path.read_bytes(), backend, timeout_s=timeout_s, name="shard-0007/key.mp4")


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
@pytest.mark.parametrize("k", [1, 2, 8, MAX_FRAMES])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_truncated_faststart_mp4_is_an_error_for_any_k(clips, tmp_path, backend, k, fraction):
    """The index survives the cut, so the demuxer delivers the first part cleanly: it must not be
    sampled as if it were the whole video (K=1 decodes only the middle frame, which still exists)."""
    path = cut(clips["mp4_faststart"], tmp_path / "cut.mp4", fraction)
    expect_error(path, backend, k=k, timeout_s=None)


def test_mp4_index_cut_anywhere_is_an_error(clips):
    """Every cut inside the moov atom, up to its trailing user-data box, fails cleanly in-process."""
    data = clips["mp4"].read_bytes()
    moov, udta = data.rindex(b"moov") - 4, data.rindex(b"udta") - 4
    reasons = set()
    for end in range(moov, udta, 16):
        for backend in ("decord", "pyav"):
            err = expect_error(data[:end], backend, k=4, timeout_s=None, name=f"cut{end}.mp4")
            reasons.add(err.reason.split(" (")[0])
    assert len(reasons) > 3, reasons  # the cuts really do land in different places
    assert VideoReader("pyav", timeout_s=None).sample(data[:udta], 4).info.n_frames == N


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_truncated_webm_is_an_error(clips, tmp_path, backend):
    path = cut(clips["webm"], tmp_path / "half.webm", 0.5)
    for k in (1, 8):
        expect_error(path, backend, k=k, match="truncated")


def test_probe_errors_are_video_read_errors(clips, tmp_path):
    for kind in ("missing", "random", "audio_only", "header_cut", "truncated_faststart"):
        path = _bad_file(clips, tmp_path, kind)
        with pytest.raises(VideoReadError, match=f"^{re.escape(str(path))}: "):
            VideoReader().probe(path)


def test_errors_pickle_with_their_type():
    for err in (VideoReadError("a.mp4", "broken"), VideoTimeoutError("b.mp4", "slow")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.name == err.name and back.reason == err.reason
        assert str(back) == str(err)
    assert issubclass(VideoTimeoutError, VideoReadError) and issubclass(VideoReadError, ValueError)


# ---------------------------------------------------------------- watchdog


class FakeBackend:
    """A decoder stand-in whose ``sample`` misbehaves in the (forked) watchdog child."""

    def __init__(self, how: str, name: str = "fake", pid_file: Path | None = None):
        self.how, self.name, self.pid_file = how, name, pid_file

    def probe(self, source, name):
        return VideoInfo(3, 1.0, 4, 2)

    def sample(self, source, k, name):
        if self.pid_file is not None:
            self.pid_file.write_text(str(os.getpid()))
        if self.how == "hang":  # as decord's get_batch does, holding the GIL (dmlc/decord#373)
            time.sleep(30)
        elif self.how == "exit":
            os._exit(3)
        elif self.how == "kill":  # e.g. the OOM killer
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == "raise":
            raise RuntimeError("boom")
        elif self.how == "read_error":
            raise VideoReadError(name, "custom reason")
        idx, mask = uniform_indices(3, k)
        frames = np.broadcast_to(idx[:, None, None, None].astype(np.uint8), (k, 2, 4, 3))
        return VideoInfo(3, 1.0, 4, 2), idx, mask, frames


def use_backends(monkeypatch, *backends):
    monkeypatch.setattr(VideoReader, "_backends", lambda self, name: list(backends))


def test_watchdog_kills_a_hung_decoder(tmp_path, no_leaks):
    scratch, pids = no_leaks
    pid_file = tmp_path / "child.pid"
    t0 = time.monotonic()
    with pytest.raises(VideoTimeoutError, match=r"^hang\.mp4: fake did not finish within 1 s"):
        reader_mod._sample_with_timeout(FakeBackend("hang", pid_file=pid_file), b"x", 4, "hang.mp4", 1.0)
    assert time.monotonic() - t0 < 1.0 + 2.0
    child = int(pid_file.read_text())
    assert pids == [child]
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child, 0)
    assert len(scratch) == 1 and not os.path.exists(scratch[0])
    if os.access("/dev/shm", os.W_OK):
        assert scratch[0].startswith("/dev/shm/")


def test_reader_timeout_raises_video_timeout_error(monkeypatch, tmp_path):
    use_backends(monkeypatch, FakeBackend("hang"))
    t0 = time.monotonic()
    with pytest.raises(VideoTimeoutError, match=r"^clip\.mp4: fake did not finish"):
        VideoReader(timeout_s=0.5).sample("clip.mp4", 8)
    assert time.monotonic() - t0 < 0.5 + 2.0


def test_every_backend_timing_out_is_a_timeout_with_both_reasons(monkeypatch):
    use_backends(monkeypatch, FakeBackend("hang", "decord"), FakeBackend("hang", "pyav"))
    t0 = time.monotonic()
    with pytest.raises(VideoTimeoutError) as info:
        VideoReader(timeout_s=0.5).sample("clip.mp4", 8)
    assert time.monotonic() - t0 < 2 * 0.5 + 2.0
    assert "decord: decord did not finish" in info.value.reason
    assert "pyav: pyav did not finish" in info.value.reason


def test_auto_falls_back_to_pyav_when_decord_hangs(clips, monkeypatch):
    monkeypatch.setattr(DecordBackend, "sample", lambda self, source, k, name: time.sleep(30))
    t0 = time.monotonic()
    clip = VideoReader("auto", timeout_s=1.0).sample(clips["mp4"], 8)
    assert time.monotonic() - t0 < 1.0 + 3.0
    assert clip.backend == "pyav"
    np.testing.assert_array_equal(frame_ids(clip.frames), uniform_indices(N, 8)[0])


@pytest.mark.parametrize("timeout_s", [TIMEOUT, None], ids=["watchdog", "in_process"])
def test_auto_falls_back_to_pyav_when_decord_fails(clips, monkeypatch, timeout_s):
    def broken(self, source, k, name):
        raise VideoReadError(name, "decord is broken today")

    monkeypatch.setattr(DecordBackend, "sample", broken)
    clip = VideoReader("auto", timeout_s=timeout_s).sample(clips["mp4"], 8)
    assert clip.backend == "pyav"
    np.testing.assert_array_equal(frame_ids(clip.frames), uniform_indices(N, 8)[0])


@pytest.mark.parametrize("how,reason", [("exit", "decoder process died (exit code 3)"),
                                        ("kill", "decoder process died (killed by SIGKILL)")])
def test_crashed_child_is_a_read_error_not_a_hang(monkeypatch, how, reason):
    use_backends(monkeypatch, FakeBackend(how))
    t0 = time.monotonic()
    with pytest.raises(VideoReadError) as info:
        VideoReader(timeout_s=TIMEOUT).sample("crash.mp4", 8)
    assert time.monotonic() - t0 < 5
    assert not isinstance(info.value, VideoTimeoutError)
    assert str(info.value) == f"crash.mp4: fake {reason}"


@pytest.mark.parametrize("timeout_s", [TIMEOUT, None], ids=["watchdog", "in_process"])
def test_backend_exceptions_become_read_errors(monkeypatch, timeout_s):
    use_backends(monkeypatch, FakeBackend("raise"))
    with pytest.raises(VideoReadError, match=r"^boom\.mp4: RuntimeError: boom$"):
        VideoReader(timeout_s=timeout_s).sample("boom.mp4", 8)
    use_backends(monkeypatch, FakeBackend("read_error"))
    with pytest.raises(VideoReadError, match=r"^own\.mp4: custom reason$"):
        VideoReader(timeout_s=timeout_s).sample("own.mp4", 8)


def test_watchdog_returns_the_child_frames(monkeypatch):
    use_backends(monkeypatch, FakeBackend("ok"))
    clip = VideoReader(timeout_s=TIMEOUT).sample("ok.mp4", 5)
    assert clip.backend == "fake" and clip.frames.shape == (5, 2, 4, 3) and clip.frames.dtype == np.uint8
    assert clip.frames[:, 0, 0, 0].tolist() == clip.indices.tolist() == [0, 0, 1, 1, 2]
    assert clip.frame_mask.tolist() == [True, False, True, False, True]


def _sample_in_worker(path, queue):
    try:
        clip = VideoReader("auto", timeout_s=TIMEOUT).sample(path, 4)
        queue.put(("ok", frame_ids(clip.frames).tolist()))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        queue.put(("error", repr(e)))


def test_watchdog_works_inside_a_daemonic_worker(clips):
    """PyTorch DataLoader workers are daemonic, and multiprocessing refuses to start children there."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=_sample_in_worker, args=(str(clips["mp4"]), queue), daemon=True)
    worker.start()
    try:
        assert queue.get(timeout=30) == ("ok", uniform_indices(N, 4)[0].tolist())
    finally:
        worker.join(10)
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert worker.exitcode == 0


def test_fork_failure_leaves_no_scratch_file(monkeypatch, no_leaks):
    scratch, _ = no_leaks

    def fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", fork)
    with pytest.raises(BlockingIOError):  # a system problem, not this video's: not a VideoReadError
        reader_mod._sample_with_timeout(FakeBackend("ok"), b"x", 4, "x.mp4", 1.0)
    assert len(scratch) == 1  # and the autouse fixture checks it is gone


def test_watchdog_with_file_descriptors_above_1024(clips):
    """A busy data-loading process can hold over a thousand files; select() cannot wait on those fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    fds = []
    try:
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        assert max(fds) > 1024
        clip = VideoReader("pyav", timeout_s=TIMEOUT).sample(clips["mp4"], 4)
        np.testing.assert_array_equal(frame_ids(clip.frames), uniform_indices(N, 4)[0])
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------- arguments


def test_invalid_arguments_raise_value_error(clips, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        VideoReader("ffmpeg")
    for t in (0, -1.0):
        with pytest.raises(ValueError, match="timeout_s"):
            VideoReader(timeout_s=t)
    reader = VideoReader(timeout_s=TIMEOUT)
    for k in (0, -1, MAX_FRAMES + 1, 2.5, "8"):
        with pytest.raises(ValueError, match="num_frames") as info:
            reader.sample(tmp_path / "missing.mp4", k)  # checked before the file is looked at
        assert not isinstance(info.value, VideoReadError)
    assert reader.sample(clips["mp4"], np.int64(4)).frames.shape == (4, H, W, 3)


def test_public_constants():
    assert MAX_FRAMES == 64
    assert BACKENDS == {"decord": DecordBackend, "pyav": PyAVBackend}
    assert source_name(b"x") == "<bytes>" and source_name(Path("a/b.mp4")) == "a/b.mp4"
    assert source_name(b"x", name="k.mp4") == "k.mp4"
