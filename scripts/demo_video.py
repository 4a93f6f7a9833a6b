"""Ask a question about a video; the answer streams to stdout.

    python -m scripts.demo_video --video PATH --question TEXT --checkpoint DIR [--lm DIR] [--frames 16]
        [--max-new-tokens 64] [--temperature 0] [--top-p 0.9] [--timeout 60] [--backend auto|decord|pyav]

--checkpoint: a directory written by our training (config.json + model.safetensors + tokenizer.model) of a
              model with a video adapter; --tokenizer overrides the tokenizer.model looked up there.
--lm:         the frozen LM of an export that does not hold it (see scripts.demo_vqa).
--video:      a video file; a still image (JPEG, PNG, a one-frame GIF...) is refused: use scripts.demo_vqa.
--frames:     frames sampled uniformly over the whole video, 1 to the checkpoint's video.max_frames. A video
              with fewer frames repeats them; the repeats are masked out of the model's view.
--timeout:    seconds before a stuck decode is killed (0: decode in this process, no watchdog).

A line on stderr says how many frames were read, by which decoder, and how many are repeats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from adapters.chat import Message
from adapters.checkpoint import CheckpointError
from adapters.model_io import load_checkpoint
from adapters.multimodal import MultimodalConfig
from adapters.tokenizer import Tokenizer, TokenizerError
from scripts.demo_vqa import add_sampling_args, find_tokenizer, stream_answer
from video.adapter import VideoBatch
from video.frames import collate_videos, tile_frames, video_tiling
from video.reader import SampledFrames, VideoReader, VideoReadError


def video_model_problem(cfg: MultimodalConfig, model_dir: Path, frames: int) -> str | None:
    """Why this checkpoint cannot answer about ``frames`` frames, or None."""
    if cfg.video is None:
        return f"{model_dir}: the checkpoint has no video adapter (an image-only model; try scripts.demo_vqa)"
    if not 1 <= frames <= cfg.video.max_frames:
        return f"--frames must be in [1, {cfg.video.max_frames}] (the checkpoint's max_frames), got {frames}"
    return None


def still_image_problem(path: str) -> str | None:
    """Why ``path`` is a still image, not a video (decoders read a JPEG as a 1-frame video), or None."""
    try:
        with Image.open(path) as img:
            kind, frames = img.format, getattr(img, "n_frames", 1)
    except (OSError, ValueError):  # not an image PIL knows (a video, or unreadable: the reader says which)
        return None
    if frames > 1:  # an animated GIF / WebP is a video
        return None
    return f"{path}: a still image ({kind}), not a video; ask about images with scripts.demo_vqa --image"


def describe(clip: SampledFrames, name: str) -> str:
    repeats = int((~clip.frame_mask).sum())
    info = clip.info
    return (f"{name}: read {len(clip.frame_mask)} frames with {clip.backend}, {repeats} of them repeats "
            f"(the video has {info.n_frames} frames, {info.duration_s:.1f} s at {info.fps:g} fps)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--checkpoint", required=True, help="our checkpoint directory (with a video adapter)")
    p.add_argument("--lm", default=None, help="the frozen LM of an export without it")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--frames", type=int, default=16)
    add_sampling_args(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per decode (0: no watchdog)")
    p.add_argument("--backend", choices=("auto", "decord", "pyav"), default="auto")
    args = p.parse_args(argv)
    if args.timeout < 0:
        p.error(f"--timeout must be >= 0, got {args.timeout:g}")

    model_dir = Path(args.checkpoint)
    problem = still_image_problem(args.video)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model = load_checkpoint(model_dir, lm_path=args.lm)
        tok = Tokenizer(find_tokenizer(model_dir, args.tokenizer))
        problem = video_model_problem(model.cfg, model_dir, args.frames)
        if problem is None:
            reader = VideoReader(backend=args.backend, timeout_s=args.timeout or None)
            clip = reader.sample(args.video, args.frames)
    except (CheckpointError, TokenizerError, VideoReadError) as e:  # VideoTimeoutError is a VideoReadError
        problem = str(e)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(describe(clip, args.video), file=sys.stderr)
    model.eval()
    tiled = tile_frames(clip, video_tiling(model.cfg.vision.tile_size))
    videos = VideoBatch.from_collated(collate_videos([[tiled]])).trimmed()
    return stream_answer(model, tok, Message("user", args.question, n_videos=1), args, videos=videos)


if __name__ == "__main__":
    raise SystemExit(main())
