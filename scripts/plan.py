"""Memory / throughput planner: which TP x PP x DP layout to train an image model with (`training.planner`).

    python -m scripts.plan --model 90B --gpus 512 --gpu-memory 80 --micro-batch 8 --seq-len 4096 --tiles 4 [--json]
                           [--trainer-only] [--top 10] [--rejected N] [--peak-tflops 989 --efficiency 0.5 ...]

Prints the assumptions, then the layouts that fit, best (highest MFU) first, each with its memory per GPU
broken down (heaviest pipeline stage), step time and MFU, and notes on what the trainer lacks to run it
(``--trainer-only`` keeps the layouts it runs today); then how many layouts were rejected and why
(``--rejected N`` lists them). Bad input (unknown model, a GPU count that is no whole number of nodes, ...):
one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from training.planner import GIB, Hardware, Layout, LayoutPlan, PlanError, Workload, model_shape, plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        raise PlanError(message)


def _parser() -> argparse.ArgumentParser:
    hw = Hardware()
    p = _Parser(prog="python -m scripts.plan", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a multimodal preset (adapters.multimodal.MULTIMODAL_PRESETS)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, default=hw.gpu_memory_gib, help="GiB per GPU")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per micro-batch and replica")
    p.add_argument("--seq-len", type=int, default=192, help="text tokens per sample (paper: 192 on average)")
    p.add_argument("--tiles", type=int, default=4, help="tiles per image (paper: up to 4)")
    p.add_argument("--images", type=int, default=1, help="images per sample")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per replica and optimizer step")
    p.add_argument("--supervised", type=int, default=None, help="positions with a loss (default: seq-len)")
    p.add_argument("--peak-tflops", type=float, default=hw.peak_flops / 1e12, help="dense bf16 peak per GPU")
    p.add_argument("--efficiency", type=float, default=hw.efficiency, help="achieved fraction of peak in matmuls")
    p.add_argument("--intra-node-gbs", type=float, default=hw.intra_node_gbs, help="GB/s per GPU inside a node")
    p.add_argument("--inter-node-gbs", type=float, default=hw.inter_node_gbs, help="GB/s per GPU between nodes")
    p.add_argument("--gpus-per-node", type=int, default=hw.gpus_per_node)
    p.add_argument("--reserve", type=float, default=hw.runtime_reserve_gib,
                   help="GiB per GPU for CUDA context, NCCL and fragmentation")
    p.add_argument("--top", type=int, default=10, help="fitting layouts to print")
    p.add_argument("--rejected", type=int, default=0, help="rejected layouts to list (with why)")
    p.add_argument("--trainer-only", action="store_true",
                   help="only layouts training.trainer runs today (ZeRO 1, no TP inside pipeline stages, no encoder "
                        "sequence parallelism, activation checkpointing in pipeline mode only)")
    p.add_argument("--json", action="store_true")
    return p


def _name(lay: Layout) -> str:
    return (f"tp{lay.tp} pp{lay.pp} dp{lay.dp} zero{lay.zero}{' ckpt' if lay.checkpointing else ''}"
            f"{' enc-sp' if lay.encoder_sp else ''}")


def _row(p: LayoutPlan) -> str:
    m, t = {k: v / GIB for k, v in p.memory.items() if k != "activations_detail"}, p.time
    name = _name(p.layout)
    mem = (f"{m['total']:6.1f} GiB = frozen {m['frozen_weights_bf16']:.1f} + trainable "
           f"{m['trainable_weights_bf16']:.1f} + grads {m['gradients_bf16']:.1f} + fp32 acc {m['fp32_accumulation']:.1f} + optim "
           f"{m['optimizer_states']:.1f} + max(act {m['activations']:.1f} + pipe {m['pipeline_buffers']:.1f}, "
           f"Adam temp {m['optimizer_step_temp']:.1f}) + reserve {m['runtime_reserve']:.1f}")
    out = f"  {name:32s} step {t['step_s']:7.2f} s  MFU {t['mfu']:5.1%}  {t['samples_per_s']:8.1f} samples/s\n    {mem}"
    return out + "".join(f"\n    note: {n}" for n in p.notes)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        from adapters.multimodal import multimodal_config

        try:
            cfg = multimodal_config(args.model)
        except KeyError as e:
            raise PlanError(str(e)) from e
        if args.peak_tflops <= 0 or not 0 < args.efficiency <= 1 or args.gpu_memory <= 0 or args.gpus_per_node < 1:
            raise PlanError("--peak-tflops and --gpu-memory must be > 0, --efficiency in (0, 1], --gpus-per-node >= 1")
        hw = Hardware(args.gpu_memory, args.peak_tflops * 1e12, args.efficiency, args.intra_node_gbs,
                      args.inter_node_gbs, args.gpus_per_node, args.reserve)
        work = Workload(args.micro_batch, args.seq_len, args.tiles, args.grad_accum, args.images, args.supervised)
        shape = model_shape(cfg)
        plans = plan(shape, args.gpus, work, hw, args.trainer_only)
    except PlanError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    fit = [p for p in plans if not p.rejected]
    rejected = sorted((p for p in plans if p.rejected),
                      key=lambda p: (len(p.rejected), p.total_gib if p.time else float("inf")))
    why = Counter(r.split(":")[0] for p in rejected for r in p.rejected)
    if args.json:
        print(json.dumps({"model": args.model, "gpus": args.gpus, "params": shape.total,
                          "hardware": hw.__dict__, "workload": work.__dict__, "layouts": [p.to_dict() for p in fit],
                          "rejected": [p.to_dict() for p in rejected[: args.rejected]],
                          "rejected_count": len(rejected), "rejected_reasons": dict(why)}, indent=2))
        return 0
    print(f"{args.model}: {shape.total / 1e9:.2f}B parameters on {args.gpus} GPUs of {hw.gpu_memory_gib:g} GiB; "
          f"micro-batch {work.micro_batch} x {work.seq_len} tokens + {work.images} image(s) of {work.tiles} tiles, "
          f"{work.grad_accum} micro-batches per step and replica")
    print(f"assumptions: {hw.peak_flops / 1e12:g} TFLOP/s bf16 peak at {hw.efficiency:.0%} matmul efficiency, "
          f"{hw.intra_node_gbs:g} GB/s in a node of {hw.gpus_per_node}, {hw.inter_node_gbs:g} GB/s between nodes, "
          f"communication not overlapped, {hw.runtime_reserve_gib:g} GiB reserved per GPU")
    print(f"{len(fit)} layouts fit (best first, showing {min(args.top, len(fit))}):")
    for p in fit[: args.top]:
        print(_row(p))
    print(f"{len(rejected)} rejected, reasons (a layout may have several): "
          + ", ".join(f"{r} {n}" for r, n in why.most_common()))
    for p in rejected[: args.rejected]:
        print(f"  {_name(p.layout)}: " + "; ".join(p.rejected))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
