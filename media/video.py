"""Uniform frame sampling from a video file: decord by default, PyAV as the fallback, with a watchdog.

    reader = VideoReader()                      # backend "auto", 60 s timeout
    clip = reader.sample("clip.mp4", 64)        # SampledFrames: frames (64, H, W, 3) uint8, frame_mask, ...

Llama 3 (sec. 7.4) samples up to 64 frames uniformly over the whole video. decord is the paper's
decoder, but it has not been released since 2021 and has known failure modes (dmlc/decord#373: a
container that over-reports its frame count makes ``get_batch`` spin forever in native code while
holding the GIL; #91 / #195: wrong frames from VP8/webm seeks and on some AVI files). So:

* Decoders sit behind a two-method interface (`probe`, `sample`), with `DecordBackend` and
  `PyAVBackend` implementations.
* ``backend="auto"`` uses decord except for containers with known decord bugs (.webm, .avi), and
  falls back to PyAV when decord fails or times out. PyAV decodes sequentially, so it cannot hang on
  a wrong frame count: it reports the shortfall as an error instead.
* With ``timeout_s`` set, decoding runs in a forked child process that is killed when the time is up
  (a thread cannot interrupt native code holding the GIL). The frames come back through a scratch
  file in /dev/shm. The child is started with ``os.fork``, not ``multiprocessing``, which refuses to
  start children from daemonic processes such as PyTorch DataLoader workers.

Every failure (missing, empty, corrupt, audio-only, truncated, timed out) raises `VideoReadError`
(or its subclass `VideoTimeoutError`) whose message starts with the file name.

Short videos (fewer decodable frames than requested) repeat frames in temporal order;
``frame_mask`` is False for each repeat, so the temporal aggregator can ignore them.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import pickle
import select
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

MAX_FRAMES = 64  # the paper's most frames per video
VideoSource = str | os.PathLike | bytes

# Containers where decord is known to return wrong frames (see the module docstring): PyAV reads them.
DECORD_AVOID_SUFFIXES = frozenset({".webm", ".avi"})


class VideoReadError(ValueError):
    """A video could not be read. ``str(err)`` is "<name>: <reason>"."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.name, self.reason))


class VideoTimeoutError(VideoReadError):
    """Decoding took longer than the reader's ``timeout_s`` and was killed."""


@dataclass(frozen=True)
class VideoInfo:
    n_frames: int  # as the container reports it (decord) or counted from packets (PyAV)
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps if self.fps > 0 else 0.0


@dataclass
class SampledFrames:
    """frames (K, H, W, 3) uint8 RGB; indices (K,) source frame numbers; frame_mask (K,) bool, False
    where a short video repeats an earlier frame; backend: which decoder produced them."""

    frames: np.ndarray
    indices: np.ndarray
    frame_mask: np.ndarray
    info: VideoInfo
    backend: str


def source_name(source: VideoSource, name: str | None = None) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fsdecode(source)


def uniform_indices(n_frames: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """K frame indices spread uniformly over ``n_frames`` (first and last included) and the mask of
    distinct ones. With fewer frames than K each frame is repeated in place (nearest-neighbour
    stretch); repeats are False in the mask."""
    if not isinstance(n_frames, numbers.Integral) or n_frames < 1:
        raise ValueError(f"n_frames must be an integer >= 1, got {n_frames!r}")
    if not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_FRAMES:
        raise ValueError(f"num_frames must be an integer in [1, {MAX_FRAMES}], got {k!r}")
    if k == 1:
        idx = np.array([(n_frames - 1) // 2])
    elif n_frames >= k:
        idx = np.linspace(0, n_frames - 1, k).round().astype(np.int64)
    else:
        idx = np.floor(np.arange(k) * n_frames / k).astype(np.int64)
    mask = np.ones(k, dtype=bool)
    mask[1:] = idx[1:] != idx[:-1]
    return idx.astype(np.int64), mask


class VideoBackend(Protocol):
    name: str

    def probe(self, source: VideoSource, name: str) -> VideoInfo: ...

    def sample(self, source: VideoSource, k: int, name: str) -> tuple[VideoInfo, np.ndarray, np.ndarray, np.ndarray]:
        """-> (info, indices (k,), frame_mask (k,), frames (k, H, W, 3) uint8)."""
        ...


def _as_file(source: VideoSource):
    return io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def _check_exists(source: VideoSource, name: str) -> None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoReadError(name, "empty file (0 bytes)")
        return
    path = Path(os.fspath(source))
    if not path.is_file():
        raise VideoReadError(name, "no such file")
    if path.stat().st_size == 0:
        raise VideoReadError(name, "empty file (0 bytes)")


class DecordBackend:
    """decord's ``VideoReader.get_batch``: seeks and converts only the requested frames."""

    name = "decord"

    def __init__(self, num_threads: int = 0):
        self.num_threads = num_threads

    def _open(self, source: VideoSource, name: str):
        import decord

        _check_exists(source, name)
        try:
            return decord.VideoReader(_as_file(source), ctx=decord.cpu(0), num_threads=self.num_threads)
        except Exception as e:  # decord raises DECORDError / RuntimeError with native messages
            raise VideoReadError(name, f"decord cannot open it: {str(e).splitlines()[0][:200]}") from None

    def probe(self, source: VideoSource, name: str) -> VideoInfo:
        vr = self._open(source, name)
        n = len(vr)
        if n < 1:
            raise VideoReadError(name, "no video frames")
        h, w = vr[0].shape[:2]
        return VideoInfo(n, float(vr.get_avg_fps()), int(w), int(h))

    def sample(self, source: VideoSource, k: int, name: str) -> tuple[VideoInfo, np.ndarray, np.ndarray, np.ndarray]:
        vr = self._open(source, name)
        n = len(vr)
        if n < 1:
            raise VideoReadError(name, "no video frames")
        idx, mask = uniform_indices(n, k)
        try:
            frames = vr.get_batch([int(i) for i in idx]).asnumpy()
        except Exception as e:
            raise VideoReadError(name, f"decord failed to decode: {str(e).splitlines()[0][:200]}") from None
        h, w = frames.shape[1:3]
        return VideoInfo(n, float(vr.get_avg_fps()), int(w), int(h)), idx, mask, np.ascontiguousarray(frames)


class PyAVBackend:
    """PyAV (FFmpeg) decoding in presentation order, converting only the requested frames to RGB.

    The frame count comes from the demuxed packets (no decode), not from the container header. A
    stream that yields fewer frames than it has packets is reported as truncated, never padded.
    """

    name = "pyav"

    def __init__(self, threads: bool = True):
        self.threads = threads

    def _open(self, source: VideoSource, name: str):
        import av

        _check_exists(source, name)
        try:
            container = av.open(_as_file(source))
        except Exception as e:
            raise VideoReadError(name, f"not a readable video container ({type(e).__name__}: {e})") from None
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]  # before close() empties them
            container.close()
            raise VideoReadError(name, f"no video stream (streams: {', '.join(kinds)}); audio-only file?")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # e.g. an mp4 whose moov atom is cut short
            container.close()
            raise VideoReadError(name, "video stream has no codec parameters (damaged header, unknown codec)")
        if self.threads:
            stream.thread_type = "AUTO"
        return container, stream

    def probe(self, source: VideoSource, name: str) -> VideoInfo:
        container, stream = self._open(source, name)
        with container:
            n, first, end, tail_corrupt = 0, None, None, False
            try:
                for pkt in container.demux(stream):
                    if not pkt.size:  # the empty flush packet at the end
                        continue
                    n += 1
                    tail_corrupt = pkt.is_corrupt
                    if pkt.pts is not None:
                        first = pkt.pts if first is None else min(first, pkt.pts)
                        stop = pkt.pts + (pkt.duration or 0)
                        end = stop if end is None else max(end, stop)
            except Exception as e:
                raise VideoReadError(name, f"corrupt stream while counting packets ({e})") from None
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            w, h = stream.codec_context.width, stream.codec_context.height
            tb = stream.time_base
            covered = float((end - first) * tb) if end is not None and tb else None
            declared = _declared_duration_s(container, stream)
        if n < 1:
            raise VideoReadError(name, "no video frames")
        # A truncated file still demuxes cleanly up to the cut: without these checks its first part would
        # be sampled as if it were the whole video.
        if tail_corrupt:
            raise VideoReadError(name, f"truncated file: the last of its {n} video packets is incomplete")
        if covered is not None and declared and covered + (1 / fps if fps else 0) < 0.9 * declared:
            raise VideoReadError(name, f"truncated file: its video packets cover {covered:.2f} s of the "
                                       f"{declared:.2f} s the container declares")
        return VideoInfo(n, fps, int(w), int(h))

    def read(self, source: VideoSource, indices: np.ndarray, name: str) -> np.ndarray:
        want: dict[int, list[int]] = {}
        for pos, i in enumerate(indices.tolist()):
            want.setdefault(int(i), []).append(pos)
        last = max(want)
        out: list[np.ndarray | None] = [None] * len(indices)
        container, stream = self._open(source, name)
        decoded = 0
        with container:
            try:
                for frame in container.decode(stream):
                    if decoded in want:
                        rgb = frame.to_ndarray(format="rgb24")
                        for pos in want[decoded]:
                            out[pos] = rgb
                    decoded += 1
                    if decoded > last:
                        break
            except Exception as e:
                raise VideoReadError(name, f"decoding failed after {decoded} frames ({type(e).__name__}: {e})") from None
        if decoded <= last:
            raise VideoReadError(name, f"only {decoded} frames could be decoded but frame {last} was needed "
                                       "(truncated file, or a container that over-reports its frame count)")
        return np.stack(out)

    def sample(self, source: VideoSource, k: int, name: str) -> tuple[VideoInfo, np.ndarray, np.ndarray, np.ndarray]:
        info = self.probe(source, name)
        idx, mask = uniform_indices(info.n_frames, k)
        frames = self.read(source, idx, name)
        return VideoInfo(info.n_frames, info.fps, frames.shape[2], frames.shape[1]), idx, mask, frames


def _declared_duration_s(container, stream) -> float | None:
    """The video stream's duration from the container header (mp4 mdhd, avi); the container's
    duration (webm, mkv) only when video is its sole stream, since audio may legitimately run longer."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


BACKENDS = {"decord": DecordBackend, "pyav": PyAVBackend}


def _guarded(fn, name: str, *args):
    """Call a backend method in this process, turning any stray exception into a VideoReadError: the
    same contract as the watchdog child, so one bad video never takes the caller down."""
    try:
        return fn(*args)
    except VideoReadError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is this video's failure
        raise VideoReadError(name, f"{type(e).__name__}: {e}") from e


def _child_sample(wfd: int, backend, source, k, name, frames_path) -> None:
    """The forked child: decode, write the frames to ``frames_path``, send a pickled header (or the
    error) through ``wfd``, and leave with ``os._exit`` (never back into the parent's code)."""
    code = 0
    try:
        try:
            info, idx, mask, frames = backend.sample(source, k, name)
            frames = np.ascontiguousarray(frames)
            frames.tofile(frames_path)
            msg = (info, idx, mask, frames.shape, frames.dtype.str)
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent to be raised there
            msg = e if isinstance(e, VideoReadError) else VideoReadError(name, f"{type(e).__name__}: {e}")
        with os.fdopen(wfd, "wb") as f:
            f.write(pickle.dumps(msg))
    except BaseException:  # noqa: BLE001
        code = 1
    finally:
        os._exit(code)


def _scratch_dir() -> str:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _exit_reason(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _sample_with_timeout(backend, source: VideoSource, k: int, name: str, timeout_s: float):
    """Run ``backend.sample`` in a forked child; kill it after ``timeout_s`` seconds.

    The frames come back through a file in /dev/shm (memory, not disk): a pipe would copy a 64-frame
    720p clip (177 MB) in 64 KiB pieces, which costs more than a third of the decode.
    """
    deadline = time.monotonic() + timeout_s
    fd, frames_path = tempfile.mkstemp(prefix="video-frames-", suffix=".u8", dir=_scratch_dir())
    os.close(fd)
    rfd, wfd = os.pipe()
    pid = 0
    try:
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child_sample(wfd, backend, source, k, name, frames_path)  # does not return
        os.close(wfd)
        wfd = -1
        poller = select.poll()  # not select.select, which fails on fd numbers >= 1024
        poller.register(rfd, select.POLLIN)
        chunks = []
        while True:  # until EOF: the child has written its reply and exited, or died
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(math.ceil(left * 1000)):
                reason = f"{backend.name} did not finish within {timeout_s:g} s (killed)"
                raise VideoTimeoutError(name, reason)
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        if not chunks:
            _, status = os.waitpid(pid, 0)
            pid = 0
            raise VideoReadError(name, f"{backend.name} decoder process died ({_exit_reason(status)})")
        try:
            head = pickle.loads(b"".join(chunks))
        except Exception as e:  # noqa: BLE001 - a reply cut short by the child dying mid-write
            raise VideoReadError(name, f"{backend.name} decoder process sent a garbled reply ({e})") from None
        if isinstance(head, BaseException):
            raise head
        info, idx, mask, shape, dtype = head
        frames = np.fromfile(frames_path, dtype=np.dtype(dtype)).reshape(shape)
        return info, idx, mask, frames
    finally:
        if pid > 0:
            try:
                os.kill(pid, signal.SIGKILL)  # a no-op on a child that already exited (not reaped yet)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):  # reaped elsewhere (SIGCHLD ignored)
                pass
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
        os.unlink(frames_path)


class VideoReader:
    """Sample K frames uniformly from a video.

    backend: "auto" (decord, falling back to PyAV; PyAV for .webm/.avi), "decord" or "pyav".
    timeout_s: kill a decode that runs longer (None: decode in this process, no watchdog).
    """

    def __init__(self, backend: str = "auto", timeout_s: float | None = 60.0, num_threads: int = 0):
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
        self.backend = backend
        self.timeout_s = timeout_s
        self.num_threads = num_threads

    def _backends(self, name: str) -> list:
        decord_be = DecordBackend(self.num_threads)
        pyav_be = PyAVBackend()
        if self.backend == "decord":
            return [decord_be]
        if self.backend == "pyav":
            return [pyav_be]
        if Path(name).suffix.lower() in DECORD_AVOID_SUFFIXES:
            return [pyav_be]
        try:
            import decord  # noqa: F401
        except ImportError:
            return [pyav_be]
        return [decord_be, pyav_be]

    def probe(self, source: VideoSource, name: str | None = None) -> VideoInfo:
        name = source_name(source, name)
        be = self._backends(name)[-1]  # PyAV when available: counts real packets
        return _guarded(be.probe, name, source, name)

    def sample(self, source: VideoSource, num_frames: int, name: str | None = None) -> SampledFrames:
        """Decode ``num_frames`` frames spread uniformly over the whole video."""
        name = source_name(source, name)
        if not isinstance(num_frames, numbers.Integral) or not 1 <= num_frames <= MAX_FRAMES:
            raise ValueError(f"num_frames must be an integer in [1, {MAX_FRAMES}], got {num_frames!r}")
        errors: list[VideoReadError] = []
        for be in self._backends(name):
            try:
                if self.timeout_s is None:
                    info, idx, mask, frames = _guarded(be.sample, name, source, num_frames, name)
                else:
                    info, idx, mask, frames = _sample_with_timeout(be, source, num_frames, name, self.timeout_s)
                return SampledFrames(frames, idx, mask, info, be.name)
            except VideoReadError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        reasons = "; ".join(f"{be.name}: {e.reason}" for be, e in zip(self._backends(name), errors))
        cls = VideoTimeoutError if all(isinstance(e, VideoTimeoutError) for e in errors) else VideoReadError
        raise cls(name, reasons)
