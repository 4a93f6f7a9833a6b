"""The tiny end-to-end image job (``make demo``): data -> train -> checkpoint -> answers -> accuracy.

    python -m scripts.demo_pipeline [--out runs/demo] [--steps N] [--clip-steps N] [--seed S] [--n-show K]

1. renders the synthetic VQA set (held-out images saved as PNG under OUT/heldout/);
2. CLIP-pretrains the tiny image encoder on the training captions, pre-trains and freezes a tiny LM on
   text, then trains encoder + cross-attention adapter on CPU;
3. saves a checkpoint to OUT/checkpoint and loads it back from disk;
4. answers every held-out question, printing image path, question, answer and whether it is right;
5. prints the overall accuracy and writes OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapters.model_io import load_checkpoint, save_checkpoint
from adapters.vqa import VQAEncoder, answer, run_vqa_benchmark
from adapters.tokenizer import Tokenizer
from synthetic.shapes import save_vqa_set


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--clip-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-show", type=int, default=40, help="held-out answers to print (all are scored)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    metrics, model, enc, test = run_vqa_benchmark(args.steps, args.seed, out, clip_steps=args.clip_steps)
    ckpt = save_checkpoint(model, out / "checkpoint", tokenizer_path=out / "tokenizer.model")
    save_vqa_set(test, out / "heldout")

    reloaded = load_checkpoint(ckpt).eval()
    enc = VQAEncoder(Tokenizer(ckpt / "tokenizer.model"), reloaded.cfg)
    preds = answer(reloaded, enc, test)
    right = 0
    for i, (r, pred) in enumerate(zip(test, preds)):
        ok = pred == r.answer
        right += ok
        if i < args.n_show:
            print(f"{r.image_path}  Q: {r.question:32s} A: {pred:10s} {'right' if ok else 'WRONG (' + r.answer + ')'}")
    accuracy = right / len(test)
    print(f"held-out accuracy {accuracy:.3f} on {len(test)} questions (chance {metrics['chance_accuracy']:.3f}, "
          f"frozen LM alone {metrics['frozen_lm_alone_accuracy']:.3f}); checkpoint: {ckpt}")
    report = dict(metrics, reloaded_checkpoint_accuracy=accuracy, checkpoint=str(ckpt))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
