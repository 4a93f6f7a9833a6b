"""Memory of building the image model per rank (`training.loading`) against building it whole, on a random LM.

    python -m scripts.bench_loading [--dim 2048 --layers 24 --ffn 4096 ...] [--layouts meta,hf] [--dir DIR]

Writes a random bf16 Llama of the given size (default ~2 GB: dim 2048, 24 layers, 16 heads, 8 KV heads,
FFN 4096, vocab 32000) in Meta's layout (2 model-parallel shards) and HF's (2 indexed files) to a temporary
directory, then builds the image model around it (tiny vision encoder, a cross-attention block every 4
layers, fresh fp32 adapter), each in a fresh subprocess, as: the whole model (a one-rank layout), pipeline
stage 0 and stage 1 of 2, tensor-parallel rank 0 of 2. Every build reads through the same lazy reader and
copies what it holds into memory of its own, as a rank does before training.

Measured per build: the peak growth of anonymous memory (``RssAnon`` sampled every 2 ms; what the process
materialised: the checkpoint is memory-mapped, and its pages count in RSS once touched although the kernel
can drop them), ``VmHWM`` growth (peak RSS, file pages included) for reference, and the bytes of the
parameters the rank holds. Reported: each rank's anonymous growth / the whole model's. Target: <= ~0.6x
whole + a constant (the replicated embeddings, image encoder and projector, and one whole cross-attention
block that exists while it is built).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BUILDS = {"whole": {}, "pp_stage0_of2": {"stages": 2, "stage": 0}, "pp_stage1_of2": {"stages": 2, "stage": 1},
          "tp_rank0_of2": {"tp": 2, "tp_rank": 0}}


def write_lm(root: Path, dim: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> dict:
    """The random bf16 LM in both layouts under ``root``; its size in MiB."""
    from adapters.checkpoint import save_hf_checkpoint, save_meta_checkpoint
    from adapters.llama import Llama, LlamaConfig

    cfg = LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, ffn_dim=ffn, vocab_size=vocab)
    with torch.device("meta"):
        lm = Llama(cfg).to(torch.bfloat16)
    lm = lm.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0.0, 0.02)
    save_meta_checkpoint(lm, root / "meta", n_shards=2)
    save_hf_checkpoint(lm, root / "hf", n_files=2)
    return {"params": sum(p.numel() for p in lm.parameters()),
            "mib": round(sum(p.numel() * p.element_size() for p in lm.parameters()) / 2**20, 1)}


class AnonPeak:
    """The peak of ``RssAnon`` while the context is open, sampled on a thread."""

    def __init__(self, every_s: float = 0.002):
        from training.bench import _proc_status_kib

        self.read, self.every_s = lambda: _proc_status_kib("RssAnon") or 0, every_s
        self.start = self.peak = self.read()
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> AnonPeak:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def measure(path: Path, layout: dict) -> dict:
    """One build in this process (the worker side): memory growth, bytes held, seconds, tensors read."""
    from adapters.checkpoint import LlamaCheckpoint
    from adapters.multimodal import multimodal_config
    from training.bench import _proc_status_kib, reset_peak_memory
    from training.loading import RankLayout, build_rank_model
    from training.pipeline import config_stage_layer_ids  # noqa: F401 (DeepSpeed's import, before the baseline)

    torch.set_num_threads(1)
    reset_peak_memory()
    hwm0 = _proc_status_kib("VmHWM")
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        torch.manual_seed(0)
        ckpt = LlamaCheckpoint(path)
        model = build_rank_model(multimodal_config("tiny", lm=ckpt.cfg, xattn_every=4), ckpt, RankLayout(**layout))
    held = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    lm_held = sum(p.numel() * p.element_size() for p in model.lm.parameters() if not p.is_meta)
    return {"anon_growth_mib": round((anon.peak - anon.start) / 1024, 1),
            "hwm_growth_mib": round((_proc_status_kib("VmHWM") - hwm0) / 1024, 1),
            "held_mib": round(held / 2**20, 1), "lm_held_mib": round(lm_held / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 2), "tensors_read": len(ckpt.reads)}


def run_benchmark(args: argparse.Namespace, log) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        log(f"writing a random bf16 LM (dim {args.dim}, {args.layers} layers) in both layouts to {root}")
        lm = write_lm(root, args.dim, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab)
        result: dict = {"lm": {**lm, "dim": args.dim, "layers": args.layers, "heads": args.heads,
                               "kv_heads": args.kv_heads, "ffn": args.ffn, "vocab": args.vocab},
                        "adapter": "tiny vision encoder, fp32 cross-attention block every 4 LM layers",
                        "metric": "peak RssAnon growth of a fresh process", "layouts": {}}
        for layout in args.layouts:
            builds = {}
            for name, rank in BUILDS.items():
                cmd = [sys.executable, "-m", "scripts.bench_loading", "--worker", str(root / layout),
                       json.dumps(rank)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise RuntimeError(f"{layout} {name}: worker failed:\n{done.stderr[-3000:]}")
                builds[name] = json.loads(done.stdout.splitlines()[-1])
                log(f"{layout} {name}: {builds[name]}")
            whole = builds["whole"]["anon_growth_mib"]
            for b in builds.values():
                b["over_whole"] = round(b["anon_growth_mib"] / whole, 3)
            result["layouts"][layout] = builds
        worst = max(b["over_whole"] for builds in result["layouts"].values() for n, b in builds.items() if n != "whole")
        result["worst_rank_over_whole"] = worst
        result["target"] = "each rank <= ~0.6x whole + replicated parts (embeddings, encoder) and one whole block"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24, help="LM layers (a multiple of 8: 2 stages of whole groups)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=4096, help="FFN hidden size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layouts", default="meta,hf", help="comma-separated: meta, hf")
    p.add_argument("--dir", default=None, help="where to write the temporary checkpoints (default: the system's)")
    p.add_argument("--worker", nargs=2, metavar=("LM_DIR", "LAYOUT_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(Path(args.worker[0]), json.loads(args.worker[1]))))
        return 0
    args.layouts = args.layouts.split(",")
    if set(args.layouts) - {"meta", "hf"}:
        p.error(f"--layouts: {args.layouts} must be taken from meta, hf")
    if args.layers % 8 or min(args.dim, args.heads, args.kv_heads, args.ffn, args.vocab) < 1:
        p.error("--layers must be a multiple of 8 (two pipeline stages of whole 4-layer groups); sizes >= 1")
    for name, value in (("--heads", args.heads), ("--kv-heads", args.kv_heads), ("--ffn", args.ffn),
                        ("--vocab", args.vocab)):
        if value % 2:
            p.error(f"{name} {value} must be even (tensor parallelism over 2 ranks, Meta layout of 2 shards)")
    if args.dim % args.heads or args.heads % args.kv_heads:
        p.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}, and --heads of --kv-heads")

    def log(msg: str) -> None:
        print(f"[bench_loading] {msg}", file=sys.stderr, flush=True)

    print(json.dumps(run_benchmark(args, log), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
