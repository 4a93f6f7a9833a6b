"""Image curation benchmarks, side by side in one run (JSON).

    python -m scripts.bench_curation [--json] [--dedup-n 100000] [--dedup-large 1000000]
                                     [--ngram-captions 200000] [--shard-images 64] [--skip dedup,ngram,shards]

1. dedup: 512-d synthetic descriptors with planted duplicates, twice: uniform on the sphere, and in
   Zipf-sized clusters (what real SSCD descriptors look like): cell sizes (min / median / max), fraction of
   all pairs compared, recall of planted pairs (goal >= 0.99) and speed against exact all-pairs FAISS flat
   search (goal >= 10x); then the large uniform set from a memory-mapped .npy: wall time (goal <= 300 s on
   2 cores) and peak memory (``data_curation.bench_dedup``);
2. n-gram matching: captions/s on one core with a 500k-entry vocabulary (goal >= 150k/s/core), counts
   identical to a brute-force matcher on a sample (``data_curation.bench_ngram``);
3. shard building: images/s of ``build_shards`` on local files (scikit-image photos, re-encoded variants),
   every stage on (tiny random CLIP and SSCD models: the cost of the real ones is in their forward passes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def bench_shards(n_images: int, workers: int) -> dict:
    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from skimage import data as skdata

    from data_curation.curation_config import load_config
    from data_curation.shards import build_shards
    from data_curation.sscd import build_sscd
    from vision.clip import build_clip, open_clip_model_cfg
    from vision.encoder import vision_config

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(f()).convert("RGB") for f in (skdata.astronaut, skdata.coffee, skdata.chelsea,
                                                            skdata.rocket, skdata.hubble_deep_field)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        src.mkdir()
        for i in range(n_images):
            img = photos[i % len(photos)]
            w, h = img.size
            x, y = rng.integers(0, w // 4), rng.integers(0, h // 4)
            img = img.crop((x, y, x + 3 * w // 4, y + 3 * h // 4))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(rng.integers(60, 95)))
            (src / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
            (src / f"img{i:05d}.txt").write_text(f"A photo number {i} of a scene with some objects in it")
        (tmp / "clip").mkdir()
        (tmp / "clip" / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": open_clip_model_cfg(vision_config("tiny"))}))
        torch.save(build_clip(vision_config("tiny")).state_dict(), tmp / "clip" / "open_clip_pytorch_model.bin")
        torch.save(build_sscd("resnet50").state_dict(), tmp / "sscd.pt")
        cfg = {"samples_per_shard": 32, "workers": workers,
               "clip": {"model": f"local-dir:{tmp / 'clip'}", "pretrained": None, "threshold": -1.0},
               # random SSCD weights put unrelated photos above 0.75; planted crops still exceed 0.999
               "dedup": {"sscd": str(tmp / "sscd.pt"), "threshold": 0.999}}
        (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        res = build_shards(src, tmp / "out", load_config(tmp / "c.yaml"), progress=False)
        dt = time.perf_counter() - t0
    return {"images": n_images, "workers": workers, "seconds": round(dt, 2), "images_per_s": round(n_images / dt, 2),
            "stage_seconds": res.report["seconds"], "counts": res.counts,
            "models": "tiny random open_clip CLIP (width 64, 56 px), SSCD ResNet-50 at 288 px (random weights)",
            "stages": "caption, language, decode, image rules, safety (face blur), OCR, CLIP, SSCD, dedup, resample"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dedup-n", type=int, default=100_000)
    p.add_argument("--dedup-large", type=int, default=1_000_000)
    p.add_argument("--ngram-captions", type=int, default=200_000)
    p.add_argument("--shard-images", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated: dedup,ngram,shards")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"benchmark": "bench_curation", "cpu_count": os.cpu_count()}

    def log(msg):
        if not args.json:
            print(f"[bench_curation] {msg}", file=sys.stderr, flush=True)

    if "dedup" not in skip:
        from data_curation.bench_dedup import run_dedup_benchmark

        log("dedup")
        result["dedup"] = run_dedup_benchmark(args.dedup_n, args.dedup_large, progress=not args.json)
    if "ngram" not in skip:
        from data_curation.bench_ngram import run_ngram_benchmark

        log("n-gram matching")
        result["ngram"] = run_ngram_benchmark(args.ngram_captions)
    if "shards" not in skip:
        log("shard building")
        result["shards"] = bench_shards(args.shard_images, args.workers)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
