"""Ask a question about a video; the answer streams to stdout. Or answer a file of questions.

    python -m scripts.demo_video --video PATH --question TEXT --checkpoint DIR [--lm DIR] [--frames 16]
        [--max-new-tokens 64] [--temperature 0] [--top-p 0.9] [--timeout 60] [--backend auto|decord|pyav]
    python -m scripts.demo_video --questions FILE.jsonl --out PREDICTIONS.jsonl --checkpoint DIR [...]

--checkpoint: a directory written by our training (config.json + model.safetensors + tokenizer.model) of a
              model with a video adapter; --tokenizer overrides the tokenizer.model looked up there.
--lm:         the frozen LM of an export that does not hold it (see scripts.demo_vqa).
--video:      a video file; a still image (JPEG, PNG, a one-frame GIF...) is refused: use scripts.demo_vqa.
--frames:     frames sampled uniformly over the whole video, 1 to the checkpoint's video.max_frames. A video
              with fewer frames repeats them; the repeats are masked out of the model's view.
--timeout:    seconds before a stuck decode is killed (0: decode in this process, no watchdog).

--questions:  batch mode: JSONL rows {"id", "video": path relative to the file's folder, "question", "kind"},
              each answered exactly as --video/--question would be (the model loads once); {"id", "answer"}
              lines go to --out, in input order, renamed into place at the end (see scripts._batch).

A line on stderr says how many frames were read, by which decoder, and how many are repeats (per video in
single mode; batch mode shows progress and a summary instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from adapters.chat import Message
from adapters.checkpoint import CheckpointError
from adapters.generation import GenerationLengthError
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from adapters.tokenizer import Tokenizer, TokenizerError
from adapters.video_adapter import VideoBatch
from media.video import SampledFrames, VideoReader, VideoReadError
from scripts._batch import (BatchInputError, Row, add_batch_args, check_batch_args, read_questions,
                            write_predictions)
from scripts.demo_vqa import add_sampling_args, answer_pieces, find_tokenizer, load_export, print_stream
from vision.frames import collate_videos, tile_frames, video_tiling


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


class StillImageError(ValueError):
    """A still image was given where a video is expected."""


def read_clip(reader: VideoReader, path: str | Path, frames: int) -> SampledFrames:
    """``frames`` frames of the video at ``path``; `StillImageError` / `VideoReadError` when it is none."""
    problem = still_image_problem(str(path))
    if problem is not None:
        raise StillImageError(problem)
    return reader.sample(str(path), frames)


def ask(model: MultimodalLlama, tok: Tokenizer, args, question: str, clip: SampledFrames) -> Iterator[str]:
    """The answer about one sampled clip, as text pieces (`answer_pieces`): both modes come through here."""
    tiled = tile_frames(clip, video_tiling(model.cfg.vision.tile_size))
    videos = VideoBatch.from_collated(collate_videos([[tiled]])).trimmed()
    return answer_pieces(model, tok, Message("user", question, n_videos=1), args, videos=videos)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(p, "video")
    p.add_argument("--question", default=None, help="with --video: the question")
    p.add_argument("--checkpoint", required=True, help="our checkpoint directory (with a video adapter)")
    p.add_argument("--lm", default=None, help="the frozen LM of an export without it")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--frames", type=int, default=16)
    add_sampling_args(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per decode (0: no watchdog)")
    p.add_argument("--backend", choices=("auto", "decord", "pyav"), default="auto")
    args = p.parse_args(argv)
    check_batch_args(p, args, single_only=("--question",))
    if args.video is not None and args.question is None:
        p.error("--video needs --question")
    if args.timeout < 0:
        p.error(f"--timeout must be >= 0, got {args.timeout:g}")

    model_dir = Path(args.checkpoint)
    reader = VideoReader(backend=args.backend, timeout_s=args.timeout or None)
    try:
        rows = read_questions(args.questions, "video") if args.questions else None
        model = load_export(model_dir, args.lm)
        tok = Tokenizer(find_tokenizer(model_dir, args.tokenizer))
        problem = video_model_problem(model.cfg, model_dir, args.frames)
        if problem is not None:
            raise CheckpointError(problem)
        if rows is None:
            clip = read_clip(reader, args.video, args.frames)
            print(describe(clip, args.video), file=sys.stderr)
            pieces = ask(model, tok, args, args.question, clip)
    except (BatchInputError, CheckpointError, TokenizerError, StillImageError, VideoReadError,
            GenerationLengthError) as e:  # VideoTimeoutError is a VideoReadError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rows is None:
        return print_stream(pieces)
    def answer(row: Row) -> str:
        return "".join(ask(model, tok, args, row.question, read_clip(reader, row.media, args.frames)))

    return write_predictions(rows, answer, args.out, (StillImageError, VideoReadError, GenerationLengthError),
                             "demo_video")


if __name__ == "__main__":
    raise SystemExit(main())
