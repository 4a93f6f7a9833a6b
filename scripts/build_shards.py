"""Curate image-text pairs into webdataset shards (Llama 3 sec. 7.1).

    python -m scripts.build_shards INPUT OUT [--config curation.yaml] [--workers N] [--json]

INPUT: a folder of images with sidecar captions (x.jpg + x.txt / x.json), a JSONL or parquet manifest of
image paths + captions, or webdataset tars (a .tar, a glob or a brace pattern). Runs caption rules,
language id, image rules, safety (pHash blocklist, classifier hook, face blurring), OCR, CLIP score, SSCD +
FAISS de-duplication and n-gram resampling, then writes OUT/shard_NNNNN.{tar,parquet} and
shard_NNNNN_stats.json (written last: rerunning after a kill resumes), plus OUT/report.json and plots
under OUT/report/. See data_curation/shards.py for the passes and configs/curation.yaml for every option.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_curation.curation_config import ConfigError, load_config
from data_curation.readers import CurationInputError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--config", default=None, help="curation.yaml (default: every stage at its defaults)")
    p.add_argument("--workers", type=int, default=None, help="override the config's worker count")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    args = p.parse_args(argv)
    from data_curation.shards import StageSetupError, build_shards

    try:
        cfg = load_config(args.config, {"workers": args.workers} if args.workers else None)
        result = build_shards(args.input, args.out, cfg, progress=not args.json)
    except (ConfigError, CurationInputError, StageSetupError, FileNotFoundError) as e:
        print(f"build_shards: {e}", file=sys.stderr)
        return 2
    r = result.report
    if not args.json:
        print(f"{r['inputs']} inputs -> {r['counts']['kept']} kept, {r['counts']['dropped']} dropped, "
              f"{r['counts']['error']} errors in {r['shards']} shards under {result.out}", file=sys.stderr)
    print(json.dumps(r, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
