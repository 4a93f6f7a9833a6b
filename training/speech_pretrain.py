"""BEST-RQ pre-training (speech.pretrain) under DeepSpeed: data parallel, ZeRO-1, resumable checkpoints.

    torchrun --nproc_per_node 2 -m scripts.pretrain_speech_encoder --shards shards/ --out runs/encoder \\
        --deepspeed configs/deepspeed/speech_pretrain.json --save-every 500

`pretrain_distributed(clips, cfg, out_dir, ds_config)` is what the script runs when a launcher started it
(WORLD_SIZE > 1) or ``--deepspeed`` was given; alone (no launcher) it runs in a one-rank gloo group
(`training.trainer.init_distributed`). The model, features, loss and outputs are the single-process path's;
the LR schedule is the trainer's (`training.optim.warmup_cosine`: linear warmup over ``cfg.warmup``, cosine
to 0 at ``cfg.steps``); what changes:

* **Batches.** ``cfg.batch_size`` clips per micro-batch per rank (the DeepSpeed config's
  ``train_micro_batch_size_per_gpu``); one optimizer step = ``gradient_accumulation_steps`` micro-batches per
  rank. Every epoch all ranks draw the same seeded permutation (seed, epoch) of the clips and rank R takes
  positions R, R + W, ... of it (the ``len % W`` last ones are left out that epoch), so the ranks' clips
  within an epoch are disjoint. Crops and BEST-RQ masks/noise come from per-rank generators seeded with
  (seed, rank). Each rank appends the clips it drew, per step, to ``out/clips/rank_R.jsonl``.
* **Numerics.** As the DeepSpeed config says: the shipped ``configs/deepspeed/speech_pretrain.json`` is bf16
  compute with fp32 gradient accumulation (ZeRO-1); log-mel, feature normalisation and the quantizer stay
  fp32 (`speech.bestrq`). Without ``--deepspeed`` a launched run uses `default_deepspeed_config` (fp32).
  The optimizer is always the torch AdamW of `speech.pretrain.param_groups` (DeepSpeed never builds its
  own Adam ops); gradient clipping is DeepSpeed's ``gradient_clipping`` = ``cfg.grad_clip``.
* **Checkpoints** (``save_every``): ``out/checkpoints/step_N`` holds DeepSpeed's model, optimizer and
  scheduler states plus ``rank_R.pt`` (sampler position, generators, the curves so far, the run's config),
  tensors and plain values read with ``torch.load(weights_only=True)`` (`training.trainer.load_rank_state`).
  A run whose ``out/checkpoints/latest`` exists continues from it, so the step after the resume has the
  uninterrupted run's loss; its config, world size and accumulation must be the checkpoint's (only
  ``log_every`` may change; any other difference is a `ResumeConfigError` naming each key).
* **Outputs.** Rank 0 writes ``encoder.safetensors``, ``encoder_config.json``, ``bestrq.safetensors`` and
  ``report.json`` (`speech.pretrain.save_run`); per-step curves are means over ranks (and micro-batches),
  and the report adds ``world_size``, ``gradient_accumulation_steps``, ``deepspeed`` (the resolved config),
  ``resumed_from`` and ``clip_logs``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from speech.audio import SAMPLE_RATE
from speech.conformer import conformer_config
from speech.features import LogMel
from speech.pretrain import (AudioClips, PretrainConfig, build_bestrq, build_report, pad_waves, param_groups,
                             save_run)
from training.config import TrainConfigError, resolve_deepspeed
from training.optim import warmup_cosine
from training.trainer import (TrainError, _latest_tag, check_resume, init_distributed, load_rank_state,
                              truncate_steps)

CURVES = ("loss", "accuracy", "target_perplexity", "masked_fraction")


def default_deepspeed_config(cfg: PretrainConfig) -> dict:
    """A launched run without ``--deepspeed``: fp32, ZeRO-1, no accumulation, clipping at cfg.grad_clip."""
    ds = {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    return ds


def resolve_pretrain_deepspeed(ds: dict, cfg: PretrainConfig, world: int, where: str) -> dict:
    """``ds`` with the micro-batch and clipping of ``cfg`` filled in; a value there that contradicts ``cfg``
    raises `TrainConfigError` naming ``where`` and the key (one source of truth per setting)."""
    ds = json.loads(json.dumps(ds))
    owned = (("train_micro_batch_size_per_gpu", cfg.batch_size), ("gradient_clipping", cfg.grad_clip))
    for key, want in owned:
        if key in ds and ds[key] != want:
            flag = "--batch-size" if key.startswith("train_micro") else "PretrainConfig.grad_clip"
            raise TrainConfigError(f"deepspeed: {where}: {key} {ds[key]} contradicts {flag} {want} "
                                   "(leave it out of the JSON or make them equal)")
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    return resolve_deepspeed(ds, world, where)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


class RankClipSampler:
    """Clip indices for one rank: epoch e's order is ``default_rng((seed, e)).permutation(n)``, shared by all
    ranks; rank R takes positions R, R + W, ... (n // W of them), so the ranks' shares are disjoint."""

    def __init__(self, n: int, rank: int, world: int, seed: int, source: str = "clips"):
        if n < world:
            raise TrainError(f"{source}: {n} clip(s) cannot be split over {world} ranks (need >= 1 each)")
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch, self.pos = 0, 0
        self._share = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[self.rank :: self.world][: self.n // self.world].tolist()

    def next(self) -> tuple[int, int]:
        """(epoch, clip index)."""
        if self.pos == len(self._share):
            self.epoch, self.pos = self.epoch + 1, 0
            self._share = self._order(self.epoch)
        self.pos += 1
        return self.epoch, self._share[self.pos - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._share = self._order(self.epoch)


# Everything else shapes the weights, the LR schedule (cfg.steps) or the clips' order.
RESUME_MUTABLE = frozenset({"log_every"})


def pretrain_distributed(clips: AudioClips, cfg: PretrainConfig, out_dir: str | Path,
                         ds_config: dict | None = None, *, save_every: int | None = None,
                         progress: bool = True, ds_where: str = "default DeepSpeed config") -> dict:
    """Train BEST-RQ with a DeepSpeed engine on every rank, rank 0 writing the outputs (see the module doc);
    every rank returns the report. ``ds_config`` None: `default_deepspeed_config`."""
    import deepspeed

    if save_every is not None and save_every < 1:
        raise TrainConfigError(f"--save-every must be >= 1, got {save_every}")
    rank, world = init_distributed()
    ds = resolve_pretrain_deepspeed(ds_config if ds_config is not None else default_deepspeed_config(cfg),
                                    cfg, world, ds_where)
    out = Path(out_dir)
    ckpt_dir, clip_dir = out / "checkpoints", out / "clips"
    sampler = RankClipSampler(len(clips), rank, world, cfg.seed, clips.source)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
    model = build_bestrq(conformer_config(cfg.preset), cfg.bestrq, cfg.features)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, config=ds,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(cfg.warmup, cfg.steps)))
    device, gas = engine.device, engine.gradient_accumulation_steps()
    logmel = LogMel(cfg.features).to(device)  # fp32, outside the engine: bf16 mode would round its filterbank
    crop_rng = np.random.default_rng([cfg.seed, rank])
    g = torch.Generator().manual_seed(_seed(cfg.seed, rank, 1))  # CPU: the same masks on every device
    run_id = json.loads(json.dumps({**dataclasses.asdict(cfg), "world_size": world,
                                    "gradient_accumulation_steps": gas}))
    curves, log, seen = {k: [] for k in CURVES}, [], {"seen_s": 0.0, "data_s": 0.0, "seconds": 0.0}

    tag = _latest_tag(ckpt_dir)
    resumed_from = None
    if tag is not None:
        state_file = ckpt_dir / tag / f"rank_{rank}.pt"
        state = load_rank_state(state_file, world, ("run", "sampler", "crop_rng", "mask_rng", "curves", "log",
                                                    "seen"))
        check_resume(state["run"], run_id, RESUME_MUTABLE, state_file, rank)
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise TrainError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        sampler.load_state_dict(state["sampler"])
        crop_rng.bit_generator.state = state["crop_rng"]
        g.set_state(state["mask_rng"])
        curves, log, seen = state["curves"], state["log"], state["seen"]
        resumed_from = engine.global_steps
    start = engine.global_steps
    clip_dir.mkdir(parents=True, exist_ok=True)
    clip_log = clip_dir / f"rank_{rank}.jsonl"
    truncate_steps(clip_log, start)  # an interrupted run's later steps are redone

    engine.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"BEST-RQ x{world}",
               disable=rank != 0 or not progress, mininterval=2)
    t_start = time.perf_counter()
    for step in bar:
        # the curves summed over micro-batches, audio seconds, data-loading seconds
        stats = torch.zeros(len(CURVES) + 2, dtype=torch.float64)
        drawn = []
        lr = sched.get_last_lr()[0]  # this step's
        for _ in range(gas):
            t0 = time.perf_counter()
            picks = [sampler.next() for _ in range(cfg.batch_size)]
            drawn += picks
            wave, lengths = pad_waves([clips.load(i, cfg.max_seconds, crop_rng) for _, i in picks])
            stats[-2] += lengths.sum().item() / SAMPLE_RATE
            stats[-1] += time.perf_counter() - t0
            mel, frames = logmel(wave.to(device), lengths.to(device))
            out_ = engine(mel, frames, generator=g)
            if not torch.isfinite(out_["loss"]):
                raise TrainError(f"step {step + 1}: rank {rank}: BEST-RQ loss is {out_['loss'].item()} "
                                 f"(clips {[clips[i].name for _, i in picks][:4]} ...)")
            engine.backward(out_["loss"])
            engine.step()
            stats[: len(CURVES)] += torch.tensor([out_[k].item() for k in CURVES], dtype=torch.float64)
        with open(clip_log, "a") as f:
            f.write(json.dumps({"step": step + 1, "clips": drawn}) + "\n")
        stats = stats.to(device)  # nccl reduces device tensors only
        dist.all_reduce(stats)
        stats = stats.cpu()
        means = (stats[: len(CURVES)] / (gas * world)).tolist()
        for k, v in zip(CURVES, means):
            curves[k].append(round(v, 5))
        seen["seen_s"] += stats[-2].item()
        seen["data_s"] += stats[-1].item() / world  # mean over ranks
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            window = {k: round(float(np.mean(v[-cfg.log_every:])), 4) for k, v in curves.items()}
            log.append({"step": step + 1, **window, "lr": lr})
            if rank == 0:
                bar.set_postfix(loss=f"{window['loss']:.3f}", acc=f"{window['accuracy']:.3f}")
                if progress:
                    tqdm.write(json.dumps(log[-1]), file=sys.stderr)
        if save_every is not None and ((step + 1) % save_every == 0 or step + 1 == cfg.steps):
            seen_now = {**seen, "seconds": seen["seconds"] + time.perf_counter() - t_start}
            _save(engine, ckpt_dir, step + 1, rank, {
                "run": run_id, "sampler": sampler.state_dict(), "crop_rng": crop_rng.bit_generator.state,
                "mask_rng": g.get_state(), "curves": curves, "log": log, "seen": seen_now})
    seen["seconds"] += time.perf_counter() - t_start

    report = build_report(cfg, clips, model, curves, log, clips_seen=cfg.steps * cfg.batch_size * gas * world,
                          seen_s=seen["seen_s"], data_s=seen["data_s"], seconds=seen["seconds"],
                          device=device)
    report.update(world_size=world, gradient_accumulation_steps=gas, deepspeed=ds, resumed_from=resumed_from,
                  clip_logs=[str(clip_dir / f"rank_{r}.jsonl") for r in range(world)])
    if rank == 0:
        # bf16 mode holds the module in bf16: the files get fp32 copies of those values (the master weights
        # are fp32, but the module is what the forward passes used).
        save_run(model.float().eval(), cfg.features, report, out)
    dist.barrier()  # the files are complete before any rank returns
    return report


def _save(engine, ckpt_dir: Path, step: int, rank: int, state: dict) -> None:
    tag = f"step_{step}"
    (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt_dir / tag / f"rank_{rank}.pt")
    dist.barrier()  # every rank's state is on disk before DeepSpeed writes "latest"
    engine.save_checkpoint(str(ckpt_dir), tag=tag)
