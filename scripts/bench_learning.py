"""Proof that the image, video and speech adapters learn, on CPU, through the product's own road.

    python -m scripts.bench_learning image|video|speech|posttrain [--seed S] [--work-dir DIR] [--json]

Each modality runs the road a researcher takes, every stage an entry point's ``main(argv)`` exactly as
``python -m scripts.<name> ...`` runs it, on the paths the checked-in ``configs/run_*_synthetic.yaml`` name,
rooted at ``--work-dir`` (DIR/out/synthetic/... for data, DIR/runs/synthetic/... for runs and exports; the
default is the current directory, which must not hold an earlier run: make_synthetic refuses to mix runs):

image (scripts/learning_image.py): make_synthetic image-vqa (PNG scenes + sidecar questions) -> build_shards
  -> train text (the tiny LM on text-only dialogs; frozen from here on) -> train clip (the encoder,
  contrastive, on the scenes' captions) -> train image (data.format qa) -> export -> demo_vqa batch answers ->
  score. Held-out accuracy overall and per question kind, beside chance and the frozen LM alone.
video (scripts/learning_video.py): make_synthetic video-motion (H.264 clips of a moving ball + stills) ->
  build_video_shards, build_shards of the stills -> train text, clip, image (where is the ball, one still),
  video (which way it moves: the video adapter on the image export) -> demo_video batch answers -> score.
  Held-out direction accuracy per direction, beside the image-only model asked about the middle frame and
  the frozen LM alone (chance 0.25).
speech (scripts/learning_speech.py): make_synthetic spoken-digits (espeak-ng clips) -> build_audio_shards ->
  train text -> train_speech_adapter -> demo_asr batch transcripts -> score. Held-out WER, CER and exact
  match beside the no-audio baseline.
posttrain (scripts/learning_posttrain.py): the image road (skipped when DIR already holds its export), then
  two-image conversations (LLaVA JSON) and preference scenes -> build_shards -> train SFT (two seeds) ->
  average_checkpoints -> train reward -> evaluate --task preference; an early image model -> train dpo ->
  demo_vqa answers. Two-image accuracy (SFT seeds, their average, the pre-trained model), the reward model's
  held-out pairwise accuracy, and accuracy and hallucination rate before and after DPO.

Prints a few held-out answers, right or wrong, then the JSON (with the seconds of each stage); ``--json``
prints only the JSON. Exit status 2: a stage failed (one line names its command).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from scripts._road import RoadError
from scripts.learning_image import run_image_road
from scripts.learning_image import summary as image_summary
from scripts.learning_posttrain import run_posttrain_road
from scripts.learning_posttrain import summary as posttrain_summary
from scripts.learning_speech import run_speech_road
from scripts.learning_speech import summary as speech_summary
from scripts.learning_video import run_video_road
from scripts.learning_video import summary as video_summary

# modality -> (road, its printed summary)
ROADS = {"image": (run_image_road, image_summary), "video": (run_video_road, video_summary),
         "speech": (run_speech_road, speech_summary), "posttrain": (run_posttrain_road, posttrain_summary)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_learning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modality", choices=sorted(ROADS), help="which road to run (posttrain: after the image road)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=".", help="where out/synthetic/... and runs/synthetic/... are written")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    run, summary = ROADS[args.modality]
    try:
        metrics = run(args.work_dir, args.seed, progress=not args.json)
    except RoadError as e:
        print(f"bench_learning {args.modality}: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(summary(metrics), file=sys.stderr)
    metrics["modality"] = args.modality
    metrics["torch_threads"] = torch.get_num_threads()
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
