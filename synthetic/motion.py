"""Rendered motion clips whose answer no single frame holds: a ball moving left, right, up or down.

Each clip is drawn with PIL, encoded to H.264 mp4 bytes with PyAV, and read back through
`media.video.VideoReader` like any other video. The path's centre is uniform over the frame, so the
ball's position in the middle frame has the same distribution for every direction (clips have an odd
number of frames: the middle frame shows the ball exactly at the centre): a model that sees one frame
is at chance (1/4), only the motion across frames tells the direction.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# One ball colour on one background: the tiny frozen encoder's features then mark the ball plainly, and
# the only thing left to learn is the motion (with five colours on three backgrounds the tiny aggregator
# needs several times the data and steps).
BALL_COLOURS = {"white": (240, 240, 240)}
BACKGROUNDS = ((20, 20, 20),)
QUESTION = "Which way does the ball move?"
PLACES = tuple(f"{row} {col}" for row in ("top", "middle", "bottom") for col in ("left", "centre", "right"))
POSITION_QUESTION = "Where is the ball?"  # answerable from one frame: what the image stage learns
MOTION_QUESTIONS = {"direction": (QUESTION, tuple(DIRECTIONS)), "position": (POSITION_QUESTION, PLACES)}


@dataclass
class MotionClip:
    video: bytes  # H.264 mp4
    direction: str
    n_frames: int
    size: int
    colour: str
    centres: list[tuple[float, float]]  # the ball's (x, y) in each frame
    stills: dict[int, np.ndarray]  # frame index -> RGB (size, size, 3): the first, middle and last frames

    @property
    def middle(self) -> int:
        return self.n_frames // 2

    def place(self, t: int) -> str:
        """Where the ball is in frame t, on a 3 x 3 grid: "top left"."""
        x, y = self.centres[t]
        col = ("left", "centre", "right")[min(2, int(3 * x / self.size))]
        row = ("top", "middle", "bottom")[min(2, int(3 * y / self.size))]
        return f"{row} {col}"

    def frame_caption(self, t: int) -> str:
        """"a white ball at the top left"."""
        return f"a {self.colour} ball at the {self.place(t)}"


def render_frames(rng: random.Random, direction: str, n_frames: int, size: int = 56,
                  travel: float = 0.6) -> tuple[np.ndarray, str, list[tuple[float, float]]]:
    """A ball crossing ``travel * size`` pixels in ``direction``: frames (n_frames, size, size, 3) uint8,
    the ball's colour name and its centre in each frame."""
    r = max(3, size // 9)
    d = travel * size
    dx, dy = DIRECTIONS[direction]
    # The path's centre keeps the whole path inside the frame; both axes draw from the same range, so
    # the middle frame's ball position has one distribution whatever the direction.
    lo, hi = r + d / 2, size - r - d / 2
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    colour, bg = rng.choice(sorted(BALL_COLOURS)), rng.choice(BACKGROUNDS)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    centres = []
    for t in range(n_frames):
        s = t / (n_frames - 1) - 0.5
        x, y = cx + s * d * dx, cy + s * d * dy
        img = Image.new("RGB", (size, size), bg)
        ImageDraw.Draw(img).ellipse((x - r, y - r, x + r, y + r), fill=BALL_COLOURS[colour])
        frames[t] = np.asarray(img)
        centres.append((x, y))
    return frames, colour, centres


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 18) -> bytes:
    """uint8 (F, H, W, 3) -> H.264 (yuv420p) mp4 bytes; H and W must be even."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "veryfast"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def make_motion_clips(n: int, seed: int, size: int = 56, min_frames: int = 9, max_frames: int = 25) -> list[MotionClip]:
    """``n`` clips with balanced directions and an odd frame count in [min_frames, max_frames]."""
    rng = random.Random(seed)
    dirs = [list(DIRECTIONS)[i % len(DIRECTIONS)] for i in range(n)]
    rng.shuffle(dirs)
    clips = []
    for direction in dirs:
        n_frames = rng.randrange(min_frames | 1, max_frames + 1, 2)
        frames, colour, centres = render_frames(rng, direction, n_frames, size)
        stills = {t: frames[t] for t in (0, n_frames // 2, n_frames - 1)}
        clips.append(MotionClip(encode_mp4(frames), direction, n_frames, size, colour, centres, stills))
    return clips


def frame_caption_set(clips: list[MotionClip], reader, per_clip: int = 3) -> tuple[list[Image.Image], list[str]]:
    """Frames (first, middle, last by default) decoded through ``reader``, captioned with the ball's place:
    the contrastive pre-training set for the tiny encoder (it learns where the ball is, not where it goes)."""
    images, captions = [], []
    for c in clips:
        got = reader.sample(c.video, per_clip, name="clip.mp4")
        for frame, t in zip(got.frames, got.indices.tolist()):
            images.append(Image.fromarray(frame))
            captions.append(c.frame_caption(t))
    return images, captions


def motion_corpus_text() -> list[str]:
    return [QUESTION, POSITION_QUESTION, *DIRECTIONS, *PLACES, *BALL_COLOURS, "a ball at the", "video"]
