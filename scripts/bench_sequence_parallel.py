"""Per-rank activation memory of the image encoder, whole on 1 rank against split over 2 (sequence parallelism).

    python -m scripts.bench_sequence_parallel [--width 512 --layers 4 --global-layers 1 --heads 8 \
        --tile-size 448 --tiles 4 --images 1 --checkpointing]

Builds a randomly initialised encoder of the given size (``VisionEncoderConfig``, no open_clip tag; taps on
every other block's input, all gates opened) and runs forward + backward of one batch of ``--images``
images of ``--tiles`` tiles, on CPU in fp32, in fresh processes: one process with the plain encoder, then
two processes (gloo) with `training.sequence_parallel.apply_encoder_sequence_parallel`, then two more with
its ``recompute_kv=True`` (gathered K/V not kept for backward). Each rank does a
warm-up step first (parameter gradients exist from then on) and reports for the measured step:

* ``held_after_forward_mib``: RSS after the forward over the RSS before it: what the graph holds for backward
  (with the output), checkpoint inputs included;
* ``saved_for_backward_mib``: bytes of the distinct tensors autograd saved for backward (``saved_tensors_hooks``),
  parameters left out: exact, but blind to what a checkpoint holds (``--checkpointing`` blocks, and the
  attention inputs under ``recompute_kv``);
* ``peak_rss_growth_mib``: peak RSS over the RSS before the step (``training.bench``: VmHWM reset), which
  also counts transient buffers (attention scores, gathered K/V, gradients in flight);
* ``step_s``: wall time of the step (one thread per rank; two ranks share the machine's cores).

Prints JSON with the three runs and the 2-rank / 1-rank ratios of the largest rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import torch

ROOT = Path(__file__).resolve().parents[1]


def encoder_config(args: argparse.Namespace):
    from vision.encoder import VisionEncoderConfig

    return VisionEncoderConfig(open_clip_model=None, width=args.width, layers=args.layers, heads=args.heads,
                               tile_size=args.tile_size, max_tiles=args.tiles, taps=tuple(range(1, args.layers, 2)),
                               n_global_layers=args.global_layers)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while the context is open, ``exclude``
    (the parameters, which backward also keeps) left out."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.storages: dict[int, int] = {}
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self._exclude:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> Self:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def _release_free_heap() -> None:
    """Hand the heap that the warm-up freed back to the OS (glibc ``malloc_trim``), so the RSS growth of the
    measured step is not absorbed by pages malloc kept. The workers also run with a fixed mmap threshold of
    128 KiB (``MALLOC_MMAP_THRESHOLD_``): every tensor buffer is its own mapping, returned when freed, so the
    RSS follows the live tensors instead of glibc's heap fragmentation."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(args: argparse.Namespace) -> dict:
    """One rank (the worker side): warm-up step, then the measured forward + backward."""
    from training.bench import current_memory_mib, peak_memory_mib, reset_peak_memory
    from vision.encoder import build_vision_encoder

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    enc = build_vision_encoder(encoder_config(args))
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("gate") or ".gate_" in name:
                p.fill_(0.5)
    enc.set_grad_checkpointing(args.checkpointing)
    if world > 1:
        import torch.distributed as dist

        from training.sequence_parallel import apply_encoder_sequence_parallel

        dist.init_process_group("gloo")
        apply_encoder_sequence_parallel(enc, dist.group.WORLD, recompute_kv=args.recompute_kv)
    g = torch.Generator().manual_seed(1)
    tiles = torch.randn(args.images, args.tiles, 3, args.tile_size, args.tile_size, generator=g)
    layout = torch.tensor([[1, args.tiles]] * args.images)
    tile_mask = torch.ones(args.images, args.tiles, dtype=torch.bool)

    enc(tiles, layout, tile_mask).square().mean().backward()  # warm-up: parameter gradients are kept from here
    _release_free_heap()
    base = current_memory_mib()
    reset_peak_memory()
    t0 = time.perf_counter()
    with SavedBytes(list(enc.parameters())) as saved:
        loss = enc(tiles, layout, tile_mask).square().mean()
    held = current_memory_mib() - base
    loss.backward()
    seconds = time.perf_counter() - t0
    peak, source = peak_memory_mib()
    if world > 1:
        dist.destroy_process_group()
    return {"held_after_forward_mib": round(held, 1), "saved_for_backward_mib": round(saved.mib, 1),
            "peak_rss_growth_mib": round(peak - base, 1), "step_s": round(seconds, 2), "peak_source": source}


def run_ranks(args: argparse.Namespace, world: int, argv: list[str]) -> list[dict]:
    """``world`` fresh worker processes; their records in rank order."""
    from training.trainer import free_port

    with tempfile.TemporaryDirectory(prefix="bench_sp-") as tmp:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 17),  # see `_release_free_heap`
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        procs = []
        for r in range(world):
            cmd = [sys.executable, "-m", "scripts.bench_sequence_parallel", *argv, "--worker", f"{tmp}/rank{r}.json"]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=args.timeout)[0] for p in procs]
        if any(p.returncode for p in procs):
            tails = "\n".join(f"--- rank {r} ---\n{log[-3000:]}" for r, log in enumerate(logs))
            raise RuntimeError(f"bench_sequence_parallel: {world}-rank workers failed:\n{tails}")
        return [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4, help="ViT blocks (taps on blocks 1, 3, ...)")
    p.add_argument("--global-layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tile-size", type=int, default=448, help="pixels, a multiple of the 14 px patch")
    p.add_argument("--tiles", type=int, default=4, help="tiles per image (all real)")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    p.add_argument("--recompute-kv", action="store_true", help=argparse.SUPPRESS)  # a worker's option
    args = p.parse_args(argv)
    if min(args.width, args.layers, args.heads, args.tiles, args.images) < 1 or args.global_layers < 0:
        p.error("sizes must be >= 1 (--global-layers >= 0)")
    try:
        cfg = encoder_config(args)
        from training.sequence_parallel import tile_tokens, validate_sp_size

        validate_sp_size(cfg, 2)
    except ValueError as e:
        p.error(str(e))
    if args.worker:
        Path(args.worker).write_text(json.dumps(measure(args)))
        return 0

    argv = list(sys.argv[1:] if argv is None else argv)
    runs = {"1_rank": run_ranks(args, 1, argv), "2_rank": run_ranks(args, 2, argv),
            "2_rank_recompute_kv": run_ranks(args, 2, [*argv, "--recompute-kv"])}
    whole = runs["1_rank"][0]
    ratio = {run: {k: round(max(r[k] for r in runs[run]) / whole[k], 3)
                   for k in ("held_after_forward_mib", "saved_for_backward_mib", "peak_rss_growth_mib", "step_s")}
             for run in ("2_rank", "2_rank_recompute_kv")}
    print(json.dumps({
        "encoder": {"width": args.width, "layers": args.layers, "global_layers": args.global_layers,
                    "heads": args.heads, "taps": list(cfg.taps), "tile_size": args.tile_size, "tiles": args.tiles,
                    "images": args.images, "tokens_per_tile": tile_tokens(cfg),
                    "sequence": args.tiles * tile_tokens(cfg), "checkpointing": args.checkpointing,
                    "dtype": "float32", "device": "cpu, 1 thread per rank"},
        "runs": runs, "two_ranks_over_one": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
