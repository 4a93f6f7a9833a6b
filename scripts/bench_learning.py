"""Proof that the image and video adapters learn, on CPU: rendered data, tiny frozen LM, held-out accuracy.

    python -m scripts.bench_learning image|video [--steps N] [--clip-steps N] [--seed S] [--json]
        [--work-dir DIR] [--save DIR]

--save DIR writes the trained model to DIR/checkpoint (for scripts.demo_vqa / scripts.demo_video) and the
held-out set to DIR/heldout (records.jsonl + the images or mp4 clips).

image:
Renders shapes/colours/positions/counts with PIL and follows the recipe in miniature: CLIP-pretrains
the tiny image encoder on the training scenes' captions, pre-trains a tiny LM on text-only dialogs (it
never sees an image, so alone it is at chance) and freezes it, then trains encoder + adapter on the
questions. Reports held-out accuracy (greedy answers, exact match on unseen scenes) next to chance and
the frozen-LM-alone accuracy.

video: renders clips of a ball moving left/right/up/down (PIL -> H.264 mp4 -> read back through
`video.reader.VideoReader`, 16 frames each), CLIP-pretrains the tiny encoder on captioned frames, trains
an image model on single frames, then a video adapter on top of it (encoder, projector, image layers and
LM frozen). Reports held-out direction accuracy next to an image-only model trained on the middle frame
(one frame cannot tell the direction: chance is 0.25). See `video.vqa`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from adapters.model_io import save_checkpoint
from adapters.vqa import run_vqa_benchmark
from data_curation.synthetic_vqa import save_vqa_set
from video.vqa import run_video_benchmark, save_video_qa_set

DEFAULT_STEPS = {"image": 600, "video": 600}
DEFAULT_CLIP_STEPS = {"image": 600, "video": 600}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modality", choices=sorted(DEFAULT_STEPS), help="which adapter to train")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--clip-steps", type=int, default=None,
                   help="contrastive encoder pre-training steps (default 600; 0: random encoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="where the tokenizer is written (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--save", default=None, help="write DIR/checkpoint and DIR/heldout")
    args = p.parse_args(argv)
    steps = args.steps or DEFAULT_STEPS[args.modality]
    clip_steps = DEFAULT_CLIP_STEPS[args.modality] if args.clip_steps is None else args.clip_steps
    run = run_vqa_benchmark if args.modality == "image" else run_video_benchmark
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.work_dir or tmp)
        metrics, model, _, test = run(steps, args.seed, work_dir, clip_steps=clip_steps, progress=not args.json)
        if args.save:
            save = Path(args.save)
            metrics["checkpoint"] = str(save_checkpoint(model, save / "checkpoint", work_dir / "tokenizer.model"))
            metrics["heldout"] = str((save_vqa_set if args.modality == "image" else save_video_qa_set)(
                test, save / "heldout"))
    metrics["modality"] = args.modality
    metrics["torch_threads"] = torch.get_num_threads()
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
