"""Average the trainable weights of exports that share a base: all of them, or the top K by a validation metric.

    python -m scripts.average_checkpoints EXPORT EXPORT... --out DIR [--metric FILE [--top-k K] [--lower-is-better]]

EXPORT:  our image/video (``multimodal``) or speech exports of one sweep: the same kind, model config, frozen LM
         (``lm_fingerprint``, or the LM tensors an export holds), provenance keys, tokenizer and tensor layout;
         frozen tensors bitwise equal (`training.averaging`).
--out:   the averaged export, loaded like any other (scripts.demo_vqa / demo_video / demo_asr); ``averaging.json``
         beside it records which exports went in and their scores.
--metric: the exports' validation scores: ``*.json`` = {"EXPORT": score, ...} or ``*.jsonl`` = one
         {"export": "EXPORT", "score": score} per line; relative paths are read from the file's folder. Every
         given export needs a score; higher is better unless --lower-is-better.
--top-k: average the K best by --metric instead of all.

Exports that do not share a base, a bad or incomplete metric file, and bad arguments print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import CheckpointError
from scripts.demo_vqa import positive_int
from training.averaging import average_exports, read_scores, top_k_exports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", metavar="EXPORT")
    p.add_argument("--out", required=True, help="directory of the averaged export")
    p.add_argument("--metric", default=None, help="validation scores: *.json {export: score} or *.jsonl rows")
    p.add_argument("--top-k", type=positive_int, default=None, help="average the K best by --metric")
    p.add_argument("--lower-is-better", action="store_true", help="with --metric: a lower score is better")
    args = p.parse_args(argv)
    if len(args.exports) < 2:
        p.error("give at least two exports to average")
    if args.top_k is not None and args.metric is None:
        p.error("--top-k needs --metric FILE (the scores that rank the exports)")
    if args.top_k is not None and args.top_k > len(args.exports):
        p.error(f"--top-k {args.top_k}: only {len(args.exports)} exports given")
    if args.lower_is_better and args.metric is None:
        p.error("--lower-is-better goes with --metric")

    exports = [Path(e) for e in args.exports]
    try:
        scores = read_scores(args.metric, exports) if args.metric else None
        chosen, selection = exports, {"method": "uniform"}
        if args.top_k is not None:
            chosen = top_k_exports(exports, scores, args.top_k, args.lower_is_better)
            selection = {"method": "top_k", "k": args.top_k, "metric": str(Path(args.metric).resolve()),
                         "higher_is_better": not args.lower_is_better}
        average_exports(exports, args.out, chosen, scores, selection)
    except CheckpointError as e:  # AveragingError, and ExportFormatError for a directory that is no export
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = "uniform" if args.top_k is None else f"the top {args.top_k} by {args.metric}"
    print(f"average_checkpoints: averaged {len(chosen)} of {len(exports)} exports ({how}) into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
