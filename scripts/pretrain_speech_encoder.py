"""BEST-RQ pre-training of the speech encoder (Llama 3 sec. 8.1) on audio shards or a folder of audio files.

    python -m scripts.pretrain_speech_encoder (--shards DIR_OR_GLOB | --audio-dir DIR) --out DIR
        [--preset tiny|1B] [--steps N] [--batch-size N] [--lr LR] [--warmup N] [--seed S] [--codebooks K]
        [--codebook-size N] [--max-seconds S] [--device cpu|cuda] [--no-progress]
        [--deepspeed DS.json] [--save-every N]

    # data parallel (DeepSpeed engine, ZeRO-1), N processes; `deepspeed --module ...` works the same way
    torchrun --nproc_per_node 2 -m scripts.pretrain_speech_encoder --shards shards/ --out runs/encoder \
        --preset tiny --deepspeed configs/deepspeed/speech_pretrain.json --save-every 500

--shards: a folder of webdataset tars (scripts.build_audio_shards output: key.flac at 16 kHz), one .tar, a
glob or brace pattern (quote it). --audio-dir: every flac / wav / ogg / opus / mp3 file under DIR.
Writes DIR/encoder.safetensors (the Conformer encoder alone, what a speech model loads),
DIR/encoder_config.json, DIR/bestrq.safetensors (encoder + heads + quantizer, to resume) and, last,
DIR/report.json, which is also printed. Options left out keep `speech.pretrain.PretrainConfig`'s defaults
(1B encoder, 16 codebooks of 8,192 codes: the paper's). See speech/pretrain.py.

Launched by torchrun / deepspeed (WORLD_SIZE > 1) or given --deepspeed, the run goes through
training.speech_pretrain: --batch-size clips per micro-batch per rank (default: the JSON's
train_micro_batch_size_per_gpu, else PretrainConfig's), the JSON's gradient_accumulation_steps, bf16 /
ZeRO settings, and its gradient_clipping as the clip norm; each rank reads a disjoint share of the clips
per epoch (DIR/clips/rank_R.jsonl lists them). --save-every N writes DeepSpeed checkpoints to
DIR/checkpoints every N steps and at the end; a run whose DIR/checkpoints/latest exists resumes from it.
Rank 0 writes the same files; report.json adds world_size and the resolved DeepSpeed config.
Without a launcher and without --deepspeed the run is the single-process one (--save-every needs
--deepspeed there).
Exit code 2: missing, empty or unreadable audio, or a bad option value or DeepSpeed config / checkpoint;
the message names it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="folder of *.tar shards, a .tar, or a glob / brace pattern")
    src.add_argument("--audio-dir", help="folder of audio files (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default=None, help="Conformer preset: tiny or 1B (default 1B)")
    for flag, kind in (("--steps", int), ("--batch-size", int), ("--lr", float), ("--warmup", int),
                       ("--seed", int), ("--max-seconds", float)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--codebooks", type=int, default=None, help="BEST-RQ codebooks (paper: 16)")
    p.add_argument("--codebook-size", type=int, default=None, help="codes per codebook (paper: 8192)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines on stderr")
    p.add_argument("--deepspeed", default=None, metavar="DS.json",
                   help="train with a DeepSpeed engine configured by this JSON (also alone, one process)")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="DeepSpeed checkpoints every N steps in OUT/checkpoints (distributed path only)")
    # the deepspeed launcher passes --local_rank; the rank itself comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    distributed = args.deepspeed is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1

    from speech.conformer import conformer_config
    from speech.pretrain import AudioClips, AudioSourceError, PretrainConfig, pretrain_encoder

    top = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "warmup": args.warmup, "seed": args.seed, "max_seconds": args.max_seconds}
    bestrq = {"n_codebooks": args.codebooks, "codebook_size": args.codebook_size}
    ds = None
    try:
        if not distributed and args.save_every is not None:
            raise ValueError("--save-every needs --deepspeed or a launcher (torchrun / deepspeed): "
                             "checkpoints are DeepSpeed's")
        if distributed and args.device is not None:
            raise ValueError("--device applies to the single-process path; under --deepspeed or a launcher "
                             "the device is DeepSpeed's (the LOCAL_RANK GPU, else CPU)")
        if args.deepspeed is not None:
            from training.config import load_deepspeed_config

            ds = load_deepspeed_config(args.deepspeed)  # a TrainConfigError (ValueError) names the file
            numbers = (("train_micro_batch_size_per_gpu", (int,)), ("gradient_clipping", (int, float)))
            for key, kinds in numbers:
                if key in ds and (not isinstance(ds[key], kinds) or isinstance(ds[key], bool)):
                    raise ValueError(f"deepspeed: {args.deepspeed}: {key} must be a number, got {ds[key]!r}")
            if top["batch_size"] is None and "train_micro_batch_size_per_gpu" in ds:
                top["batch_size"] = ds["train_micro_batch_size_per_gpu"]
            if "gradient_clipping" in ds:
                top["grad_clip"] = ds["gradient_clipping"]
        cfg = PretrainConfig(**{k: v for k, v in top.items() if v is not None})
        cfg = replace(cfg, bestrq=replace(cfg.bestrq, **{k: v for k, v in bestrq.items() if v is not None}))
        conformer_config(cfg.preset)  # an unknown preset fails here, not after indexing the audio
        clips = AudioClips.from_shards(args.shards) if args.shards else AudioClips.from_folder(args.audio_dir)
    except ValueError as e:  # a bad option value or preset, or an AudioSourceError
        print(f"pretrain_speech_encoder: {e}", file=sys.stderr)
        return 2
    if distributed:
        return _run_distributed(clips, cfg, args, ds)
    try:
        report = pretrain_encoder(clips, cfg, args.out, progress=not args.no_progress, device=args.device)
    except AudioSourceError as e:  # a clip that fails to decode mid-run
        print(f"pretrain_speech_encoder: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


def _run_distributed(clips, cfg, args, ds: dict | None) -> int:
    import torch.distributed as dist

    from speech.pretrain import AudioSourceError
    from training.config import TrainConfigError
    from training.speech_pretrain import pretrain_distributed
    from training.trainer import TrainError

    try:
        report = pretrain_distributed(clips, cfg, args.out, ds, save_every=args.save_every,
                                      progress=not args.no_progress,
                                      ds_where=args.deepspeed or "default DeepSpeed config")
    except (AudioSourceError, TrainConfigError, TrainError) as e:
        rank = f" (rank {dist.get_rank()})" if dist.is_initialized() else ""
        print(f"pretrain_speech_encoder{rank}: {e}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
