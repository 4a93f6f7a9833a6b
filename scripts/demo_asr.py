"""Transcribe (ASR) or translate (AST) an audio file; the text streams to stdout.

    python -m scripts.demo_asr --checkpoint DIR --audio PATH [--task asr|ast] [--language English]
        [--max-new-tokens 64] [--chunk-seconds 60]

--checkpoint:    a directory written by our speech training (config.json + model.safetensors +
                 tokenizer.model, see speech.asr.save_speech_checkpoint); --tokenizer overrides the
                 tokenizer.model looked up there.
--audio:         wav / flac / ogg, any rate and channel count: mixed to mono and resampled to 16 kHz.
--task:          asr: "Repeat after me in {language}:" (language = the spoken language);
                 ast: "Translate the audio into {language}:" (language = the target language).
                 The system prompt is the only difference (sec. 8.1).
--chunk-seconds: audio longer than this (default 60 s, the paper's longest segment) is cut into
                 consecutive pieces, each decoded on its own; their texts are joined by spaces.

Decoding is greedy. A line on stderr describes the audio: duration, source rate and channels, pieces,
and whether it is silent or clipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adapters.checkpoint import CheckpointError
from adapters.generation import stream_text
from adapters.tokenizer import Tokenizer, TokenizerError
from scripts.demo_vqa import find_tokenizer
from speech.adapter import SpeechLlama, asr_prompt, ast_prompt, encode_speech_dialog, speech_decode
from speech.asr import load_speech_checkpoint
from speech.audio import MAX_SECONDS, Audio, AudioReadError, chunk_audio, load_audio

PROMPTS = {"asr": asr_prompt, "ast": ast_prompt}


def describe(audio: Audio, name: str, pieces: int) -> str:
    notes = [f"{pieces} pieces of at most the chunk length"] if pieces > 1 else []
    if audio.is_silent:
        notes.append(f"silent ({audio.rms_db:.0f} dBFS): expect an empty or made-up transcript")
    if audio.clipped_fraction > 0.001:
        notes.append(f"{audio.clipped_fraction:.1%} of samples clipped")
    return (f"{name}: {audio.duration_s:.2f} s, read at {audio.source_rate} Hz x {audio.source_channels} "
            f"channel(s)" + "".join(f"; {n}" for n in notes))


def stream_transcript(model: SpeechLlama, tok: Tokenizer, prompt: list[int], piece: Audio,
                      max_new_tokens: int) -> None:
    """Decode one piece and print its text as it comes."""
    waves = torch.from_numpy(piece.samples)[None]
    ids = (int(t[0]) for t in speech_decode(model, torch.tensor([prompt]), waves, torch.tensor([waves.shape[1]]),
                                            max_new_tokens))
    for text in stream_text(tok, ids, tok.stop_ids):
        print(text, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio", required=True)
    p.add_argument("--checkpoint", required=True, help="our speech checkpoint directory")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--task", choices=sorted(PROMPTS), default="asr")
    p.add_argument("--language", default="English")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chunk-seconds", type=float, default=MAX_SECONDS)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.chunk_seconds > 0:
        p.error(f"--chunk-seconds must be > 0, got {args.chunk_seconds:g}")

    model_dir = Path(args.checkpoint)
    try:
        model = load_speech_checkpoint(model_dir)
        tok = Tokenizer(find_tokenizer(model_dir, args.tokenizer))
        audio = load_audio(args.audio, max_seconds=None)
    except (CheckpointError, TokenizerError, AudioReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pieces = chunk_audio(audio, args.chunk_seconds)
    print(describe(audio, args.audio, len(pieces)), file=sys.stderr)
    prompt = encode_speech_dialog(tok, PROMPTS[args.task](args.language))
    for i, piece in enumerate(pieces):
        if i:
            print(" ", end="")
        stream_transcript(model, tok, prompt, piece, args.max_new_tokens)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
