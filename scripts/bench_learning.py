"""Proof that the image adapter learns, on CPU: rendered VQA, tiny frozen LM, held-out accuracy.

    python -m scripts.bench_learning image [--steps N] [--clip-steps N] [--seed S] [--json] [--work-dir DIR]

Renders shapes/colours/positions/counts with PIL and follows the recipe in miniature: CLIP-pretrains
the tiny image encoder on the training scenes' captions, pre-trains a tiny LM on text-only dialogs (it
never sees an image, so alone it is at chance) and freezes it, then trains encoder + adapter on the
questions. Reports held-out accuracy (greedy answers, exact match on unseen scenes) next to chance and
the frozen-LM-alone accuracy.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from adapters.vqa import run_vqa_benchmark

DEFAULT_STEPS = {"image": 600}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modality", choices=sorted(DEFAULT_STEPS), help="which adapter to train")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--clip-steps", type=int, default=600,
                   help="contrastive encoder pre-training steps (0: the encoder starts from random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="where the tokenizer is written (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    args = p.parse_args(argv)
    steps = args.steps or DEFAULT_STEPS[args.modality]
    with tempfile.TemporaryDirectory() as tmp:
        metrics, *_ = run_vqa_benchmark(steps, args.seed, args.work_dir or tmp, clip_steps=args.clip_steps,
                                         progress=not args.json)
    metrics["modality"] = args.modality
    metrics["torch_threads"] = torch.get_num_threads()
    print(json.dumps(metrics, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
