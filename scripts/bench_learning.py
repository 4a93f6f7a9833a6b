"""Proof that the image, video and speech adapters learn, on CPU: synthetic data, tiny frozen LM, held out.

    python -m scripts.bench_learning speech [--seed S] [--json] [--work-dir DIR]
    python -m scripts.bench_learning image|video [--steps N] [--clip-steps N] [--seed S] [--json]
        [--work-dir DIR] [--save DIR]

--save DIR writes the trained model to DIR/checkpoint (for scripts.demo_vqa / demo_video) and the held-out
set to DIR/heldout (records.jsonl + the images or mp4 clips).

image (in-process recipe, `adapters.vqa.run_vqa_benchmark`; the production road for image,
`python -m scripts.learning_image`, reaches 0.88 and replaces it once it meets the bars): renders
shapes/colours/positions/counts with PIL, CLIP-pretrains the tiny image encoder on the training scenes'
captions, pre-trains a tiny LM on text-only dialogs (it never sees an image, so alone it is at chance) and
freezes it, then trains encoder + adapter on the questions. Reports held-out accuracy (greedy answers, exact
match on unseen scenes) next to chance and the frozen-LM-alone accuracy.

video: renders clips of a ball moving left/right/up/down (PIL -> H.264 mp4 -> read back through
`video.reader.VideoReader`, 16 frames each), CLIP-pretrains the tiny encoder on captioned frames, trains
an image model on single frames, then a video adapter on top of it (encoder, projector, image layers and
LM frozen). Reports held-out direction accuracy next to an image-only model trained on the middle frame
(one frame cannot tell the direction: chance is 0.25). See `video.vqa`.

speech: the production road (scripts/learning_speech.py): make_synthetic spoken-digits (espeak-ng clips,
the tokenizer, text-only ASR dialogs) -> build_audio_shards (configs/audio_curation_synthetic.yaml) -> train
text LM on the dialogs (configs/run_text_speech_synthetic.yaml) -> train_speech_adapter (random Conformer +
adapter, configs/run_speech_synthetic.yaml) -> export -> demo_asr batch transcripts -> score. Reports
held-out WER, CER and exact match next to the no-audio baseline (demo_asr on the untrained speech model
around the frozen LM: the LM alone on the ASR prompt), a few transcripts and the seconds of each stage;
--work-dir DIR keeps every file (DIR/out/synthetic/..., DIR/runs/synthetic/...).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from adapters.model_io import save_checkpoint
from adapters.vqa import run_vqa_benchmark
from scripts.learning_speech import run_speech_road, summary
from synthetic.shapes import save_vqa_set
from video.vqa import run_video_benchmark, save_video_qa_set

DEFAULT_STEPS = {"image": 600, "video": 600}
ROADS = {"speech": run_speech_road}  # modality -> its road (steps: the run configs')
DEFAULT_CLIP_STEPS = {"image": 600, "video": 600}
BENCHMARKS = {"image": (run_vqa_benchmark, save_vqa_set), "video": (run_video_benchmark, save_video_qa_set)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modality", choices=sorted([*ROADS, *DEFAULT_STEPS]), help="which adapter to train")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--clip-steps", type=int, default=None,
                   help="contrastive encoder pre-training steps (default 600; 0: random encoder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None,
                   help="image, speech: every file of the road; video: the tokenizer (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--save", default=None, help="write DIR/checkpoint and DIR/heldout")
    args = p.parse_args(argv)
    if args.modality in ROADS:
        return _road(p, args)
    steps = args.steps or DEFAULT_STEPS[args.modality]
    clip_steps = DEFAULT_CLIP_STEPS.get(args.modality) if args.clip_steps is None else args.clip_steps
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.work_dir or tmp)
        progress = not args.json
        run, save_set = BENCHMARKS[args.modality]
        metrics, model, _, test = run(steps, args.seed, work_dir, clip_steps=clip_steps, progress=progress)
        if args.save:
            save = Path(args.save)
            metrics["checkpoint"] = str(save_checkpoint(model, save / "checkpoint", work_dir / "tokenizer.model"))
            metrics["heldout"] = str(save_set(test, save / "heldout"))
    metrics["modality"] = args.modality
    metrics["torch_threads"] = torch.get_num_threads()
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


def _road(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The speech road: its steps are the run configs', and --work-dir keeps the export and everything else."""
    for flag, value in (("--steps", args.steps), ("--clip-steps", args.clip_steps), ("--save", args.save)):
        if value is not None:
            p.error(f"{flag} does not apply to {args.modality}: its steps are configs/run_*_synthetic.yaml's and "
                    "--work-dir DIR keeps every file (DIR/runs/synthetic/*/export is the model)")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = ROADS[args.modality](args.work_dir or tmp, args.seed, progress=not args.json)
    if not args.json:  # a few held-out answers, right or wrong, and the headline numbers
        print(summary(metrics), file=sys.stderr)
    metrics["modality"] = args.modality
    metrics["torch_threads"] = torch.get_num_threads()
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
