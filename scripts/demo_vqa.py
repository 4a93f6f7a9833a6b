"""Ask a question about an image; the answer streams to stdout. Or answer a file of questions.

    python -m scripts.demo_vqa --image PATH --question TEXT (--checkpoint DIR [--lm DIR] | --mllama DIR)
        [--tokenizer tokenizer.model] [--max-new-tokens 64] [--temperature 0] [--top-p 0.9] [--top-k 0]
    python -m scripts.demo_vqa --questions FILE.jsonl --out PREDICTIONS.jsonl (--checkpoint DIR | ...) [...]

--checkpoint: a directory written by our training (config.json + model.safetensors + tokenizer.model).
--lm:         the frozen LM of an export that does not hold it, when it is neither at the absolute path
              nor at the relative path the export recorded; it must match the export's fingerprint.
--mllama:     a Hugging Face Llama 3.2 Vision (Mllama) directory or Meta's Llama 3.2 Vision layout; the
              tiktoken ``tokenizer.model`` is looked up in DIR and DIR/original unless --tokenizer is given.

--questions:  batch mode: JSONL rows {"id", "image": path relative to the file's folder, "question", "kind"};
              every row is answered exactly as --image/--question would answer it (the model loads once) and
              {"id", "answer"} lines are written to --out, in input order, renamed into place at the end
              (see scripts._batch). Progress and a summary go to stderr.

Bad arguments (--max-new-tokens < 1 or more than the model's context holds, --temperature < 0, --top-p
outside (0, 1]), another modality's export, and in batch mode a malformed row, a duplicate id or a missing
image print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from adapters.chat import Message, encode_dialog
from adapters.checkpoint import CheckpointError
from adapters.generation import GenerationLengthError, SamplingConfig, check_length, stream
from adapters.multimodal import ImageBatch, MultimodalLlama
from adapters.tokenizer import Tokenizer, TokenizerError
from common.export import ExportFormatError, export_format
from media.image import ImageLoadError, load_image
from scripts._batch import (BatchInputError, add_batch_args, check_batch_args, read_questions,
                            write_predictions)
from vision.tiling import TiledImage, TilingConfig, collate_tiled, tile_image


def find_tokenizer(model_dir: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    for cand in (model_dir / "tokenizer.model", model_dir / "original" / "tokenizer.model"):
        if cand.exists():
            return cand
    raise TokenizerError(f"{model_dir}: no tokenizer.model (tried DIR and DIR/original); pass --tokenizer")


def _int(text: str, low: int, hint: str = "") -> int:
    """``text`` as an int >= ``low``, else an argparse error (one usage line and exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}{hint}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int(text, 1)


def top_k(text: str) -> int:
    """argparse type: how many most likely tokens sampling keeps, >= 0 (0 = all)."""
    return _int(text, 0, " (0 = off)")


def number(text: str, ok: Callable[[float], bool], rule: str, what: str = "a number") -> float:
    """``text`` as a float for which ``ok`` holds, else an argparse error naming ``rule``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def temperature(text: str) -> float:
    """argparse type: a sampling temperature, >= 0 (0 = greedy)."""
    return number(text, lambda v: v >= 0, ">= 0 (0 = greedy)")


def top_p(text: str) -> float:
    """argparse type: a nucleus mass in (0, 1]."""
    return number(text, lambda v: 0 < v <= 1, "in (0, 1]")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The generation flags every image/video demo takes, validated by argparse."""
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=temperature, default=0.0)
    p.add_argument("--top-p", type=top_p, default=0.9)
    p.add_argument("--top-k", type=top_k, default=0, help="keep the K most likely tokens when sampling (0 = off)")
    p.add_argument("--seed", type=int, default=None)


# What each export kind (`common.export.KINDS`) holds and which tool takes it.
EXPORT_USES = {
    "multimodal": "an image/video model: ask with scripts.demo_vqa or scripts.demo_video",
    "speech": "a speech model: transcribe with scripts.demo_asr",
    "speech-encoder": "a pre-trained speech encoder without an LM: train a speech adapter on it first "
                      "(scripts.train_speech_adapter)",
    "clip-encoder": "a pre-trained vision encoder without an LM: train an image adapter on it first "
                    "(model.encoder_from of scripts.train_image_adapter)"}


def modality_error(e: ExportFormatError, model_dir: Path, want: str) -> CheckpointError:
    """``e`` reworded when ``model_dir`` is another modality's export than ``want`` ("image/video" or
    "speech"): what the export is and which demo takes it. Any other problem is left as the loader said."""
    if e.found_kind is None:
        return e
    return CheckpointError(f"{model_dir}: this demo answers with {want} models, and this export (format "
                           f"{export_format(e.found_kind)!r}) is {EXPORT_USES[e.found_kind]}")


def load_export(path: str | Path, lm: str | Path | None) -> MultimodalLlama:
    """Our image/video export at ``path`` (``lm``: --lm), in eval mode; `CheckpointError` when it cannot be
    used, naming the modality when it is another one's."""
    from adapters.model_io import load_checkpoint

    try:
        return load_checkpoint(path, lm_path=lm).eval()
    except ExportFormatError as e:
        raise modality_error(e, Path(path), "image/video") from None


def load_model(args) -> tuple[MultimodalLlama, Path]:
    """The model of --checkpoint (our export) or --mllama, and its directory."""
    if args.checkpoint:
        return load_export(args.checkpoint, args.lm), Path(args.checkpoint)
    from adapters.model_io import load_multimodal_checkpoint

    return load_multimodal_checkpoint(args.mllama).eval(), Path(args.mllama)


def image_input(model: MultimodalLlama, path: str | Path, padded: bool) -> ImageBatch:
    """One image, tiled for ``model``'s vision encoder; `ImageLoadError` when it cannot be read.

    ``padded``: keep every tile slot (``max_tiles``), as released Mllama weights were trained (their real
    tiles attend to the padding tiles in the encoder). Our own exports were trained on trimmed batches
    (`training.data`), where a one-tile image is one tile: asking them with padding slots changes what the
    encoder sees (on the synthetic road, 0.66 held-out accuracy instead of 1.0 for the same weights)."""
    batch = ImageBatch.from_collated(collate_tiled([[tiled_image(model, path)]]))
    return batch if padded else batch.trimmed()


def tiled_image(model: MultimodalLlama, path: str | Path) -> TiledImage:
    """The image at ``path`` tiled for ``model``'s vision encoder; `ImageLoadError` when it cannot be read."""
    vcfg = model.cfg.vision
    return tile_image(load_image(path), TilingConfig(tile_size=vcfg.tile_size, max_tiles=vcfg.max_tiles))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(p, "image")
    p.add_argument("--question", default=None, help="with --image: the question")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our checkpoint directory")
    src.add_argument("--mllama", help="HF Mllama or Meta Llama 3.2 Vision directory")
    p.add_argument("--lm", default=None, help="the frozen LM of an export without it (with --checkpoint)")
    p.add_argument("--tokenizer", default=None)
    add_sampling_args(p)
    args = p.parse_args(argv)
    check_batch_args(p, args, single_only=("--question",))
    if args.image is not None and args.question is None:
        p.error("--image needs --question")
    if args.lm is not None and not args.checkpoint:
        p.error("--lm goes with --checkpoint (an HF or Meta directory holds its LM)")

    try:
        rows = read_questions(args.questions, "image") if args.questions else None
        model, model_dir = load_model(args)
        tok = Tokenizer(find_tokenizer(model_dir, args.tokenizer))
        if rows is None:
            pieces = ask(model, tok, args, args.question, args.image)
    except (BatchInputError, CheckpointError, TokenizerError, ImageLoadError, GenerationLengthError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rows is None:
        return print_stream(pieces)
    return write_predictions(rows, lambda row: "".join(ask(model, tok, args, row.question, row.media)),
                             args.out, (ImageLoadError, GenerationLengthError), "demo_vqa")


def ask(model: MultimodalLlama, tok: Tokenizer, args, question: str, image: str | Path) -> Iterator[str]:
    """The answer about one image file, as text pieces (`answer_pieces`): both modes come through here."""
    message = Message("user", question, n_images=1)
    images = image_input(model, image, padded=args.mllama is not None)
    return answer_pieces(model, tok, message, args, images=images)


def answer_pieces(model, tok: Tokenizer, message: Message | list[Message], args, images=None,
                  videos=None) -> Iterator[str]:
    """The answer to one user message (or to the last of a conversation's messages, each with its media
    placeholders) as text pieces, as they are generated (sampling from ``args``).
    `GenerationLengthError` (raised before any decoding) when the answer cannot fit the context."""
    prompt = torch.tensor([encode_dialog(tok, [message] if isinstance(message, Message) else message)])
    try:
        check_length(prompt.shape[1], args.max_new_tokens, model.cfg.lm.max_seq_len)
    except GenerationLengthError as e:
        raise GenerationLengthError(f"--max-new-tokens: {e}") from None
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.top_k)
    return (pieces[0] for pieces in stream(model, tok, prompt, sampling, images, videos) if pieces[0])


def print_stream(pieces: Iterable[str]) -> int:
    """Print text pieces as they come, then a newline; the exit status (0)."""
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
