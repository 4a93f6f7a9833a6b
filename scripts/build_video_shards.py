"""Curate video-text pairs into webdataset shards (Llama 3 sec. 7.4).

    python -m scripts.build_video_shards INPUT OUT [--config configs/video_curation.yaml] [--workers N] [--json]

INPUT: a folder of videos with sidecar captions (x.mp4 + x.txt / x.json), a JSONL or parquet manifest of
video paths + captions, or webdataset tars of key.mp4 + key.txt / key.json (a .tar, a glob or a brace
pattern). Runs caption cleaning and rules, language id, decoding, OCR text overlay, CLIP frame and video
scores and the motion score, then writes OUT/shard_NNNNN.{tar,parquet} and shard_NNNNN_stats.json (written
last: rerunning after a kill resumes), plus OUT/report.json and plots under OUT/report/. See
data_curation/video_shards.py for the stages and configs/video_curation.yaml for every option.
Exit code 2: a config, input or stage setup error (the message names it).
"""

from __future__ import annotations

import argparse
import json
import sys

from data_curation.curation_config import ConfigError
from data_curation.readers import CurationInputError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--config", default=None, help="video_curation.yaml (default: every stage at its defaults)")
    p.add_argument("--workers", type=int, default=None, help="override the config's worker count")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    args = p.parse_args(argv)
    from data_curation.shards import StageSetupError
    from data_curation.video_shards import build_video_shards, load_video_config

    try:
        cfg = load_video_config(args.config, {"workers": args.workers} if args.workers else None)
        result = build_video_shards(args.input, args.out, cfg, progress=not args.json)
    except (ConfigError, CurationInputError, StageSetupError, FileNotFoundError) as e:
        print(f"build_video_shards: {e}", file=sys.stderr)
        return 2
    r = result.report
    if not args.json:
        print(f"{r['inputs']} inputs -> {r['counts']['kept']} kept, {r['counts']['dropped']} dropped, "
              f"{r['counts']['error']} errors in {r['shards']} shards under {result.out}", file=sys.stderr)
        for key, n in r["by_reason"].items():
            print(f"  {key}: {n}", file=sys.stderr)
    print(json.dumps(r, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
