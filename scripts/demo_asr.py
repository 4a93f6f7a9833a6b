"""Transcribe (ASR) or translate (AST) an audio file; the text streams to stdout. Or a file of them.

    python -m scripts.demo_asr --checkpoint DIR --audio PATH [--task asr|ast] [--language English]
        [--max-new-tokens 64] [--chunk-seconds 60]
    python -m scripts.demo_asr --checkpoint DIR --questions FILE.jsonl --out PREDICTIONS.jsonl [...]

--checkpoint:    a directory written by our speech training (config.json + model.safetensors +
                 tokenizer.model, see speech.model_io.save_speech_checkpoint); --tokenizer overrides the
                 tokenizer.model looked up there.
--audio:         wav / flac / ogg, any rate and channel count: mixed to mono and resampled to 16 kHz.
--task:          asr: "Repeat after me in {language}:" (language = the spoken language);
                 ast: "Translate the audio into {language}:" (language = the target language).
                 The system prompt is the only difference (sec. 8.1).
--chunk-seconds: audio longer than this (default 60 s, the paper's longest segment) is cut into
                 consecutive pieces, each decoded on its own; their texts are joined by spaces. Pieces
                 are shortened further to what the checkpoint's context holds (its max_seq_len, less the
                 prompt and --max-new-tokens): a 46 s clip with a 512-position model is split, not refused.
--questions:     batch mode: JSONL rows {"id", "audio": path relative to the file's folder, "kind"} (no
                 question: the prompt is --task's), each transcribed exactly as --audio would be (the model
                 loads once); {"id", "answer": transcript} lines go to --out, in input order, renamed into
                 place at the end (see scripts._batch).

Bad arguments (--max-new-tokens < 1 or leaving no room for audio, --chunk-seconds under one sample) print
one line and exit with status 2.

Decoding is greedy. A line on stderr describes the audio: duration, source rate and channels, pieces,
and whether it is silent or clipped (single mode; batch mode shows progress and a summary instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from adapters.checkpoint import CheckpointError
from adapters.generation import SamplingConfig, stream_text
from adapters.tokenizer import Tokenizer, TokenizerError
from common.export import ExportFormatError
from media.audio import MAX_SECONDS, SAMPLE_RATE, Audio, AudioReadError, chunk_audio, load_audio
from scripts._batch import (BatchInputError, add_batch_args, check_batch_args, read_questions,
                            write_predictions)
from scripts.demo_vqa import find_tokenizer, modality_error, positive_int, print_stream
from speech.adapter import (SpeechLlama, SpeechLlamaConfig, asr_prompt, ast_prompt, encode_speech_dialog,
                            speech_decode)
from speech.model_io import load_speech_checkpoint

PROMPTS = {"asr": asr_prompt, "ast": ast_prompt}


def chunk_seconds(text: str) -> float:
    """argparse type: a chunk length of at least one 16 kHz sample."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value * SAMPLE_RATE >= 1:
        raise argparse.ArgumentTypeError(f"must be at least one sample (1/{SAMPLE_RATE} s), got {text}")
    return value


def audio_positions(cfg: SpeechLlamaConfig, n_samples: int) -> int:
    """LM positions a clip of ``n_samples`` 16 kHz samples takes: mel frames -> stacked encoder frames ->
    strided adapter outputs (the chain of `SpeechLlama.encode_audio`)."""
    frames = cfg.features.num_frames(n_samples)
    enc = -(-frames // cfg.encoder.stack)
    return int(cfg.adapter.out_lengths(torch.tensor([enc]))[0])


def max_piece_samples(cfg: SpeechLlamaConfig, prompt_len: int, max_new_tokens: int, longest: int) -> int:
    """The most samples (<= ``longest``) whose spliced row plus ``max_new_tokens`` fits the checkpoint's
    context: prompt_len - 1 (the placeholder is replaced) + audio positions + max_new_tokens <= seq_limit.
    0 when not even one sample fits. Binary search: positions grow with the length."""
    room = cfg.seq_limit - (prompt_len - 1) - max_new_tokens
    lo, hi = 0, longest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if audio_positions(cfg, mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def describe(audio: Audio, name: str, pieces: int, piece_s: float) -> str:
    notes = [f"{pieces} pieces of at most {piece_s:.2f} s"] if pieces > 1 else []
    if audio.is_silent:
        notes.append(f"silent ({audio.rms_db:.0f} dBFS): expect an empty or made-up transcript")
    if audio.clipped_fraction > 0.001:
        notes.append(f"{audio.clipped_fraction:.1%} of samples clipped")
    return (f"{name}: {audio.duration_s:.2f} s, read at {audio.source_rate} Hz x {audio.source_channels} "
            f"channel(s)" + "".join(f"; {n}" for n in notes))


def piece_texts(model: SpeechLlama, tok: Tokenizer, prompt: list[int], piece: Audio,
                max_new_tokens: int) -> Iterator[str]:
    """One piece's transcript as text pieces, greedy, as they are decoded."""
    waves = torch.from_numpy(piece.samples)[None]
    steps = speech_decode(model, torch.tensor([prompt]), waves, torch.tensor([waves.shape[1]]),
                          SamplingConfig(max_new_tokens=max_new_tokens), tok.stop_ids)
    ids = (int(t[0]) for t in steps)
    return stream_text(tok, ids, tok.stop_ids)


def transcript(model: SpeechLlama, tok: Tokenizer, prompt: list[int], pieces: list[Audio],
               max_new_tokens: int) -> Iterator[str]:
    """The pieces' transcripts as text pieces, joined by spaces: both modes come through here."""
    for i, piece in enumerate(pieces):
        if i:
            yield " "
        yield from piece_texts(model, tok, prompt, piece, max_new_tokens)


def read_pieces(path: str | Path, piece_samples: int) -> tuple[Audio, list[Audio]]:
    """The whole audio file at ``path`` (at `SAMPLE_RATE`) and its consecutive pieces of at most
    ``piece_samples``; `AudioReadError` when it cannot be read."""
    audio = load_audio(path, max_seconds=None)
    return audio, chunk_audio(audio, piece_samples / SAMPLE_RATE)


def load_speech_model(model_dir: Path) -> SpeechLlama:
    """Our speech export; `CheckpointError` when it cannot be used, naming the modality of another one's."""
    try:
        return load_speech_checkpoint(model_dir)
    except ExportFormatError as e:
        raise modality_error(e, model_dir, "speech") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(p, "audio")
    p.add_argument("--checkpoint", required=True, help="our speech checkpoint directory")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--task", choices=sorted(PROMPTS), default="asr")
    p.add_argument("--language", default="English")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--chunk-seconds", type=chunk_seconds, default=MAX_SECONDS)
    args = p.parse_args(argv)
    check_batch_args(p, args)

    model_dir = Path(args.checkpoint)
    try:
        rows = read_questions(args.questions, "audio") if args.questions else None
        model = load_speech_model(model_dir)
        tok = Tokenizer(find_tokenizer(model_dir, args.tokenizer))
    except (BatchInputError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt = encode_speech_dialog(tok, PROMPTS[args.task](args.language))
    # load_audio resamples to SAMPLE_RATE: the piece length is known before any file is read.
    piece_samples = max_piece_samples(model.cfg, len(prompt), args.max_new_tokens,
                                      round(args.chunk_seconds * SAMPLE_RATE))
    if piece_samples < 1:
        print(f"error: --max-new-tokens {args.max_new_tokens} leaves no room for audio: the checkpoint holds "
              f"{model.cfg.seq_limit} positions and the prompt takes {len(prompt)}", file=sys.stderr)
        return 2

    if rows is not None:
        return write_predictions(
            rows, lambda row: "".join(transcript(model, tok, prompt, read_pieces(row.media, piece_samples)[1],
                                                 args.max_new_tokens)),
            args.out, (AudioReadError,), "demo_asr")
    try:
        audio, pieces = read_pieces(args.audio, piece_samples)
    except AudioReadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(audio, args.audio, len(pieces), piece_samples / SAMPLE_RATE), file=sys.stderr)
    return print_stream(transcript(model, tok, prompt, pieces, args.max_new_tokens))


if __name__ == "__main__":
    raise SystemExit(main())
