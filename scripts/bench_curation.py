"""Image curation benchmarks, side by side in one run (JSON).

    python -m scripts.bench_curation [--json] [--dedup-n 100000] [--dedup-large 1000000]
                                     [--ngram-captions 200000] [--shard-images 64] [--workers 1,2]
                                     [--media-clips 48] [--skip dedup,ngram,shards,video,audio]

1. dedup: 512-d synthetic descriptors with planted duplicates, twice: uniform on the sphere, and in
   Zipf-sized clusters (what real SSCD descriptors look like): cell sizes (min / median / max), fraction of
   all pairs compared, recall of planted pairs (goal >= 0.99) and speed against exact all-pairs FAISS flat
   search (goal >= 10x); then the large uniform set from a memory-mapped .npy: wall time (goal <= 300 s on
   2 cores) and peak memory (``data_curation.bench_dedup``);
2. n-gram matching: captions/s on one core with a 500k-entry vocabulary (goal >= 150k/s/core), counts
   identical to a brute-force matcher on a sample (``data_curation.bench_ngram``);
3. shard building: images/s of ``build_shards`` on local files (scikit-image photos, re-encoded variants,
   signs with words), at 1 and 2 workers, for each stage alone and for the whole build, with real-size
   models (open_clip ViT-B/32, SSCD ResNet-50; random weights: their cost is their forward pass); the table
   goes to stderr, the figures to the JSON (``bench_build``);
4. video and audio shard building on synthetic clips: clips/s at 1 and 2 workers and each step's seconds
   per clip (``bench_media``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path


STAGES = ("safety", "ocr", "clip", "sscd")


def _bench_corpus(src: Path, n_images: int) -> None:
    """``n_images`` photos (scikit-image's, random crops, JPEG quality 60-95, about 400-500 px a side) with
    English captions; every eighth is a sign with rendered words (what OCR is for)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(f()).convert("RGB") for f in (skdata.astronaut, skdata.coffee, skdata.chelsea,
                                                            skdata.rocket, skdata.hubble_deep_field)]
    font = ImageFont.load_default(size=40)
    src.mkdir()
    for i in range(n_images):
        img = photos[i % len(photos)]
        w, h = img.size
        x, y = rng.integers(0, w // 4), rng.integers(0, h // 4)
        img = img.crop((x, y, x + 3 * w // 4, y + 3 * h // 4))
        if i % 8 == 7:
            ImageDraw.Draw(img).rectangle((20, 20, 360, 90), fill="white")
            ImageDraw.Draw(img).text((30, 30), f"OPEN DAILY {i}", fill="black", font=font)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(60, 95)))
        (src / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
        (src / f"img{i:05d}.txt").write_text(f"A photo number {i} of a scene with some objects in it")


def _stage_config(tmp: Path, stages: tuple[str, ...], workers: int) -> dict:
    """Caption rules, language id, decoding and the image rules always run; ``stages`` are switched on. CLIP
    is open_clip's ViT-B/32 and SSCD the ResNet-50 of ``sscd_disc_mixup``, both with random weights (their
    cost is their forward pass)."""
    return {"samples_per_shard": 16, "workers": workers,
            "safety": {"enabled": "safety" in stages}, "ocr": {"enabled": "ocr" in stages},
            "clip": {"enabled": "clip" in stages, "model": "ViT-B-32", "pretrained": None, "threshold": -1.0},
            # random SSCD weights put unrelated photos above 0.75; planted crops still exceed 0.999
            "dedup": {"enabled": "sscd" in stages, "sscd": str(tmp / "sscd.pt"), "threshold": 0.999,
                      "keep": "clip" if "clip" in stages else "first"},
            "resample": {"enabled": False}}


def bench_build(n_images: int, workers: tuple[int, ...] = (1, 2), progress: bool = False) -> dict:
    """The image builder's throughput: each stage alone (with the always-on caption, language, decode and
    image-rule steps: ``base``) and the whole build, at each worker count, images/s of wall time; plus each
    stage's seconds per image inside the whole build (from the report: what one worker spends)."""

    import torch

    from data_curation.curation_config import load_config
    from data_curation.shards import build_shards
    from data_curation.sscd import build_sscd

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _bench_corpus(tmp / "in", n_images)
        torch.save(build_sscd("resnet50").state_dict(), tmp / "sscd.pt")
        runs = [("base", ())] + [(s, (s,)) for s in STAGES] + [("whole build", STAGES)]
        for name, stages in runs:
            for w in workers:
                out = tmp / f"out-{name}-{w}".replace(" ", "_")
                # Warm-up: 2w one-image chunks load the stages' models in every worker (once per worker for
                # the job's life; a real build amortises that over thousands of images, this one over 64).
                warm = {**_stage_config(tmp, stages, w), "samples_per_shard": 1}
                build_shards(tmp / "in", tmp / f"warm-{out.name}", load_config(None, warm), progress=False,
                             max_chunks=2 * w)
                t0 = time.perf_counter()
                res = build_shards(tmp / "in", out, load_config(None, _stage_config(tmp, stages, w)), progress=False)
                dt = time.perf_counter() - t0
                row = {"stage": name, "workers": w, "images_per_s": round(n_images / dt, 2), "seconds": round(dt, 2)}
                if name == "whole build":
                    row["seconds_per_image_per_stage"] = {
                        k: round(v["seconds"] / max(v["items"], 1), 4) for k, v in res.report["engine"]["stages"].items()}
                    row["ocr_images"] = res.report["ocr_images"]
                rows.append(row)
                if progress:
                    print(f"[bench_curation] {name} x{w}: {row['images_per_s']} images/s", file=sys.stderr, flush=True)
    whole = {r["workers"]: r["images_per_s"] for r in rows if r["stage"] == "whole build"}
    return {"images": n_images, "rows": rows,
            "whole_build_speedup": round(whole[max(workers)] / whole[min(workers)], 2) if len(whole) > 1 else None,
            "models": "open_clip ViT-B/32 (224 px), SSCD ResNet-50 at 288 px short side, both random weights; "
                      "Tesseract 5 (eng), OpenCV Haar face detector, fastText lid.176 language id"}


def bench_media(kind: str, n_clips: int, workers: tuple[int, ...] = (1, 2), progress: bool = False) -> dict:
    """The video or audio builder's throughput on ``scripts.make_synthetic`` clips (``video-motion``: moving
    balls, 64 px, 2 s; ``spoken-digits``: espeak-ng speech), at each worker count: clips/s of the whole build
    and, from its report, each step's seconds per clip (video: caption, decode with 9 frames, OCR on three
    frames, CLIP ViT-B/32 (random weights) on every frame, optical-flow motion; audio: decode to 16 kHz, Silero
    VAD, FLAC encoding)."""

    from scripts import make_synthetic

    if kind == "video":
        from data_curation.video_shards import build_video_shards as build
        from data_curation.video_shards import load_video_config as load

        # the synthetic recipe's config (one-word captions, no language id) with OCR and CLIP switched on
        task, over = "video-motion", {"clip": {"pretrained": None, "frame_threshold": -1.0, "video_threshold": -1.0},
                                      "ocr": {"max_area": 1.0}}
    else:
        from data_curation.audio_shards import build_audio_shards as build
        from data_curation.audio_shards import load_audio_config as load

        task, over = "spoken-digits", {}
    config = Path(__file__).resolve().parents[1] / "configs" / f"{kind}_curation_synthetic.yaml"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # its summary: stdout is the benchmark's JSON
            make_synthetic.main([task, str(tmp / "data"), "--n-train", str(n_clips), "--n-test", "1", "--seed", "0"])
        for w in workers:
            cfg = {**over, "samples_per_shard": max(1, n_clips // (2 * max(workers))), "workers": w}
            warm = {**cfg, "samples_per_shard": 1}
            build(tmp / "data" / "train", tmp / f"warm{w}", load(config, warm), progress=False, max_chunks=2 * w)
            t0 = time.perf_counter()
            res = build(tmp / "data" / "train", tmp / f"out{w}", load(config, cfg), progress=False)
            dt = time.perf_counter() - t0
            steps = res.report["engine"]["stages"]
            rows.append({"stage": "whole build", "workers": w, "images_per_s": round(n_clips / dt, 2),
                         "seconds": round(dt, 2), "counts": res.counts,
                         "seconds_per_clip_per_step": {k.removeprefix("process:"): round(v["seconds"] / max(v["items"], 1), 4)
                                                       for k, v in steps.items() if k != "process"}})
            if progress:
                print(f"[bench_curation] {kind} x{w}: {rows[-1]['images_per_s']} clips/s", file=sys.stderr, flush=True)
    whole = {r["workers"]: r["images_per_s"] for r in rows}
    return {"clips": n_clips, "rows": rows,
            "whole_build_speedup": round(whole[max(workers)] / whole[min(workers)], 2) if len(whole) > 1 else None}


def table(result: dict) -> str:
    """The rows as a text table: stage, then images/s at each worker count."""
    counts = sorted({r["workers"] for r in result["rows"]})
    lines = ["stage          " + "".join(f"{w} worker{'s' if w > 1 else ''}".rjust(12) for w in counts)]
    for name in dict.fromkeys(r["stage"] for r in result["rows"]):
        by = {r["workers"]: r["images_per_s"] for r in result["rows"] if r["stage"] == name}
        lines.append(f"{name:<15}" + "".join(f"{by.get(w, '-'):>12}" for w in counts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dedup-n", type=int, default=100_000)
    p.add_argument("--dedup-large", type=int, default=1_000_000)
    p.add_argument("--ngram-captions", type=int, default=200_000)
    p.add_argument("--shard-images", type=int, default=64)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts for the shard build")
    p.add_argument("--media-clips", type=int, default=48, help="clips for the video and audio builds")
    p.add_argument("--skip", default="", help="comma-separated: dedup,ngram,shards,video,audio")
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
        workers = tuple(int(w) for w in args.workers.split(","))
        result["shards"] = bench_build(args.shard_images, workers, progress=not args.json)
        log("images/s:\n" + table(result["shards"]))
    for kind in ("video", "audio"):
        if kind not in skip:
            log(f"{kind} shard building")
            result[kind] = bench_media(kind, args.media_clips, tuple(int(w) for w in args.workers.split(",")),
                                       progress=not args.json)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
