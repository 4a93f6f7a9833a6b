"""Training throughput and memory: data-parallel vs pipeline mode, tiny and mid-size image models, and the
trainer's overhead over a bare PyTorch loop (JSON).

    python -m scripts.bench_train [--json] [--steps 3] [--warmup 1] [--configs tiny,mid]
                                  [--modes dp,pipeline,overhead] [--nproc 2] [--threads 1]

Each config launches ``--nproc`` ranks as subprocesses (RANK / WORLD_SIZE / MASTER_* env, gloo on CPU,
nccl on CUDA with one GPU per rank) that run the requested modes in turn, each on a freshly built model
(``--isolate``: fresh ranks per mode, at the cost of another start-up, ~20 s on 2 CPU cores); each rank
writes its measurements as JSON into a temporary directory, and a failing rank is reported with the tail
of its output.

Modes, both bf16 compute with FP32 gradient accumulation (ZeRO stage 1, DeepSpeed's BF16_Optimizer):
- ``dp``: `training.trainer`'s data-parallel engine (``init_distributed``, ``build_engine`` with the
  default run config's optimizer, the shipped ``configs/deepspeed/zero1_bf16_fp32accum.json`` with the
  micro-batch size and accumulation steps set here), the trainer's micro-batch loop (forward, backward, step);
- ``pipeline``: `training.trainer`'s pipeline engine (``build_pipeline_engine``: `training.pipeline`'s
  2-stage ``PipelineModule``, 4 self-attention + 1 cross-attention layers per stage, the image encoder
  replicated on each stage and tied), ``pipeline_ds_config``, ``engine.train_batch``; the remaining ranks
  (nproc / 2) are data parallelism.
Both modes see the same global batch per optimizer step (pipeline: twice the accumulation steps of
``dp`` at one data-parallel replica per 2 ranks), so samples/s compare like for like.

Models (through the real factories, random frozen LM): ``tiny`` = the ``tiny`` preset with 8 LM layers
and a cross-attention block every 4 (the pipeline tests' model: two stages of 4 + 1); ``mid`` = LM dim
512, 8 layers, 8 heads (2 KV), FFN 1536, vocab 2048, xattn_every 4, with a ViT of width 128, 4 + 1
global layers at 56-px tiles. Synthetic batches of fixed shape: random tokens with the image token at
position 1, labels on every later token, one image of ``max_tiles`` random tiles per sample.

Measured per rank, after ``--warmup`` untimed optimizer steps: wall time of ``--steps`` steps (between
barriers), peak memory over the mode (model build, engine, warm-up and timed steps; CPU: peak RSS,
``VmHWM`` reset through /proc/self/clear_refs when a mode starts, so a later mode's peak includes what
the process still held, reported as ``memory_at_start_mib``; CUDA: ``max_memory_allocated``), and
the time spent in the image encoder's forward and backward (`training.bench.EncoderTimer`: module hooks
around the encoder, a hook on its output's gradient and post-accumulate-grad hooks on its parameters),
as a fraction of the rank's timed wall time (a pipeline stage's wall time includes its bubble and
waiting). samples/s = global samples / the slowest rank's wall time; tokens/s = samples/s x sequence
length. FLOPs per sample (`training.bench.forward_flops` / ``train_flops``: matmul FLOPs, 3 x forward
with the frozen LM counted) give achieved FLOP/s; on CUDA, MFU = model FLOP/s / (GPUs x the GPU's dense
bf16 peak, `training.bench.PEAK_BF16_FLOPS`), plus the same with the frozen-LM-aware FLOP estimate.
On a machine with one GPU the default run is data-parallel on 1 rank (pipeline mode needs 2 GPUs and is
reported as skipped). bf16 matmuls on a CPU without AVX512-BF16/AMX are ~40x slower than fp32 (about
1-2 GFLOP/s per core here), which is why the ``mid`` model is small; on a GPU it is far too small to
approach peak, so its MFU is a floor, not a target.

``overhead`` (one rank, in one process; ``tiny`` only: the trainer builds presets, and ``mid`` is none):
`training.trainer.train` as a user runs it (the trainer's ``tiny`` image preset, random frozen LM, the
shipped DeepSpeed config with 2 accumulation steps, synthetic image-caption shards written first: random
JPEGs of 1 to 4 tiles, 3-12-word captions, a tiny BPE) against a bare PyTorch loop on the same model from
the same factory and seed, the same micro-batches (taken once from the trainer's data pipeline, then
replayed), ``torch.optim.AdamW`` on the same parameter groups, the same dtype and clipping, no DeepSpeed,
timed before and after the trainer (load drift on a shared machine). Step times: the trainer's from its
``losses.jsonl`` (``steps_per_s`` is cumulative), the bare loop's around each step; medians after
``--warmup`` steps. ``ratio`` = trainer / bare (goal <= 1.1), ``ratio_min`` the same of the fastest steps
(less disturbed by other work on a shared machine); the trainer decodes its data inline, so
``ratio_without_data_loading`` takes out the loader's time per step; ``data_loader`` is
`training.data.TrainBatches` alone on the same shards (read, decode, tile, pack, collate), after the
warm-up steps' micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from training.bench import BenchError, forward_flops, mfu, peak_bf16_flops, train_flops
from training.trainer import free_port

ROOT = Path(__file__).resolve().parents[1]
DP_DEEPSPEED = ROOT / "configs" / "deepspeed" / "zero1_bf16_fp32accum.json"
CONFIGS = ("tiny", "mid")
MODES = ("dp", "pipeline", "overhead")
DP_GRAD_ACCUM = 2  # per rank; pipeline mode uses DP_GRAD_ACCUM x its ranks per replica (same global batch)
PIPELINE_STAGES = 2
# Overhead mode: the trainer's own model factory builds presets only, so a bench config maps to one.
OVERHEAD_PRESETS = {"tiny": "tiny"}
OVERHEAD_SKIPPED = "the trainer builds the multimodal presets (tiny, 11B, 90B), none of the mid config's size"
OVERHEAD_GOAL = 1.1  # trainer step time / bare-loop step time
OVERHEAD_DATA = ("data.max_seq_len=64", "data.max_tokens=256", "data.max_rows=8", "data.shuffle_buffer=16")
OVERHEAD_SAMPLES_PER_SHARD = 48
OVERHEAD_LOADER_MICRO_BATCHES = 24  # at least; more when the timed steps need more


@dataclass(frozen=True)
class BenchConfig:
    name: str
    micro_batch: int
    seq_len: int

    def model_config(self):
        """The benchmark model's ``MultimodalConfig`` (see the module docstring)."""
        from adapters.llama import llama_config
        from adapters.multimodal import multimodal_config
        from vision.encoder import vision_config

        if self.name == "tiny":
            return multimodal_config("tiny", lm=llama_config("tiny", n_layers=8), xattn_every=4)
        if self.name == "mid":
            lm = llama_config("tiny", dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1536, vocab_size=2048)
            vision = vision_config("tiny", width=128, layers=4, heads=4, tile_size=56, taps=(1, 3),
                                   n_global_layers=1)
            return multimodal_config("tiny", lm=lm, vision=vision, xattn_every=4)
        raise BenchError(f"unknown config {self.name!r}; choose from {', '.join(CONFIGS)}")

    @property
    def n_supervised(self) -> int:
        return self.seq_len - 2  # labels from position 2 (after the image token), shifted by one


BENCH_CONFIGS = {"tiny": BenchConfig("tiny", micro_batch=2, seq_len=32),
                 "mid": BenchConfig("mid", micro_batch=1, seq_len=32)}


def _r(x: float, n: int = 4) -> float:
    return round(float(x), n)


# ----------------------------------------------------------------------------------------------
# Synthetic data


def synthetic_batches(cfg, bench: BenchConfig, n: int, seed: int) -> list[tuple]:
    """``n`` micro-batches (tokens (B, T), labels (B, T), ImageBatch with every tile slot real)."""
    from adapters.multimodal import ImageBatch

    g = torch.Generator().manual_seed(seed)
    B, T, S, tiles = bench.micro_batch, bench.seq_len, cfg.vision.tile_size, cfg.vision.max_tiles
    rows = max(r for r in range(1, tiles + 1) if tiles % r == 0 and r * r <= tiles)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.lm.vocab_size, (B, T), generator=g)
        tokens[:, 1] = cfg.image_token_id
        labels = torch.full_like(tokens, -100)
        labels[:, 2:] = tokens[:, 2:]
        images = ImageBatch(torch.randn(B, 1, tiles, 3, S, S, generator=g),
                            torch.tensor([[[rows, tiles // rows]]] * B), torch.ones(B, 1, tiles, dtype=torch.bool),
                            torch.ones(B, 1, dtype=torch.bool))
        out.append((tokens, labels, images))
    return out


def shipped_dp_config(micro_batch: int) -> dict:
    """The shipped ZeRO-1 bf16 DeepSpeed config with this benchmark's micro-batch size and accumulation steps."""
    from training.config import load_deepspeed_config

    ds = {**load_deepspeed_config(DP_DEEPSPEED), "train_micro_batch_size_per_gpu": micro_batch,
          "gradient_accumulation_steps": DP_GRAD_ACCUM}
    ds.pop("train_batch_size", None)
    return ds


# ----------------------------------------------------------------------------------------------
# One rank


def _build_dp(model, bench: BenchConfig, world: int, rank: int):
    """trainer.train's engine (`training.trainer.build_engine`, the default run config's optimizer) for this
    model; returns (engine, one optimizer step, encoder modules)."""
    from training.config import RunConfig, resolve_deepspeed
    from training.trainer import build_engine

    ds = resolve_deepspeed(shipped_dp_config(bench.micro_batch), world, str(DP_DEEPSPEED))
    engine, _ = build_engine(RunConfig(), model, ds)
    device = engine.device
    batches = [(t.to(device), lab.to(device), im.to(device))
               for t, lab, im in synthetic_batches(model.cfg, bench, DP_GRAD_ACCUM, seed=rank)]

    def step() -> float:
        total = 0.0
        for tokens, labels, images in batches:  # as trainer.train's micro-batch loop
            loss = engine(tokens, labels, images)["loss"]
            engine.backward(loss)
            engine.step()
            total += loss.item()
        return total / len(batches)

    return engine, step, (model.vision, model.projector, [*model.vision.parameters(), *model.projector.parameters()])


def _build_pipeline(model, bench: BenchConfig, world: int):
    """trainer.train's pipeline-mode engine (`training.trainer.build_pipeline_engine`, the default run config's
    optimizer); returns (engine, one optimizer step, encoder modules)."""
    from training.config import RunConfig
    from training.pipeline import ENCODER_KEY, pipeline_batch, pipeline_ds_config
    from training.trainer import build_pipeline_engine

    dp = world // PIPELINE_STAGES
    gas = DP_GRAD_ACCUM * PIPELINE_STAGES
    ds = {**pipeline_ds_config(bench.micro_batch, gas, data_parallel=dp), "steps_per_print": 10**9}
    engine, _ = build_pipeline_engine(RunConfig(parallel="pipeline", pipeline_stages=PIPELINE_STAGES), model, ds)
    module = engine.module
    seed = engine.grid.get_data_parallel_rank()
    pool = [pipeline_batch(*mb, n_tiles=model.cfg.vision.max_tiles)
            for mb in synthetic_batches(model.cfg, bench, gas, seed=seed)]

    def forever():
        while True:
            yield from pool

    data = forever()

    def step() -> float:
        return float(engine.train_batch(data_iter=data))

    enc = module.tied_modules[ENCODER_KEY] if ENCODER_KEY in module.tied_modules else None
    if enc is None:
        raise BenchError("pipeline: the stage holds no tied image encoder (is the encoder frozen?)")
    return engine, step, (enc, enc, list(enc.parameters()))


def _release_freed_memory() -> None:
    """Hand glibc's freed heap back to the OS, so an earlier mode's memory does not sit in the next one's RSS."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the next mode's peak may include what this process still holds (memory_at_start_mib)


def run_rank(config: str, modes: list[str], steps: int, warmup: int, out: Path) -> None:
    """One rank: each mode in turn on a freshly built model; writes ``out/rank{R}_{mode}.json``."""
    import gc

    import torch.distributed as dist

    from adapters.multimodal import build_multimodal
    from training.bench import EncoderTimer, current_memory_mib, peak_memory_mib, reset_peak_memory
    from training.trainer import init_distributed

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rank, world = init_distributed()
    bench = BENCH_CONFIGS[config]
    for mode in modes:
        gc.collect()
        _release_freed_memory()
        memory_at_start = current_memory_mib(device)  # what earlier modes of this process left behind
        reset = reset_peak_memory(device)
        torch.manual_seed(0)
        model = build_multimodal(bench.model_config())
        if mode == "dp":
            engine, step, (first, last, params) = _build_dp(model, bench, world, rank)
            samples_per_step = bench.micro_batch * DP_GRAD_ACCUM * world
            stage = None
        else:
            engine, step, (first, last, params) = _build_pipeline(model, bench, world)
            samples_per_step = bench.micro_batch * DP_GRAD_ACCUM * PIPELINE_STAGES * (world // PIPELINE_STAGES)
            stage = engine.stage_id
        timer = EncoderTimer(first, last, params, sync=cuda)
        for _ in range(warmup):
            step()
        timer.reset()
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = [step() for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        dist.barrier()
        enc = timer.totals()
        peak, source = peak_memory_mib(device)
        record = {
            "rank": rank, "world": world, "stage": stage, "wall_s": wall, "steps": steps,
            "samples_per_step": samples_per_step, "peak_memory_mib": peak, "memory_source": source,
            "peak_reset": reset, "memory_at_start_mib": memory_at_start,
            "encoder_forward_s": enc["forward_s"], "encoder_backward_s": enc["backward_s"],
            "encoder_forward_calls": enc["forward_calls"], "encoder_backward_calls": enc["backward_calls"],
            "last_loss": losses[-1], "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        }
        (out / f"rank{rank}_{mode}.json").write_text(json.dumps(record))
        timer.remove()
        del engine, step, model, first, last, params, timer
        dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The trainer's overhead (one rank)


def overhead_run_config(root: Path, shards: str, steps: int, preset: str):
    """The run config of the overhead measurement: ``preset`` around a random frozen LM, the shipped DeepSpeed
    config, ``steps`` optimizer steps; no export, one checkpoint (after the last timed step)."""
    from training.config import load_run_config

    return load_run_config(None, [
        f"model.preset={preset}", f"model.tokenizer={root / 'tokenizer.model'}", f"data.shards={shards}",
        *OVERHEAD_DATA, f"deepspeed={DP_DEEPSPEED}", f"train.run_dir={root / 'run'}", f"train.steps={steps}",
        f"train.save_every={steps}", "train.export=false", "train.progress=false"])


def trainer_step_times(losses: Path) -> list[float]:
    """Seconds per optimizer step of a fresh `training.trainer.train` run, from its ``losses.jsonl``: a
    record's ``steps_per_s`` is steps done / seconds since the loop started, so step k ended at k / steps_per_s."""
    records = [json.loads(line) for line in losses.read_text().splitlines() if line.strip()]
    if [r["step"] for r in records] != list(range(1, len(records) + 1)):
        raise BenchError(f"{losses}: steps {[r['step'] for r in records]}, expected 1, 2, ... of one fresh run")
    ends = [r["step"] / r["steps_per_s"] for r in records]
    return [end - start for start, end in zip([0.0, *ends], ends)]


def run_overhead(config: str, steps: int, warmup: int, out: Path) -> None:
    """The trainer's step time against a bare PyTorch loop (same model factory, micro-batches, dtype) and the
    data loader alone, in this one process; writes ``out/rank0_overhead.json``."""
    from adapters.tokenizer import build_tiny_tokenizer
    from training.bench import bare_step_times, time_loader, write_caption_shards
    from media.tar import expand_shards
    from training.spec import get_spec
    from training.trainer import build_batches, train

    if config not in OVERHEAD_PRESETS:
        raise BenchError(f"overhead: no trainer preset for config {config!r} ({OVERHEAD_SKIPPED})")
    loadavg_start = os.getloadavg()
    root = out / "overhead"
    shards, captions = write_caption_shards(root / "shards", n_shards=2, per_shard=OVERHEAD_SAMPLES_PER_SHARD)
    tok = build_tiny_tokenizer(root, captions)
    total = warmup + steps
    cfg = overhead_run_config(root, shards, total, OVERHEAD_PRESETS[config])
    ds = shipped_dp_config(1)  # the micro-batch is a token budget (data.max_tokens); 1 is DeepSpeed's nominal
    gas = ds["gradient_accumulation_steps"]
    if ds.get("fp16", {}).get("enabled"):
        raise BenchError(f"{DP_DEEPSPEED}: fp16 (loss scaling) has no bare-loop counterpart here; use bf16 or fp32")
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32

    spec = get_spec(cfg.kind)
    model = spec.build_model(cfg, tok)  # the trainer's factory, the trainer's seed: the trainer's weights
    batches = build_batches(cfg, tok, model, 0, 1, expand_shards(cfg.data.shards.split()))
    replay, loader = time_loader(batches, max(steps * gas, OVERHEAD_LOADER_MICRO_BATCHES), warmup=warmup * gas)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    task = spec.build_task(cfg, model).to(device)
    model.train()

    def bare() -> list[float]:  # a fresh AdamW each time, so each run has its own first (warm-up) step
        return bare_step_times(task, spec.param_groups(cfg, model), replay[: total * gas], gas, dtype,
                               tuple(cfg.optim.betas), float(ds.get("gradient_clipping", 0.0)))

    # Bare loop, trainer, bare loop again: on a shared machine the load drifts, and timing the bare loop on
    # both sides of the trainer keeps that drift from reading as overhead.
    bare_before = bare()
    train(cfg, ds)  # the trainer as a user runs it, on the same shards, so the same micro-batches in order
    bare_after = bare()
    record = {
        "preset": cfg.model.preset, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "micro_batches_per_step": gas, "gradient_clipping": ds.get("gradient_clipping", 0.0),
        "trainer_step_s": trainer_step_times(Path(cfg.train.run_dir) / "losses.jsonl"),
        "bare_step_s": {"before": bare_before, "after": bare_after},
        "loader": loader, "torch_threads": torch.get_num_threads(),
        "data": {k: getattr(cfg.data, k) for k in ("max_seq_len", "max_tokens", "max_rows", "pack_rows")},
        "loadavg_1_5_15": {"start": list(loadavg_start), "end": list(os.getloadavg())},
    }
    (out / "rank0_overhead.json").write_text(json.dumps(record))


def summarize_overhead(rec: dict, warmup: int) -> tuple[dict, dict]:
    """("overhead", "data_loader") entries: medians over the timed steps, the first ``warmup`` of each run
    excluded (the bare loop's runs before and after the trainer's pooled)."""
    trainer_steps = rec["trainer_step_s"][warmup:]
    bare_steps = rec["bare_step_s"]["before"][warmup:] + rec["bare_step_s"]["after"][warmup:]
    trainer, bare = statistics.median(trainer_steps), statistics.median(bare_steps)
    loader = rec["loader"]
    data_per_step = loader["seconds"] / loader["micro_batches"] * rec["micro_batches_per_step"]
    overhead = {
        "trainer_step_s": _r(trainer, 5), "bare_step_s": _r(bare, 5), "ratio": _r(trainer / bare),
        "goal": OVERHEAD_GOAL, "goal_met": trainer / bare <= OVERHEAD_GOAL,
        # On a shared machine the fastest step of each is the one least slowed by other work.
        "trainer_min_step_s": _r(min(trainer_steps), 5), "bare_min_step_s": _r(min(bare_steps), 5),
        "ratio_min": _r(min(trainer_steps) / min(bare_steps)),
        # The trainer decodes its micro-batches as it goes; the bare loop replays them already decoded.
        "data_loading_s_per_step": _r(data_per_step, 5),
        "ratio_without_data_loading": _r((trainer - data_per_step) / bare),
        "steps_timed": len(rec["trainer_step_s"]) - warmup, "warmup_steps": warmup,
        "trainer_step_s_each": [_r(x, 5) for x in rec["trainer_step_s"]],
        "bare_step_s_each": {k: [_r(x, 5) for x in v] for k, v in rec["bare_step_s"].items()},
        "model": f"training.spec image kind, preset {rec['preset']!r}, random frozen LM",
        **{k: rec[k] for k in ("device", "dtype", "micro_batches_per_step", "gradient_clipping", "data",
                               "torch_threads")},
        "loadavg_1_5_15": {k: [_r(x, 2) for x in v] for k, v in rec["loadavg_1_5_15"].items()},
    }
    data_loader = {"what": "training.data.TrainBatches alone: tar read, JPEG decode, tiling, packing, collate",
                   **{k: _r(v, 5) if isinstance(v, float) else v for k, v in loader.items()}}
    return overhead, data_loader


# ----------------------------------------------------------------------------------------------
# The launcher


def launch(config: str, modes: list[str], nproc: int, steps: int, warmup: int, threads: int, timeout: float,
           log) -> dict[str, list[dict]]:
    """Run ``nproc`` ranks through ``modes`` of one config; returns each mode's rank records, rank order."""
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        out = Path(tmp)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "scripts.bench_train", "--worker", "--configs", config, "--modes", ",".join(modes),
               "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), "--out", str(out)]
        procs, logs = [], []
        t0 = time.perf_counter()
        for r in range(nproc):
            logs.append(open(out / f"rank{r}.log", "w"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          stdout=logs[-1], stderr=subprocess.STDOUT))
        codes: list[int | None] = [None] * nproc
        try:
            while any(c is None for c in codes):
                codes = [p.poll() for p in procs]
                if any(c not in (None, 0) for c in codes):
                    time.sleep(2)  # let the others report their side of a collective failure
                    codes = [p.poll() for p in procs]
                    break
                if time.perf_counter() - t0 > timeout:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in logs:
                f.close()
        what = f"{config}/{','.join(modes)}"
        if codes != [0] * nproc:
            why = "timed out after {:.0f} s".format(timeout) if all(c in (None, 0) for c in codes) else "failed"
            tails = "\n".join(f"--- rank {r} (exit {codes[r]}) ---\n" + (out / f"rank{r}.log").read_text()[-2500:]
                              for r in range(nproc) if codes[r] != 0)
            raise BenchError(f"{what}: {nproc} ranks {why} (exit codes {codes}):\n{tails}")
        files = {m: [out / f"rank{r}_{m}.json" for r in range(nproc)] for m in modes}
        missing = [f.name for fs in files.values() for f in fs if not f.is_file()]
        if missing:
            raise BenchError(f"{what}: the ranks exited 0 but did not write {missing}")
        log(f"{what}: {time.perf_counter() - t0:.1f} s including start-up")
        return {m: [json.loads(f.read_text()) for f in fs] for m, fs in files.items()}


def summarize(config: str, mode: str, ranks: list[dict]) -> dict:
    """Per-mode result from the rank records (throughput from the slowest rank's wall time)."""
    bench = BENCH_CONFIGS[config]
    wall = max(r["wall_s"] for r in ranks)
    samples = ranks[0]["samples_per_step"] * ranks[0]["steps"]
    samples_per_s = samples / wall
    per_rank = []
    for r in ranks:
        enc = r["encoder_forward_s"] + r["encoder_backward_s"]
        per_rank.append({
            "rank": r["rank"], "stage": r["stage"], "wall_s": _r(r["wall_s"]),
            "peak_memory_mib": _r(r["peak_memory_mib"], 1), "memory_source": r["memory_source"],
            "memory_at_start_mib": None if r["memory_at_start_mib"] is None else _r(r["memory_at_start_mib"], 1),
            "peak_window": "this mode only" if r["peak_reset"] else "whole process (peak could not be reset)",
            "encoder_forward_s": _r(r["encoder_forward_s"]), "encoder_backward_s": _r(r["encoder_backward_s"]),
            "encoder_calls_forward_backward": [r["encoder_forward_calls"], r["encoder_backward_calls"]],
            "encoder_fraction": _r(enc / r["wall_s"]), "last_loss": _r(r["last_loss"], 5),
        })
    fwd = forward_flops(bench.model_config(), bench.seq_len, bench.model_config().vision.max_tiles,
                        bench.n_supervised)
    flops = train_flops(bench.model_config(), fwd)
    out = {
        "ranks": len(ranks), "steps_timed": ranks[0]["steps"], "samples_per_step": ranks[0]["samples_per_step"],
        "wall_s": _r(wall), "samples_per_s": _r(samples_per_s), "tokens_per_s": _r(samples_per_s * bench.seq_len, 2),
        "achieved_model_tflops": _r(flops["model"] * samples_per_s / 1e12, 6),
        "device": ranks[0]["device"], "device_name": ranks[0]["device_name"],
        "torch_threads_per_rank": ranks[0]["torch_threads"], "per_rank": per_rank,
    }
    if mode == "pipeline":
        by_stage: dict[str, list[float]] = {}
        for r in per_rank:  # mean over a stage's data-parallel replicas
            by_stage.setdefault(str(r["stage"]), []).append(r["encoder_fraction"])
        out["encoder_fraction_per_stage"] = {s: _r(sum(f) / len(f)) for s, f in sorted(by_stage.items())}
    if ranks[0]["device"].startswith("cuda"):
        peak = peak_bf16_flops(ranks[0]["device_name"])
        out["peak_bf16_tflops_per_gpu"] = None if peak is None else peak / 1e12
        out["mfu"] = None if peak is None else _r(mfu(flops["model"], samples_per_s, len(ranks), peak), 5)
        out["mfu_executed_flops"] = None if peak is None else _r(
            mfu(flops["executed_estimate"], samples_per_s, len(ranks), peak), 5)
    return out


def config_summary(config: str, nproc: int) -> dict:
    bench = BENCH_CONFIGS[config]
    cfg = bench.model_config()
    v, lm = cfg.vision, cfg.lm
    fwd = forward_flops(cfg, bench.seq_len, v.max_tiles, bench.n_supervised)
    return {
        "lm": {"dim": lm.dim, "n_layers": lm.n_layers, "n_heads": lm.n_heads, "n_kv_heads": lm.n_kv_heads,
               "ffn_dim": lm.ffn_dim, "vocab_size": lm.vocab_size, "xattn_every": cfg.xattn_every,
               "n_xattn": cfg.n_xattn},
        "vision": {"width": v.width, "layers": v.layers, "global_layers": v.n_global_layers, "heads": v.heads,
                   "tile_size": v.tile_size, "tiles_per_image": v.max_tiles, "tokens_per_tile": v.n_tokens},
        "micro_batch": bench.micro_batch, "seq_len": bench.seq_len, "images_per_sample": 1,
        "grad_accum": {"dp": DP_GRAD_ACCUM, "pipeline": DP_GRAD_ACCUM * PIPELINE_STAGES},
        "global_batch": bench.micro_batch * DP_GRAD_ACCUM * nproc,
        "forward_gflops_per_sample": {k: _r(x / 1e9, 5) for k, x in fwd.items()},
        "train_gflops_per_sample": {k: _r(x / 1e9, 5) for k, x in train_flops(cfg, fwd).items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny,mid")
    p.add_argument("--modes", default="dp,pipeline,overhead", help="comma-separated: dp,pipeline,overhead")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per run (pipeline: a multiple of 2); default 2, on CUDA min(2, GPUs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before its ranks are killed")
    p.add_argument("--isolate", action="store_true",
                   help="fresh ranks for every mode (default: one launch per config runs its modes in turn)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    if args.steps < 1 or args.warmup < 0 or (args.nproc is not None and args.nproc < 1) or args.threads < 1:
        p.error("--steps, --nproc and --threads must be >= 1, --warmup >= 0")
    if "pipeline" in modes and args.nproc is not None and args.nproc % PIPELINE_STAGES:
        p.error(f"--nproc {args.nproc}: pipeline mode needs a multiple of {PIPELINE_STAGES} ranks")
    torch.set_num_threads(args.threads)
    if args.worker:
        if args.out is None or len(configs) != 1:
            p.error("--worker needs --out and exactly one config")
        if modes == ["overhead"]:
            run_overhead(configs[0], args.steps, args.warmup, Path(args.out))
        else:
            run_rank(configs[0], modes, args.steps, args.warmup, Path(args.out))
        return 0

    def log(msg: str) -> None:
        print(f"[bench_train] {msg}", file=sys.stderr, flush=True)

    cuda = torch.cuda.is_available()
    skipped = {}
    if args.nproc is None:
        args.nproc = min(2, torch.cuda.device_count()) if cuda else 2
        if "pipeline" in modes and args.nproc % PIPELINE_STAGES:  # one GPU: data-parallel mode only
            modes = [m for m in modes if m != "pipeline"]
            skipped["pipeline"] = f"needs {PIPELINE_STAGES} ranks, one GPU each; this machine has {args.nproc}"
    elif cuda and torch.cuda.device_count() < args.nproc:
        print(f"bench_train: --nproc {args.nproc} needs one GPU per rank (nccl), this machine has "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2
    result: dict = {
        "benchmark": "bench_train", "backend": "nccl" if cuda else "gloo", "nproc": args.nproc,
        "precision": "bf16 compute, fp32 gradient accumulation, ZeRO stage 1",
        "timing": f"{args.warmup} warm-up step(s) untimed, then {args.steps} timed optimizer step(s) between "
                  "barriers; samples/s from the slowest rank",
        "cpu_count": os.cpu_count(), "loadavg_1_5_15_at_start": [_r(x, 2) for x in os.getloadavg()],
        "configs": {},
    }
    rank_modes = [m for m in modes if m != "overhead"]
    try:
        for c in configs:
            entry = {"model": config_summary(c, args.nproc), **{m: {"skipped": why} for m, why in skipped.items()}}
            for group in ([[m] for m in rank_modes] if args.isolate else [rank_modes] if rank_modes else []):
                log(f"{c}/{','.join(group)}: {args.nproc} ranks, {args.warmup} + {args.steps} steps per mode")
                records = launch(c, group, args.nproc, args.steps, args.warmup, args.threads, args.timeout, log)
                for m in group:
                    entry[m] = summarize(c, m, records[m])
            if "overhead" in modes and c not in OVERHEAD_PRESETS:
                entry["overhead"] = {"skipped": OVERHEAD_SKIPPED}
            elif "overhead" in modes:
                log(f"{c}/overhead: 1 rank, trainer vs bare loop, {args.warmup} + {args.steps} steps each")
                rec = launch(c, ["overhead"], 1, args.steps, args.warmup, args.threads, args.timeout, log)
                entry["overhead"], entry["data_loader"] = summarize_overhead(rec["overhead"][0], args.warmup)
            result["configs"][c] = entry
    except BenchError as e:
        print(f"bench_train: {e}", file=sys.stderr)
        return 1
    result["loadavg_1_5_15_at_end"] = [_r(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
