"""BEST-RQ pre-training of the speech encoder (Llama 3 sec. 8.1) on audio shards or a folder of audio files.

    python -m scripts.pretrain_speech_encoder (--shards DIR_OR_GLOB | --audio-dir DIR) --out DIR
        [--preset tiny|1B] [--steps N] [--batch-size N] [--lr LR] [--warmup N] [--seed S] [--codebooks K]
        [--codebook-size N] [--max-seconds S] [--device cpu|cuda] [--no-progress]

--shards: a folder of webdataset tars (scripts.build_audio_shards output: key.flac at 16 kHz), one .tar, a
glob or brace pattern (quote it). --audio-dir: every flac / wav / ogg / opus / mp3 file under DIR.
Writes DIR/encoder.safetensors (the Conformer encoder alone, what a speech model loads),
DIR/encoder_config.json, DIR/bestrq.safetensors (encoder + heads + quantizer, to resume) and, last,
DIR/report.json, which is also printed. Options left out keep `speech.pretrain.PretrainConfig`'s defaults
(1B encoder, 16 codebooks of 8,192 codes: the paper's). See speech/pretrain.py.
Exit code 2: missing, empty or unreadable audio, or a bad option value; the message names it.
"""

from __future__ import annotations

import argparse
import json
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
    args = p.parse_args(argv)

    from speech.conformer import conformer_config
    from speech.pretrain import AudioClips, AudioSourceError, PretrainConfig, pretrain_encoder

    top = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "warmup": args.warmup, "seed": args.seed, "max_seconds": args.max_seconds}
    bestrq = {"n_codebooks": args.codebooks, "codebook_size": args.codebook_size}
    try:
        cfg = PretrainConfig(**{k: v for k, v in top.items() if v is not None})
        cfg = replace(cfg, bestrq=replace(cfg.bestrq, **{k: v for k, v in bestrq.items() if v is not None}))
        conformer_config(cfg.preset)  # an unknown preset fails here, not after indexing the audio
        clips = AudioClips.from_shards(args.shards) if args.shards else AudioClips.from_folder(args.audio_dir)
    except ValueError as e:  # a bad option value or preset, or an AudioSourceError
        print(f"pretrain_speech_encoder: {e}", file=sys.stderr)
        return 2
    try:
        report = pretrain_encoder(clips, cfg, args.out, progress=not args.no_progress, device=args.device)
    except AudioSourceError as e:  # a clip that fails to decode mid-run
        print(f"pretrain_speech_encoder: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
