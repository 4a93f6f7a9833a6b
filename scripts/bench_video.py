"""Video benchmarks: frame sampling speed and the CPU cost of encoding a clip (JSON).

    python -m scripts.bench_video [--json] [--seconds 30] [--height 720] [--frames 64] [--repeats 1]
                                  [--configs tiny,mid] [--threads N] [--skip reader,encoder]

1. reader: ffmpeg writes a test clip (``testsrc2``, 30 fps, H.264, yuv420p, keyframe every 60 frames) into
   a temporary directory. ``media.video.VideoReader(backend="decord", timeout_s=None).sample(path, K)`` is
   timed against a baseline that decodes every frame with PyAV, converts each one to rgb24 numpy and keeps
   the K picked by the reader's own rule (``media.video.uniform_indices``); our PyAV fallback
   (``backend="pyav"``: decodes up to the last index, converts only the K kept) is the third figure.
   Seconds are the best of ``--repeats``; speedup = baseline / decord, goal >= 5. As a check of the
   benchmark, the indices must agree and our PyAV frames must equal the baseline's.
2. encoder_aggregator: frames/s on CPU (fp32, ``torch.inference_mode``) of ``model.encode_videos``: image
   encoder + projector + temporal aggregator over one K-frame clip of random frames, one tile per frame,
   for the ``tiny`` preset and a mid-size config (``mid``: the tiny one widened, dims in the output);
   one warm-up run, then the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

GOAL_SPEEDUP = 5.0
FPS, GOP = 30, 60


def _r(x: float, n: int = 4) -> float:
    return round(float(x), n)


def best_of(fn: Callable, repeats: int) -> tuple[float, object]:
    """(fastest wall time over ``repeats`` runs, output of the last run)."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


# ----------------------------------------------------------------------------------------------
# 1. Frame sampling


class FfmpegMissing(RuntimeError):
    pass


def make_clip(path: Path, seconds: float, height: int) -> float:
    """Write the test clip with ffmpeg; returns the encode time in seconds."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise FfmpegMissing("ffmpeg not found on PATH: it writes the test clip (Debian/Ubuntu: apt-get install ffmpeg)")
    width = 2 * round(height * 16 / 9 / 2)  # 16:9, even for yuv420p: 720 -> 1280
    cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={FPS}", "-t", f"{seconds:g}",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", str(GOP), str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"ffmpeg failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def decode_all_pyav(path: Path, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Baseline: decode every frame, convert each to rgb24 numpy, keep the reader's K uniform picks.

    Same FFmpeg threading as our PyAV backend (``thread_type="AUTO"``), so the difference is what gets
    decoded and converted, not how. -> (frames (K, H, W, 3) uint8, indices (K,), frames decoded).
    """
    import av

    from media.video import uniform_indices

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n = stream.frames  # from the mp4 header; the clip is ours, so it is right
        idx, _ = uniform_indices(n, k)
        want: dict[int, list[int]] = {}
        for pos, i in enumerate(idx.tolist()):
            want.setdefault(i, []).append(pos)
        out: list[np.ndarray | None] = [None] * k
        decoded = 0
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            for pos in want.get(decoded, ()):
                out[pos] = rgb
            decoded += 1
    if any(f is None for f in out):
        raise RuntimeError(f"{path.name}: the baseline decoded {decoded} frames, fewer than the header's {n}")
    return np.stack(out), idx, decoded


def bench_reader(seconds: float, height: int, k: int, repeats: int, log: Callable[[str], None]) -> dict:
    import av  # noqa: F401 - imported before timing, not inside the first timed run
    import decord  # noqa: F401

    from media.video import VideoReader

    with tempfile.TemporaryDirectory(prefix="bench_video-") as tmp:
        path = Path(tmp) / "testsrc2.mp4"
        log(f"ffmpeg: writing a {seconds:g} s {height}p test clip")
        encode_s = make_clip(path, seconds, height)
        info = VideoReader(backend="pyav", timeout_s=None).probe(path)

        log(f"baseline: PyAV decoding all {info.n_frames} frames to rgb24")
        base_s, (base_frames, base_idx, base_decoded) = best_of(lambda: decode_all_pyav(path, k), repeats)
        log(f"reader: decord, {k} frames")
        dec_s, dec = best_of(lambda: VideoReader(backend="decord", timeout_s=None).sample(path, k), repeats)
        log(f"reader: pyav, {k} frames")
        pav_s, pav = best_of(lambda: VideoReader(backend="pyav", timeout_s=None).sample(path, k), repeats)
        size = path.stat().st_size

    h, w = base_frames.shape[1:3]
    return {
        "clip": {"source": "ffmpeg lavfi testsrc2", "codec": "h264 (libx264)", "pix_fmt": "yuv420p",
                 "keyframe_interval": GOP, "width": w, "height": h, "fps": _r(info.fps, 3),
                 "n_frames": info.n_frames, "duration_s": _r(info.duration_s, 3), "size_bytes": size,
                 "ffmpeg_encode_s": _r(encode_s, 2)},
        "frames_requested": k,
        "index_rule": "media.video.uniform_indices: linspace(0, n_frames - 1, K).round()",
        "timing": f"best of {max(1, repeats)}",
        "baseline_pyav_decode_all": {"seconds": _r(base_s), "frames_decoded": base_decoded,
                                     "frames_converted_rgb": base_decoded, "frames_returned": int(len(base_idx))},
        "decord": {"seconds": _r(dec_s), "frames_returned": int(len(dec.indices)), "backend": dec.backend,
                   "frames_decoded": None,  # decord seeks to keyframes internally; it does not say how many
                   "frames_converted_rgb": int(len(dec.indices))},
        "pyav": {"seconds": _r(pav_s), "frames_returned": int(len(pav.indices)), "backend": pav.backend,
                 "frames_decoded": int(pav.indices.max()) + 1, "frames_converted_rgb": int(pav.frame_mask.sum())},
        "speedup": _r(base_s / dec_s, 2),
        "goal_speedup": GOAL_SPEEDUP,
        "goal_met": bool(base_s / dec_s >= GOAL_SPEEDUP),
        "pyav_speedup": _r(base_s / pav_s, 2),
        "check": {
            "indices_equal": bool(np.array_equal(dec.indices, base_idx) and np.array_equal(pav.indices, base_idx)),
            "pyav_frames_equal_baseline": bool(np.array_equal(pav.frames, base_frames)),
            # decord's own YUV -> RGB conversion may round differently from swscale's
            "decord_mean_abs_diff_vs_baseline": _r(np.abs(dec.frames.astype(np.int16) - base_frames).mean(), 3),
        },
    }


# ----------------------------------------------------------------------------------------------
# 2. Encoder + projector + temporal aggregator


def model_config(name: str, k: int):
    """``tiny``: the preset. ``mid``: the tiny preset widened to a mid-size CPU model (the LM's layers are
    built but unused here: only its width and head layout reach the projector and the aggregator)."""
    from adapters.multimodal import multimodal_config
    from adapters.video_adapter import VideoAdapterConfig

    cfg = multimodal_config("tiny", video=VideoAdapterConfig(max_frames=k, every=1))
    if name == "tiny":
        return cfg
    if name == "mid":
        vision = replace(cfg.vision, width=384, layers=6, heads=6, tile_size=112, taps=(1, 2, 3, 4, 5),
                         n_global_layers=2)
        lm = replace(cfg.lm, dim=512, n_heads=8, n_kv_heads=2, ffn_dim=1536)
        return replace(cfg, vision=vision, lm=lm)
    raise ValueError(f"unknown config {name!r}; choose from tiny, mid")


def random_clip(cfg, k: int, seed: int = 0):
    """One video of K random 16:9 uint8 frames through the real tiling path -> trimmed VideoBatch (1 tile)."""
    from adapters.video_adapter import VideoBatch
    from vision.frames import collate_videos, tile_frames, video_tiling

    S = cfg.vision.tile_size
    frames = np.random.default_rng(seed).integers(0, 256, (k, S * 9 // 16, S, 3), dtype=np.uint8)
    tiled = tile_frames(frames, video_tiling(S, max_tiles=1))
    return VideoBatch.from_collated(collate_videos([[tiled]])).trimmed()


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_encoder(name: str, k: int, repeats: int, log: Callable[[str], None]) -> dict:
    from adapters.multimodal import build_multimodal

    cfg = model_config(name, k)
    torch.manual_seed(0)
    model = build_multimodal(cfg).eval()
    videos = random_clip(cfg, k)
    log(f"encoder+aggregator: {name} ({cfg.vision.width}w x {cfg.vision.layers}+{cfg.vision.n_global_layers} "
        f"layers, {cfg.vision.tile_size} px, LM dim {cfg.lm.dim}), {k} frames")
    with torch.inference_mode():
        model.encode_videos(videos)  # warm-up
        secs, (tokens, chunk_mask) = best_of(lambda: model.encode_videos(videos), repeats)
    v, agg = cfg.vision, model.video.aggregator.cfg
    return {
        "vision": {"width": v.width, "layers": v.layers, "global_layers": v.n_global_layers, "heads": v.heads,
                   "patch_size": v.patch_size, "tile_size": v.tile_size, "taps": list(v.taps),
                   "tokens_per_tile": v.n_tokens, "out_dim": v.out_dim},
        "lm": {"dim": cfg.lm.dim, "n_heads": cfg.lm.n_heads, "n_kv_heads": cfg.lm.n_kv_heads},
        "aggregator": asdict(agg),
        "params": {"encoder": _n(model.vision), "projector": _n(model.projector),
                   "aggregator": _n(model.video.aggregator)},
        "input_tiles_shape": list(videos.tiles.shape),
        "output_tokens_shape": list(tokens.shape),
        "chunks": int(chunk_mask.sum()),
        "seconds_per_clip": _r(secs),
        "frames_per_s": _r(k / secs, 2),
    }


# ----------------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    rd = result.get("reader")
    if rd:
        c = rd["clip"]
        print(f"reader: {c['width']}x{c['height']}, {c['n_frames']} frames ({c['duration_s']} s), "
              f"{rd['frames_requested']} sampled, {rd['timing']}")
        print(f"  {'method':<30}{'seconds':>10}{'decoded':>10}{'to rgb':>8}{'speedup':>10}")
        base = rd["baseline_pyav_decode_all"]["seconds"]
        for label, key in (("PyAV decode-all (baseline)", "baseline_pyav_decode_all"),
                           ("VideoReader decord", "decord"), ("VideoReader pyav", "pyav")):
            m = rd[key]
            dec = "?" if m["frames_decoded"] is None else m["frames_decoded"]
            print(f"  {label:<30}{m['seconds']:>10.3f}{dec:>10}{m['frames_converted_rgb']:>8}"
                  f"{base / m['seconds']:>9.2f}x")
        print(f"  goal: decord >= {rd['goal_speedup']:g}x -> {'met' if rd['goal_met'] else 'NOT met'}; "
              f"check: {rd['check']}")
    ea = result.get("encoder_aggregator")
    if ea:
        print(f"encoder + projector + aggregator: {ea['frames']} frames, 1 tile each, {ea['dtype']}, "
              f"{ea['torch_threads']} torch threads")
        print(f"  {'config':<8}{'vision':>22}{'LM dim':>8}{'enc params':>12}{'agg params':>12}{'s/clip':>9}{'frames/s':>10}")
        for name, m in ea["configs"].items():
            v = m["vision"]
            desc = f"{v['width']}w {v['layers']}+{v['global_layers']}L {v['tile_size']}px"
            print(f"  {name:<8}{desc:>22}{m['lm']['dim']:>8}{m['params']['encoder']:>12,}"
                  f"{m['params']['aggregator']:>12,}{m['seconds_per_clip']:>9.3f}{m['frames_per_s']:>10.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--seconds", type=float, default=30.0, help="test clip length")
    p.add_argument("--height", type=int, default=720, help="test clip height (16:9)")
    p.add_argument("--frames", type=int, default=64, help="frames sampled per clip (1..64)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best reported)")
    p.add_argument("--configs", default="tiny,mid", help="comma-separated model configs: tiny,mid")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--skip", default="", help="comma-separated: reader,encoder")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    skip = set(filter(None, args.skip.split(",")))
    if not 1 <= args.frames <= 64:
        p.error("--frames must be in [1, 64]")
    for c in configs:
        if c not in ("tiny", "mid"):
            p.error(f"--configs: unknown config {c!r}; choose from tiny, mid")

    def log(msg: str) -> None:
        print(f"[bench_video] {msg}", file=sys.stderr, flush=True)

    result: dict = {"benchmark": "bench_video", "cpu_count": os.cpu_count()}
    if "reader" not in skip:
        try:
            result["reader"] = bench_reader(args.seconds, args.height, args.frames, args.repeats, log)
        except FfmpegMissing as e:
            print(f"bench_video: {e}", file=sys.stderr)
            return 2
    if "encoder" not in skip and configs:
        if args.threads:
            torch.set_num_threads(args.threads)
        result["encoder_aggregator"] = {
            "device": "cpu", "dtype": "float32", "frames": args.frames, "tiles_per_frame": 1, "videos": 1,
            "torch_threads": torch.get_num_threads(), "timing": f"1 warm-up, then best of {max(1, args.repeats)}",
            "configs": {c: bench_encoder(c, args.frames, args.repeats, log) for c in configs},
        }
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
