"""The planner (`training.planner`) against measurement on CPU: per-rank memory and FLOPs (JSON).

    python -m scripts.bench_planner [--configs tiny,mid] [--modes dp,tp,pipeline] [--steps 2] [--warmup 1]

Memory: each (config, mode) launches 2 ranks (gloo) that run the trainer's real engines on
`scripts.bench_train`'s ``tiny`` / ``mid`` models and synthetic batches: ``dp`` (data parallel, the shipped
ZeRO-1 bf16 + FP32-accumulation config), ``tp`` (`training.trainer.DataParallelMode` with
``tensor_parallel=2``: one TP group, DP 1) and ``pipeline`` (2 stages, `training.trainer.build_pipeline_engine`;
the model is built whole on every rank, as `scripts.bench_train` does, and the parameters outside the rank's
stage are dropped once the engine holds its own: the trainer's per-rank build never holds them).
Per rank, with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``: freed tensors go back to
the OS, so RSS follows live memory, not the heap's high-water mark): the mode is built and stepped once and
thrown away (imports, kernels, thread pools and process-group buffers start lazily on first use), then
``runtime_mib`` = the RSS left: the torch / DeepSpeed / gloo runtime, measured in every rank and subtracted.
The model and engine are built again, the peak-RSS window reset (``VmHWM``), ``--warmup`` + ``--steps``
optimizer steps run, and ``measured_mib`` = peak RSS - ``runtime_mib``. ``predicted_mib``: the planner's
peak for that rank's stage, same layout and workload, no runtime reserve; ``ratio`` = predicted / measured
(goal: within 15%).

FLOPs: `flop_counter_flops` runs one forward + backward of the model's training task under
``torch.utils.flop_counter.FlopCounterMode`` and compares the total with `training.planner.executed_flops`
(goal: within 2%).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from training.bench import BenchError

ROOT = Path(__file__).resolve().parents[1]
MODES = {"dp": (1, 1), "tp": (2, 1), "pipeline": (1, 2)}  # mode -> (tp, pp) at 2 ranks
NPROC = 2
# glibc serves allocations from this size up with their own mmap and unmaps them when freed (a fixed threshold
# also stops glibc from raising it), so a rank's RSS follows its live tensors instead of its heap's high-water mark.
MMAP_THRESHOLD = 65536


def planner_inputs(config: str, mode: str):
    """(shape, workload, layout) of a `scripts.bench_train` config run in ``mode`` on 2 ranks."""
    from scripts.bench_train import BENCH_CONFIGS, DP_GRAD_ACCUM, PIPELINE_STAGES
    from training.planner import Layout, Workload, model_shape

    bench = BENCH_CONFIGS[config]
    cfg = bench.model_config()
    tp, pp = MODES[mode]
    gas = DP_GRAD_ACCUM * (PIPELINE_STAGES if pp > 1 else 1)
    work = Workload(bench.micro_batch, bench.seq_len, cfg.vision.max_tiles, gas, supervised=bench.n_supervised)
    return model_shape(cfg), work, Layout(tp, pp, NPROC // (tp * pp), zero=1, checkpointing=False)


def flop_counter_flops(cfg, work) -> float:
    """FLOPs of one forward + backward of ``ImageTextTask`` on a random fp32 batch of ``work``'s shapes (one
    image of ``work.tiles`` real tiles per sample, the last ``n_supervised`` positions labelled), counted by
    ``torch.utils.flop_counter.FlopCounterMode``, per sample."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from adapters.multimodal import ImageBatch, build_multimodal
    from adapters.task import ImageTextTask

    torch.manual_seed(0)
    task = ImageTextTask(build_multimodal(cfg)).train()
    B, T, S, tiles = work.micro_batch, work.seq_len, cfg.vision.tile_size, work.tiles
    tokens = torch.randint(0, cfg.lm.vocab_size, (B, T))
    tokens[:, 1] = cfg.image_token_id
    labels = torch.full_like(tokens, -100)
    labels[:, T - work.n_supervised :] = tokens[:, T - work.n_supervised :]  # targets: the next token's label
    rows = max(r for r in range(1, tiles + 1) if tiles % r == 0 and r * r <= tiles)
    images = ImageBatch(torch.randn(B, 1, tiles, 3, S, S), torch.tensor([[[rows, tiles // rows]]] * B),
                        torch.ones(B, 1, tiles, dtype=torch.bool), torch.ones(B, 1, dtype=torch.bool))
    # The math backend: the counter has no formula for CPU's fused SDPA kernel and would miss every attention product.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        task(tokens, labels, images)["loss"].backward()
    return counter.get_total_flops() / B


# ----------------------------------------------------------------------------------------------
# One rank


def run_rank(config: str, mode: str, steps: int, warmup: int, out: Path) -> None:
    """Build ``mode``'s engine on the config's model, run steps, write ``out/rank{R}.json``."""
    import torch.distributed as dist

    from adapters.multimodal import build_multimodal
    from scripts.bench_train import (BENCH_CONFIGS, DP_DEEPSPEED, DP_GRAD_ACCUM, _build_dp, _build_pipeline,
                                     _release_freed_memory, shipped_dp_config, synthetic_batches)
    from training.bench import current_memory_mib, peak_memory_mib, reset_peak_memory
    from training.config import RunConfig, resolve_deepspeed
    from training.trainer import DataParallelMode, init_distributed

    rank, world = init_distributed()
    bench = BENCH_CONFIGS[config]

    def build():
        """(engine, one optimizer step, pipeline stage or None) on a freshly built model."""
        torch.manual_seed(0)
        model = build_multimodal(bench.model_config())
        if mode == "dp":
            return _build_dp(model, bench, world, rank)[:2] + (None,)
        if mode == "pipeline":
            engine, step, _ = _build_pipeline(model, bench, world)
            local = {id(p) for p in engine.module.parameters()}
            for p in model.parameters():  # other stages' layers: the trainer's per-rank build never holds them
                if id(p) not in local:
                    p.data = p.data.new_empty(0)
            return engine, step, engine.stage_id
        cfg = RunConfig(tensor_parallel=MODES["tp"][0])
        dp_mode = DataParallelMode(cfg, world)
        ds = resolve_deepspeed(shipped_dp_config(bench.micro_batch), dp_mode.dp_world, str(DP_DEEPSPEED))
        engine, _ = dp_mode.build_engine(cfg, model, ds)
        batches = synthetic_batches(model.cfg, bench, DP_GRAD_ACCUM, seed=dp_mode.dp_rank)  # one stream per group

        def step() -> None:
            for tokens, labels, images in batches:  # as _build_dp's step (trainer.train's micro-batch loop)
                engine.backward(engine(tokens, labels, images)["loss"])
                engine.step()

        return engine, step, None

    def settle() -> float:
        gc.collect()
        _release_freed_memory()
        dist.barrier()
        return current_memory_mib()

    before = settle()
    engine, step, _ = build()  # a first run of the same mode, thrown away: the runtime's lazy start-up
    step()
    del engine, step
    runtime = settle()
    _engine, step, stage = build()  # the engine stays alive while its steps run
    after_build = settle()
    reset = reset_peak_memory()
    for _ in range(warmup + steps):
        step()
    peak, source = peak_memory_mib()
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "stage": stage, "before_mib": before, "runtime_mib": runtime, "after_build_mib": after_build,
        "peak_mib": peak, "peak_reset": reset, "memory_source": source}))
    dist.destroy_process_group()


def launch(config: str, mode: str, steps: int, warmup: int, timeout: float) -> list[dict]:
    """2 ranks of ``config`` / ``mode`` under torchrun (which stops the others when one fails); their records."""
    with tempfile.TemporaryDirectory(prefix="bench_planner-") as tmp:
        out = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}", "-m",
               "scripts.bench_planner", "--worker", "--configs", config, "--modes", mode, "--steps", str(steps),
               "--warmup", str(warmup), "--out", str(out)]
        try:
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{config}/{mode}: {NPROC} ranks timed out after {timeout:.0f} s") from e
        if run.returncode:
            raise BenchError(f"{config}/{mode}: torchrun exited {run.returncode}:\n{run.stderr[-3000:]}")
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(NPROC)]


def compare(config: str, mode: str, ranks: list[dict]) -> dict:
    """Planner vs measured memory per rank."""
    from training.planner import stage_memory

    shape, work, layout = planner_inputs(config, mode)
    per_rank = []
    for r in ranks:
        mem = stage_memory(shape, work, layout, r["stage"] or 0)
        predicted = mem["total"] / 2**20
        measured = r["peak_mib"] - r["runtime_mib"]
        per_rank.append({"rank": r["rank"], "stage": r["stage"], "before_first_run_mib": round(r["before_mib"], 1),
                         "runtime_mib": round(r["runtime_mib"], 1), "after_build_mib": round(r["after_build_mib"], 1),
                         "peak_mib": round(r["peak_mib"], 1), "measured_mib": round(measured, 1),
                         "predicted_mib": round(predicted, 1), "ratio": round(predicted / measured, 3),
                         "predicted_breakdown_mib": {k: round(x / 2**20, 2) for k, x in mem.items()
                                                     if k != "activations_detail"}})
    return {"layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero": layout.zero},
            "ratio_worst": max((r["ratio"] for r in per_rank), key=lambda x: abs(x - 1)), "per_rank": per_rank}


def flop_check(config: str) -> dict:
    from training.planner import executed_flops

    shape, work, _ = planner_inputs(config, "dp")
    counted = flop_counter_flops(shape.cfg, work)
    planned = executed_flops(shape, work)
    total = sum(planned[k] for k in ("vision", "projector", "cross_attention", "lm", "head"))
    return {"flop_counter_per_sample": counted, "planner_per_sample": total, "ratio": round(total / counted, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--modes", default="dp,tp,pipeline")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    configs, modes = args.configs.split(","), args.modes.split(",")
    bad = [m for m in modes if m not in MODES] + [c for c in configs if c not in ("tiny", "mid")]
    if bad:
        p.error(f"unknown mode or config {bad}: modes {sorted(MODES)}, configs tiny, mid")
    if args.worker:
        run_rank(configs[0], modes[0], args.steps, args.warmup, Path(args.out))
        return 0
    torch.set_num_threads(1)
    result: dict = {"memory": {}, "flops": {}, "steps": args.steps, "warmup": args.warmup, "ranks": NPROC}
    for config in configs:
        result["flops"][config] = flop_check(config)
        for mode in modes:
            t0 = time.perf_counter()
            result["memory"][f"{config}/{mode}"] = compare(config, mode, launch(config, mode, args.steps, args.warmup,
                                                                              args.timeout))
            print(f"{config}/{mode}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
