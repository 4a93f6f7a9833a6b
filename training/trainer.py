"""The one place with DeepSpeed and torch.distributed wiring, and the one training loop.

``train(cfg)`` builds the model through the package factories, hands DeepSpeed only the trainable
parameters (the frozen LM is in no optimizer group and, with ``exclude_frozen_parameters``, in no
checkpoint), and runs ``cfg.train.steps`` optimizer steps of ``gradient_accumulation_steps`` micro-batches
per rank. What differs between the ``parallel`` layouts is a small mode object (`MODES`): how the engine
is built, what one step is and how the export is written: `DataParallelMode` (ZeRO-1/2, optionally
tensor-parallel, forward / backward / step per micro-batch) and `PipelineMode` (`training.pipeline` stages,
optionally tensor-parallel inside each, on the [TP, PP, DP] grid of `pipeline_topology`;
``engine.train_batch``). A whole model is exported by rank 0 in one file; a pipeline or tensor-parallel one
is written sharded by the ranks that hold it (`training.loading.export_shards`), never gathered onto one
rank. Exports hold the optimizer's FP32 master weights (`load_masters`); resume, checkpoints, ``losses.jsonl``, tensorboard,
the progress bar and the export are written once, in `train` / `run_steps`. Task outputs besides
``loss`` and ``n_tokens`` are scalar metrics (the ``bestrq`` kind's accuracy, ...), averaged like the
loss and logged beside it. bf16 compute with fp32 gradient accumulation is DeepSpeed's ``BF16_Optimizer`` (ZeRO stage 1
+ ``data_types.grad_accum_dtype: fp32``); gradient clipping is the DeepSpeed config's
``gradient_clipping``, applied once per step on the fp32 gradients.

Checkpoints (``run_dir/checkpoints/step_N``): DeepSpeed's model (trainable tensors only), optimizer and
scheduler states, plus one ``rank_R.pt`` per rank with its data-iterator position, RNG states and the run
record (resolved run config + DeepSpeed config), so the step after a resume sees the same batch, weights
and moments, hence the same loss, as the uninterrupted run. ``rank_R.pt`` holds tensors and plain Python
values only and is read with ``torch.load(weights_only=True)``: resuming runs no code from the run
directory through it (DeepSpeed's own ``*model_states.pt`` / ``*optim_states.pt`` are still unpickled by
DeepSpeed). A resume compares the run record with the current config: changes in `RESUME_MUTABLE` are
applied and logged, any other raises `ResumeConfigError` before anything in the run directory is written;
``losses.jsonl`` drops the records past the resumed step, so every step appears once. A resume keeps the
world size: each data-parallel rank's data position and ZeRO partition are saved per rank, so a resume at
another data-parallel size is refused (`check_resume_world`) before anything is built or loaded.

What differs between kinds (model, task, codec, parameter groups, export) is the kind's `training.spec`
entry, looked up once; the loop below is the same for all of them. The end of a run exports
``run_dir/export`` through the spec: an inference checkpoint (`adapters.model_io` / `speech.model_io` format,
what ``scripts.demo_vqa --checkpoint`` loads), a Meta-layout LM (text) or an encoder (clip, bestrq).

A data mix (``data.sources``) reads each source through its own codec (`training.spec.build_data_codec`) and
reports the delivered samples per source, summed over the data-parallel ranks, beside the normalised weights:
``losses.jsonl``'s ``sources`` field at every ``log_every`` step and the last, and `TrainResult.sources`.

Pipeline stages and tensor-parallel ranks build the model per rank (`build_rank_model`, `training.loading`): each
reads only its own layers / slices of the frozen LM of ``model.lm``, never the whole checkpoint.

Without a launcher (no RANK / WORLD_SIZE in the environment) the process initialises a one-rank gloo
group itself, so tests and CPU users run the same code directly.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from adapters.tokenizer import Tokenizer
from common.config import config_to_dict
from media.tar import ShardError, expand_shards
from training.config import RunConfig, load_deepspeed_config, resolve_deepspeed, resume_changes, write_resolved
from training.data import MixStream, ShardStream, TrainBatches
from training.loading import RankLayout, export_shards
from training.optim import warmup_cosine
from training.spec import TrainError, build_data_codec, get_spec


class RankStateError(TrainError):
    """A checkpoint's ``rank_R.pt`` that is missing, incomplete, or holds more than tensors and plain data."""


class ResumeWorldError(TrainError):
    """A resume with another number of ranks (another data-parallel size) than the checkpoint was saved by."""


# What a resume may change: the run's length, its outputs and logging, the DeepSpeed file's path (its
# content is compared key by key) and the bad-sample policy. Model, data, optimizer, batch sizes, seeds
# and parallel layout are in the checkpoint's states (or its data position) and may not change.
RESUME_MUTABLE = frozenset({"train.steps", "train.save_every", "train.log_every", "train.export",
                            "train.resume", "train.progress", "train.run_dir", "deepspeed", "data.on_error",
                            "deepspeed_config.steps_per_print", "deepspeed_config.wall_clock_breakdown"})


# ---------------------------------------------------------------------------------------------- setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under a launcher its env is used; alone, a one-rank group on a free port."""
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def build_model(cfg: RunConfig, tok: Tokenizer | None) -> nn.Module:
    """The run's model, by its kind's spec (`training.spec`)."""
    return get_spec(cfg.kind).build_model(cfg, tok)


def build_rank_model(cfg: RunConfig, tok: Tokenizer | None, layout: RankLayout | None) -> nn.Module:
    """The model as this rank of ``layout`` holds it (`training.loading`: only its stage / slices of the frozen
    LM read) when the kind's spec builds per rank; else (or with no layout) `build_model`."""
    spec = get_spec(cfg.kind)
    if layout is None or spec.build_rank_model is None:
        return spec.build_model(cfg, tok)
    return spec.build_rank_model(cfg, tok, layout)


def source_shards(cfg: RunConfig) -> list[list[Path]]:
    """`media.tar.expand_shards` of each source's patterns (``data.shards``, or every ``data.sources[i].shards``;
    space-separated patterns), resolved before the model is built so a run config naming shards that do not
    exist fails first, naming them (and the source)."""
    if cfg.data.sources is None:
        return [expand_shards(cfg.data.shards.split())]
    out = []
    for i, src in enumerate(cfg.data.sources):
        try:
            out.append(expand_shards(src.shards.split()))
        except ShardError as e:
            raise ShardError(f"data.sources[{i}].shards: {e}") from None
    return out


def build_batches(cfg: RunConfig, tok: Tokenizer | None, model: nn.Module, rank: int, world: int,
                  shards: list[list[Path]] | list[Path]) -> TrainBatches:
    """``shards``: `source_shards` (a flat list is the one source of ``data.shards``). A mix gets one
    `ShardStream` per source, split across ranks like a single one, each shuffled with its own seed."""
    d = cfg.data
    per_source = shards if shards and isinstance(shards[0], list) else [shards]
    if d.sources is None:
        stream = ShardStream(per_source[0], rank, world, d.seed, d.shuffle_buffer)
    else:
        seeds = np.random.SeedSequence(d.seed).spawn(len(per_source))
        stream = MixStream([ShardStream(paths, rank, world, int(ss.generate_state(1)[0]), d.shuffle_buffer,
                                        where=f"data.sources[{i}].shards")
                            for i, (paths, ss) in enumerate(zip(per_source, seeds))],
                           [s.weight for s in d.sources], d.seed, rank)
    codec = build_data_codec(cfg, tok, model)
    return TrainBatches(stream, codec, tok.pad_id if tok is not None else 0, d.max_seq_len, d.max_tokens,
                        d.max_rows, d.on_error, pack_rows=d.pack_rows)


def param_groups(cfg: RunConfig, model: nn.Module) -> list[dict]:
    return get_spec(cfg.kind).param_groups(cfg, model)


def _initialize(cfg: RunConfig, module: nn.Module, groups: list[dict], ds: dict, mpu=None) -> tuple:
    """(engine, lr scheduler): DeepSpeed around ``module``, AdamW on ``groups``, warmup + cosine over
    ``train.steps``."""
    import deepspeed

    opt = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas))
    schedule = warmup_cosine(cfg.optim.warmup, cfg.train.steps, cfg.optim.min_lr_ratio)
    engine, _, _, sched = deepspeed.initialize(
        model=module, optimizer=opt, config=ds, mpu=mpu,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
    return engine, sched


def build_engine(cfg: RunConfig, model: nn.Module, ds: dict, mpu=None) -> tuple:
    """(engine, lr scheduler) of data-parallel mode: the kind's task of ``model`` and the spec's parameter
    groups; the model left in train mode. ``scripts.bench_train`` times this same engine."""
    spec = get_spec(cfg.kind)
    engine, sched = _initialize(cfg, spec.build_task(cfg, model), spec.param_groups(cfg, model), ds, mpu)
    model.train()
    return engine, sched


def build_pipeline_engine(cfg: RunConfig, model: nn.Module, ds: dict, topology=None) -> tuple:
    """(engine, lr scheduler) of pipeline mode: ``model`` laid out as ``cfg.pipeline_stages`` stages
    (`training.pipeline`) on ``topology``'s ranks (`pipeline_topology`), with activation checkpointing every
    ``ds["pipeline"]``'s interval."""
    from training.pipeline import build_pipeline_module, pipeline_param_groups

    module = build_pipeline_module(model, cfg.pipeline_stages,
                                   ds.get("pipeline", {}).get("activation_checkpoint_interval", 0), topology)
    o = cfg.optim
    return _initialize(cfg, module, pipeline_param_groups(module, model, o.lr, o.weight_decay, o.encoder_lr_scale),
                       ds)


def load_tokenizer(cfg: RunConfig) -> Tokenizer | None:
    """``model.tokenizer``; None for a kind that needs none (clip brings open_clip's own BPE)."""
    return Tokenizer(cfg.model.tokenizer) if get_spec(cfg.kind).needs_tokenizer else None


# ---------------------------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)  # optimizer step (1-based) -> mean loss over ranks
    export_dir: Path | None = None
    steps_per_s: float | None = None
    tokens_per_s: float | None = None
    bad_samples: int = 0
    # A data mix: source name -> {"weight": normalised, "samples": delivered over all ranks, "share": of all}
    sources: dict[str, dict] | None = None


def _rng_state() -> dict:
    """The process RNGs as tensors and plain values (what ``torch.load(weights_only=True)`` reads back)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def _latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load_rank_state(path: Path, world: int, keys: tuple[str, ...]) -> dict:
    """A ``rank_R.pt`` read with ``weights_only=True``: only tensors and plain Python values unpickle, so a
    tampered file is refused (`RankStateError`) before any code in it runs."""
    if not path.is_file():
        raise RankStateError(f"{path}: missing (saved with another world size than {world}?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        why = next((ln.strip() for ln in lines if "Unsupported" in ln), lines[0]).split(". Please")[0]
        raise RankStateError(f"{path}: refused, not readable as tensors and plain values (torch.load "
                             f"weights_only=True: {why}); nothing in it was run") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise RankStateError(f"{path}: no {', '.join(missing)} (a rank state of another format)")
    return state


def _sizes(run: dict, world: int) -> str:
    tp = run.get("tensor_parallel", 1)
    stages = run.get("pipeline_stages", 1) if run.get("parallel") == "pipeline" else 1
    if world % (tp * stages):
        return f"world size {world} (not a multiple of tensor-parallel {tp} x {stages} stage(s))"
    return f"world size {world} (data-parallel {world // (tp * stages)} x tensor-parallel {tp} x {stages} stage(s))"


def check_resume_world(cfg: RunConfig, world: int) -> None:
    """Refuse (`ResumeWorldError`) to resume a checkpoint saved by another number of ranks, before anything is
    built or loaded: each rank's data position (its share of the shards) and ZeRO optimizer partition are saved
    per data-parallel rank, and neither is re-split here. The message names both layouts."""
    ckpt_dir = Path(cfg.train.run_dir) / "checkpoints"
    tag = _latest_tag(ckpt_dir) if cfg.train.resume else None
    saved = len(list((ckpt_dir / tag).glob("rank_*.pt"))) if tag is not None else 0
    if saved in (0, world):  # none: `open_run` names the missing rank file
        return
    run = load_rank_state(ckpt_dir / tag / "rank_0.pt", saved, ("run",))["run"]
    raise ResumeWorldError(f"{ckpt_dir / tag}: saved by {_sizes(run, saved)}, resumed with "
                           f"{_sizes(config_to_dict(cfg), world)}: a resume keeps the data-parallel size (data "
                           f"positions and optimizer partitions are per rank); launch {saved} processes, or start a "
                           "new run (another train.run_dir) from this run's export with model.init_from")


def check_resume(saved: dict, now: dict, mutable: frozenset[str], where: Path, rank: int) -> None:
    """Refuse a resume whose run record differs from the checkpoint's outside ``mutable``
    (`ResumeConfigError`); rank 0 logs the changes it applies."""
    applied = resume_changes(saved, now, mutable, str(where))
    if applied and rank == 0:
        print(f"resume from {where}: applying {', '.join(applied)}", file=sys.stderr)


def truncate_steps(path: Path, last_step: int) -> None:
    """Keep the JSON lines of ``path`` with ``"step" <= last_step``: a killed run logged steps past its last
    checkpoint, and the resumed run redoes and logs them again, so each step is written once. An unreadable
    last line is a write the kill cut short; an unreadable earlier line is an error."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise TrainError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        if record["step"] <= last_step:
            kept.append(line)
    path.write_text("".join(ln + "\n" for ln in kept))


def run_record(cfg: RunConfig, ds: dict) -> dict:
    """What a checkpoint records of its run, compared key by key on resume."""
    return json.loads(json.dumps({**config_to_dict(cfg), "deepspeed_config": ds}))


def open_run(cfg: RunConfig, ds: dict, rank: int, world: int) -> tuple[str, dict] | None:
    """(tag, this rank's state) of the checkpoint to resume, after checking the run record against ``cfg``;
    None for a fresh start. Then rank 0 writes config.yaml and deepspeed.json (never for a refused resume)."""
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = _latest_tag(ckpt_dir) if cfg.train.resume else None
    resumed = None
    if tag is not None:
        state_file = ckpt_dir / tag / f"rank_{rank}.pt"
        state = load_rank_state(state_file, world, ("run", "data", "rng"))
        check_resume(state["run"], run_record(cfg, ds), RESUME_MUTABLE, ckpt_dir / tag, rank)
        resumed = (tag, state)
    if rank == 0:
        write_resolved(cfg, ds, run_dir)
    return resumed


def _to_device(x, device):
    return x.to(device) if hasattr(x, "to") else x


# ---------------------------------------------------------------------------------------------- modes


@dataclass
class StepStats:
    """One optimizer step, over every data-parallel rank: the mean loss, the task's other scalar outputs
    (means, e.g. BEST-RQ's accuracy), input and label tokens, and the last micro-batch's sample keys."""

    loss: float
    metrics: dict[str, float]
    tokens: int
    label_tokens: int
    keys: list[str]


class DataParallelMode:
    """``parallel: data``: every rank runs the kind's task (its tensor-parallel shard when
    ``tensor_parallel`` > 1); one step = ``gradient_accumulation_steps`` x (forward, backward, step)."""

    def __init__(self, cfg: RunConfig, world: int):
        tp = cfg.tensor_parallel
        if world % tp:
            raise TrainError(f"tensor_parallel={tp} does not divide the world size {world}")
        self.tp, self.mpu, self.tp_group = tp, None, None
        self.dp_rank, self.dp_world = dist.get_rank(), world // tp
        self.layout: RankLayout | None = None  # what `build_rank_model` builds: None, the whole model
        if tp > 1:
            from training.tensor_parallel import init_tp_grid

            self.mpu = init_tp_grid(tp)
            self.tp_group = self.mpu.get_tensor_model_parallel_group()
            self.dp_rank = self.mpu.get_data_parallel_rank()
            self.layout = RankLayout(tp=tp, tp_rank=dist.get_rank(self.tp_group))

    def build_engine(self, cfg: RunConfig, model: nn.Module, ds: dict) -> tuple:
        if self.tp_group is not None:
            shard_model(model, self.tp, self.tp_group)
            if cfg.encoder_sequence_parallel:
                split_encoder(model, self.tp, self.tp_group, cfg.encoder_sp_recompute_kv)
        return build_engine(cfg, model, ds, self.mpu)

    def batches(self, cfg: RunConfig, tok: Tokenizer | None, model: nn.Module, engine,
                shards: list[list[Path]]) -> TrainBatches:
        return build_batches(cfg, tok, model, self.dp_rank, self.dp_world, shards)  # one TP group: one stream

    def step(self, engine, batches: TrainBatches) -> StepStats:
        # The sums stay on the device (a .item() per micro-batch would wait for the GPU each time); the token
        # counts are the CPU batch's. One sync per step, and the all-reduce runs on the device (NCCL takes no
        # CPU tensor).
        device, gas = engine.device, engine.gradient_accumulation_steps()
        sums: dict[str, torch.Tensor] = {}
        n_label = n_input = 0
        for _ in range(gas):
            mb = next(batches)
            media = {k: _to_device(v, device) for k, v in mb.media.items()}
            out = engine(mb.tokens.to(device), mb.labels.to(device), **media)
            engine.backward(out["loss"])
            engine.step()
            for name, value in out.items():
                if name != "n_tokens":
                    sums[name] = sums.get(name, 0) + _scalar(name, value)
            n_label, n_input = n_label + mb.n_label_tokens, n_input + mb.tokens.numel()
        names = sorted(sums)  # the same order on every rank: the same task
        stats = torch.stack([*(sums[k] for k in names), sums["loss"].new_tensor(n_label),
                             sums["loss"].new_tensor(n_input)])
        dist.all_reduce(stats)
        stats = stats.cpu() / self.tp  # the ranks of a tensor-parallel group share one batch: count it once
        means = dict(zip(names, (stats[: len(names)] / (gas * self.dp_world)).tolist()))
        return StepStats(means.pop("loss"), means, int(stats[-1]), int(stats[-2]), mb.keys)

    def data_sum(self, engine, counts: list[int]) -> list[int]:
        """Per-rank data counts summed over the data-parallel world (a tensor-parallel group's one stream once)."""
        total = torch.tensor(counts, dtype=torch.float64, device=engine.device)
        dist.all_reduce(total)
        return [int(round(x)) for x in (total.cpu() / self.tp).tolist()]

    def export(self, engine, model: nn.Module, cfg: RunConfig, out: Path, rank: int) -> Path:
        """The run's export: rank 0 writes the kind's (`TrainSpec.export`) of the whole model; a tensor-parallel
        model is written sharded by its ranks (`training.loading.export_shards`), never gathered."""
        if self.tp_group is not None:
            return export_shards(dict(model.named_parameters()), self.layout, self.dp_rank, self.tp_group, model,
                                 cfg, out, rank)
        load_masters(model)
        if rank == 0:
            get_spec(cfg.kind).export(model.float().eval(), cfg, out)
        return out


def split_encoder(model: nn.Module, tp: int, tp_group, recompute_kv: bool) -> None:
    """`apply_encoder_sequence_parallel` over the tensor-parallel group (its ranks see the same images); a tile
    length the group does not split is a `TrainError`."""
    from training.sequence_parallel import apply_encoder_sequence_parallel, validate_sp_size

    try:
        validate_sp_size(model.cfg.vision, tp)
    except ValueError as e:
        raise TrainError(f"encoder_sequence_parallel over tensor_parallel={tp}: {e}") from e
    apply_encoder_sequence_parallel(model, tp_group, recompute_kv=recompute_kv)


def shard_model(model: nn.Module, tp: int, tp_group) -> None:
    """`apply_tensor_parallel` over ``tp_group``, a size that does not split the model refused as a `TrainError`."""
    from training.tensor_parallel import apply_tensor_parallel, validate_tp_size

    try:
        validate_tp_size(model.cfg.lm, tp)
    except ValueError as e:
        raise TrainError(f"tensor_parallel={tp}: {e}") from e
    apply_tensor_parallel(model, tp_group)


def _scalar(name: str, value: torch.Tensor) -> torch.Tensor:
    """A task output other than ``n_tokens`` as a float64 0-dim tensor (what the step averages and logs)."""
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        raise TrainError(f"the task returned {name!r} of shape {tuple(getattr(value, 'shape', ()))}: every output "
                         "but n_tokens must be a scalar (loss, or a metric the trainer logs)")
    return value.detach().double()


class PipelineMode:
    """``parallel: pipeline`` (image model only): `training.pipeline` lays the model out as
    ``cfg.pipeline_stages`` stages, the rest of the world is data parallelism, one step is
    ``engine.train_batch``; with ``tensor_parallel`` > 1 each stage is a tensor-parallel group
    (`pipeline_topology`'s grid). Micro-batches must all have one shape, so each holds exactly
    ``train_micro_batch_size_per_gpu`` samples padded to ``data.max_seq_len`` tokens and ``max_tiles`` tiles
    (packing by token budget does not apply); only the first and last stages read data."""

    def __init__(self, cfg: RunConfig, world: int):
        S, tp = cfg.pipeline_stages, cfg.tensor_parallel
        if world % (S * tp):
            raise TrainError(f"pipeline_stages x tensor_parallel: world size {world} is not a multiple of "
                             f"{S} stages x {tp} tensor-parallel ranks")
        self.tp, self.dp_world = tp, world // (S * tp)
        from training.pipeline import pipeline_topology

        self.topology = pipeline_topology(S, self.dp_world, tp)  # [TP, PP, DP], innermost first
        coord = self.topology.get_coord(dist.get_rank())
        self.dp_rank, self.tp_group = coord.data, None
        self.layout = RankLayout(stages=S, stage=coord.pipe, tp=tp, tp_rank=getattr(coord, "model", 0))
        if tp > 1:  # every rank creates every TP group, in the same order
            for ranks in self.topology.get_axis_comm_lists("model"):
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    self.tp_group = group
        self._counts = [0, 0]  # this step's input and label tokens read by this rank
        self._keys: list[str] = []  # the last micro-batch read, for a non-finite loss report
        self._feed = None  # the micro-batch iterator `engine.train_batch` pulls from (set by `batches`)

    def build_engine(self, cfg: RunConfig, model: nn.Module, ds: dict) -> tuple:
        if self.tp_group is not None:  # shard first: the stages are built from the sharded modules
            shard_model(model, self.tp, self.tp_group)
        return build_pipeline_engine(cfg, model, ds, self.topology)

    def batches(self, cfg: RunConfig, tok: Tokenizer | None, model: nn.Module, engine,
                shards: list[list[Path]]) -> TrainBatches:
        from training.pipeline import pipeline_batch

        micro = engine.train_micro_batch_size_per_gpu()
        fixed = replace(cfg, data=replace(cfg.data, max_rows=micro, max_tokens=micro * cfg.data.max_seq_len))
        batches = build_batches(fixed, tok, model, engine.grid.get_data_parallel_rank(), self.dp_world, shards)

        def feed():  # read lazily, after a resume has moved `batches` to its saved position
            while True:
                mb = next(batches)
                self._counts[0] += mb.tokens.numel()
                self._counts[1] += mb.n_label_tokens
                self._keys = mb.keys
                yield pipeline_batch(mb.tokens, mb.labels, mb.media["images"], seq_len=cfg.data.max_seq_len,
                                     n_images=1, n_tiles=model.cfg.vision.max_tiles, pad_id=tok.pad_id)

        self._feed = feed()
        return batches

    def step(self, engine, batches: TrainBatches) -> StepStats:
        self._counts = [0, 0]
        loss = float(engine.train_batch(self._feed))  # the mean over micro-batches and data-parallel ranks
        tokens, label_tokens = self.data_sum(engine, self._counts)
        return StepStats(loss, {}, tokens, label_tokens, self._keys)

    def data_sum(self, engine, counts: list[int]) -> list[int]:
        """Per-rank data counts summed over the data-parallel world. First and last stages both read every
        micro-batch (middle stages none), and the ranks of a tensor-parallel group the same ones: the first
        stages' counts only, of TP rank 0."""
        reads = engine.is_first_stage() and self.layout.tp_rank == 0
        total = torch.tensor(counts if reads else [0] * len(counts), dtype=torch.float64, device=engine.device)
        dist.all_reduce(total)
        return [int(x) for x in total.cpu().tolist()]

    def export(self, engine, model: nn.Module, cfg: RunConfig, out: Path, rank: int) -> Path:
        """The export written sharded, each stage (each TP rank of it) its own weights
        (`training.loading.export_shards`)."""
        from training.pipeline import stage_parameters

        return export_shards(stage_parameters(engine), self.layout, self.dp_rank, self.tp_group, model, cfg, out,
                             rank)


def load_masters(model: nn.Module) -> None:
    """Put the optimizer's FP32 master weights into ``model``'s trainable parameters (the bf16 parameters are
    their rounding), so the export holds what a resume would train on. Collective over data-parallel ranks."""
    from deepspeed.utils import safe_get_full_fp32_param

    for p in model.parameters():
        if p.requires_grad and (full := safe_get_full_fp32_param(p)) is not None:
            p.data = full.to(p.device)


MODES = {"data": DataParallelMode, "pipeline": PipelineMode}


# ---------------------------------------------------------------------------------------------- loop


def train(cfg: RunConfig, ds_config: dict | None = None) -> TrainResult:
    """Run (or resume) ``cfg`` in its ``parallel`` mode; every rank returns the same losses (averaged over
    ranks per step)."""
    rank, world = init_distributed()
    check_resume_world(cfg, world)
    mode = MODES[cfg.parallel](cfg, world)
    ds = resolve_deepspeed(ds_config if ds_config is not None else load_deepspeed_config(cfg.deepspeed),
                           mode.dp_world, cfg.deepspeed)
    shards = source_shards(cfg)  # before anything is built or written
    run_dir = Path(cfg.train.run_dir)
    resumed = open_run(cfg, ds, rank, world)
    tok = load_tokenizer(cfg)
    model = build_rank_model(cfg, tok, mode.layout)
    engine, sched = mode.build_engine(cfg, model, ds)
    batches = mode.batches(cfg, tok, model, engine, shards)

    ckpt_dir = run_dir / "checkpoints"
    if resumed is not None:
        resume(engine, batches, ckpt_dir, *resumed)
    start = engine.global_steps
    if rank == 0:
        truncate_steps(run_dir / "losses.jsonl", start)
    result = run_steps(cfg, ds, mode, engine, sched, batches, start, rank)
    if cfg.train.export:
        result.export_dir = mode.export(engine, model, cfg, run_dir / "export", rank)
    dist.barrier()
    return result


def run_steps(cfg: RunConfig, ds: dict, mode, engine, sched, batches: TrainBatches, start: int,
              rank: int) -> TrainResult:
    """Steps ``start`` to ``train.steps`` with rank 0's progress bar, ``losses.jsonl`` (one line per step)
    and tensorboard scalars; checkpoints every ``train.save_every`` steps and at the end."""
    run_dir = Path(cfg.train.run_dir)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    from tqdm import tqdm

    result = TrainResult(run_dir)
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, desc=f"train {cfg.kind}",
               disable=rank != 0 or not cfg.train.progress, mininterval=1)
    t0, tokens_done = time.perf_counter(), 0
    after_step = get_spec(cfg.kind).after_step
    for step in bar:
        s = mode.step(engine, batches)
        if after_step is not None:
            after_step(cfg, engine.module, step + 1)
        if not math.isfinite(s.loss):
            raise TrainError(f"step {step + 1}: non-finite loss {s.loss} (last batch: {s.keys[:4]} ...)")
        result.losses[step + 1] = s.loss
        tokens_done += s.tokens
        dt = time.perf_counter() - t0
        lr = sched.get_last_lr()[0]
        result.steps_per_s, result.tokens_per_s = (step + 1 - start) / dt, tokens_done / dt
        record = {"step": step + 1, "loss": s.loss, "lr": lr, "tokens": s.tokens,
                  "label_tokens": s.label_tokens, "steps_per_s": result.steps_per_s}
        clash = sorted(set(record) & set(s.metrics))
        if clash:
            raise TrainError(f"the task's metric {clash[0]!r} has the name of a losses.jsonl field")
        logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
        if logged and cfg.data.sources is not None:  # collective: every rank takes part
            result.sources = record["sources"] = mix_report(cfg, mode.data_sum(engine, batches.source_samples))
        if rank == 0:
            bar.set_postfix(loss=f"{s.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{result.tokens_per_s:.0f}")
            with open(run_dir / "losses.jsonl", "a") as f:  # one line per step (past the resumed one)
                f.write(json.dumps({**record, **s.metrics}) + "\n")
            if logged:
                scalars = {"loss": s.loss, "lr": lr, "tokens_per_s": result.tokens_per_s,
                           "steps_per_s": result.steps_per_s, "label_tokens": s.label_tokens,
                           "bad_samples": batches.n_bad, **s.metrics,
                           **{f"share/{k}": v["share"] for k, v in (result.sources or {}).items()}}
                for name, value in scalars.items():
                    writer.add_scalar(f"train/{name}", value, step + 1)
        if (step + 1) % cfg.train.save_every == 0 or step + 1 == cfg.train.steps:
            save(engine, batches, run_dir / "checkpoints", step + 1, rank, run_record(cfg, ds))
    result.bad_samples = batches.n_bad
    if batches.n_bad and rank == 0:
        (run_dir / f"bad_samples_rank{rank}.json").write_text(json.dumps(batches.bad, indent=1))
    if writer is not None:
        writer.close()
    return result


def mix_report(cfg: RunConfig, counts: list[int]) -> dict[str, dict]:
    """Source name -> its normalised weight, delivered ``samples`` (``counts``, over all ranks) and their
    ``share`` of all delivered samples: the realised mix beside the asked one."""
    weights = [s.weight for s in cfg.data.source_list()]
    total = sum(counts)
    return {name: {"weight": w / sum(weights), "samples": n, "share": n / total if total else 0.0}
            for name, w, n in zip(cfg.data.source_names(), weights, counts)}


def resume(engine, batches: TrainBatches, ckpt_dir: Path, tag: str, state: dict) -> None:
    """Load checkpoint ``tag``: DeepSpeed's states, then this rank's data position and RNGs from ``state``
    (its ``rank_R.pt``, read and checked by `open_run`)."""
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
    if path is None:
        raise TrainError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    batches.load_state_dict(state["data"])
    _set_rng_state(state["rng"])


def save(engine, batches: TrainBatches, ckpt_dir: Path, step: int, rank: int, run: dict) -> None:
    """DeepSpeed's states (trainable tensors only) + this rank's data position, RNG states and ``run``
    (`run_record`), as tensors and plain values."""
    tag = f"step_{step}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    state = {"run": run, "data": batches.state_dict(), "rng": _rng_state()}
    torch.save(state, ckpt_dir / tag / f"rank_{rank}.pt")
    dist.barrier()  # every rank's state is on disk before DeepSpeed writes "latest"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)
