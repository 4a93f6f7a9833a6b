"""Proof that the image, video and speech adapters learn, on CPU: synthetic data, tiny frozen LM, held out.

    python -m scripts.bench_learning image|video|speech [--steps N] [--clip-steps N] [--seed S] [--json]
        [--work-dir DIR] [--save DIR]

--save DIR writes the trained model to DIR/checkpoint (for scripts.demo_vqa / demo_video / demo_asr) and the
held-out set to DIR/heldout (records.jsonl + the images, mp4 clips or wavs).

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

speech: 3-5 digit strings spoken by espeak-ng (8 voices, random speed and pitch), a tiny LM pre-trained
on text-only ASR dialogs and frozen, then a randomly initialised tiny Conformer encoder + speech adapter
trained on the clips (--clip-steps does not apply). Reports held-out WER / CER next to the no-audio
baseline (the frozen LM alone on the ASR prompt). See `speech.asr`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from adapters.model_io import save_checkpoint
from adapters.vqa import run_vqa_benchmark
from speech.asr import run_asr_benchmark, save_asr_set, save_speech_checkpoint
from synthetic.shapes import save_vqa_set
from video.vqa import run_video_benchmark, save_video_qa_set

DEFAULT_STEPS = {"image": 600, "video": 600, "speech": 400}
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
    if args.modality == "speech" and args.clip_steps is not None:
        p.error("--clip-steps applies to image and video (the speech encoder starts from random weights)")
    clip_steps = DEFAULT_CLIP_STEPS.get(args.modality) if args.clip_steps is None else args.clip_steps
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.work_dir or tmp)
        progress = not args.json
        if args.modality == "speech":
            metrics, model, _, test = run_asr_benchmark(steps, args.seed, work_dir, progress=progress)
        else:
            run = run_vqa_benchmark if args.modality == "image" else run_video_benchmark
            metrics, model, _, test = run(steps, args.seed, work_dir, clip_steps=clip_steps, progress=progress)
        if args.save:
            save = Path(args.save)
            saver = save_speech_checkpoint if args.modality == "speech" else save_checkpoint
            metrics["checkpoint"] = str(saver(model, save / "checkpoint", work_dir / "tokenizer.model"))
            save_set = {"image": save_vqa_set, "video": save_video_qa_set, "speech": save_asr_set}[args.modality]
            metrics["heldout"] = str(save_set(test, save / "heldout"))
    metrics["modality"] = args.modality
    metrics["torch_threads"] = torch.get_num_threads()
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
