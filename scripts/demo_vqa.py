"""Ask a question about an image; the answer streams to stdout.

    python -m scripts.demo_vqa --image PATH --question TEXT (--checkpoint DIR [--lm DIR] | --mllama DIR)
        [--tokenizer tokenizer.model] [--max-new-tokens 64] [--temperature 0] [--top-p 0.9]

--checkpoint: a directory written by our training (config.json + model.safetensors + tokenizer.model).
--lm:         the frozen LM of an export that does not hold it, when it is neither at the absolute path
              nor at the relative path the export recorded; it must match the export's fingerprint.
--mllama:     a Hugging Face Llama 3.2 Vision (Mllama) directory or Meta's Llama 3.2 Vision layout; the
              tiktoken ``tokenizer.model`` is looked up in DIR and DIR/original unless --tokenizer is given.

Bad arguments (--max-new-tokens < 1 or more than the model's context holds, --temperature < 0, --top-p
outside (0, 1]) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adapters.chat import Message, encode_dialog
from adapters.checkpoint import CheckpointError
from adapters.generation import GenerationLengthError, SamplingConfig, check_length, generate, stream_text
from adapters.multimodal import ImageBatch
from adapters.tokenizer import Tokenizer, TokenizerError
from vision.image_io import ImageLoadError, load_image
from vision.tiling import TilingConfig, collate_tiled, tile_image


def find_tokenizer(model_dir: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    for cand in (model_dir / "tokenizer.model", model_dir / "original" / "tokenizer.model"):
        if cand.exists():
            return cand
    raise TokenizerError(f"{model_dir}: no tokenizer.model (tried DIR and DIR/original); pass --tokenizer")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a bad value is one usage line and exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def temperature(text: str) -> float:
    """argparse type: a sampling temperature, >= 0 (0 = greedy)."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {text}")
    return value


def top_p(text: str) -> float:
    """argparse type: a nucleus mass in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The generation flags every image/video demo takes, validated by argparse."""
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=temperature, default=0.0)
    p.add_argument("--top-p", type=top_p, default=0.9)
    p.add_argument("--seed", type=int, default=None)


def load_model(args):
    if args.checkpoint:
        from adapters.model_io import load_checkpoint

        return load_checkpoint(args.checkpoint, lm_path=args.lm), Path(args.checkpoint)
    from adapters.model_io import load_multimodal_checkpoint

    return load_multimodal_checkpoint(args.mllama), Path(args.mllama)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our checkpoint directory")
    src.add_argument("--mllama", help="HF Mllama or Meta Llama 3.2 Vision directory")
    p.add_argument("--lm", default=None, help="the frozen LM of an export without it (with --checkpoint)")
    p.add_argument("--tokenizer", default=None)
    add_sampling_args(p)
    args = p.parse_args(argv)
    if args.lm is not None and not args.checkpoint:
        p.error("--lm goes with --checkpoint (an HF or Meta directory holds its LM)")

    try:
        model, model_dir = load_model(args)
        tok = Tokenizer(find_tokenizer(model_dir, args.tokenizer))
        image = load_image(args.image)
    except (CheckpointError, TokenizerError, ImageLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    vcfg = model.cfg.vision
    tiled = tile_image(image, TilingConfig(tile_size=vcfg.tile_size, max_tiles=vcfg.max_tiles))
    images = ImageBatch.from_collated(collate_tiled([[tiled]]))
    return stream_answer(model, tok, Message("user", args.question, n_images=1), args, images=images)


def stream_answer(model, tok: Tokenizer, message: Message, args, images=None, videos=None) -> int:
    """Generate the answer to one user message and print it as it comes (sampling from ``args``).
    Returns the exit status: 2, with one line on stderr, when the answer cannot fit the context."""
    prompt = torch.tensor([encode_dialog(tok, [message])])
    try:
        check_length(prompt.shape[1], args.max_new_tokens, model.cfg.lm.max_seq_len)
    except GenerationLengthError as e:
        print(f"error: --max-new-tokens: {e}", file=sys.stderr)
        return 2
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    ids = (int(t[0]) for t in generate(model, prompt, images, sampling, tok.stop_ids, videos=videos))
    for piece in stream_text(tok, ids, tok.stop_ids):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
