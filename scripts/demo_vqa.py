"""Ask a question about an image; the answer streams to stdout.

    python -m scripts.demo_vqa --image PATH --question TEXT (--checkpoint DIR | --mllama DIR)
        [--tokenizer tokenizer.model] [--max-new-tokens 64] [--temperature 0] [--top-p 0.9]

--checkpoint: a directory written by our training (config.json + model.safetensors + tokenizer.model).
--mllama:     a Hugging Face Llama 3.2 Vision (Mllama) directory or Meta's Llama 3.2 Vision layout; the
              tiktoken ``tokenizer.model`` is looked up in DIR and DIR/original unless --tokenizer is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from adapters.chat import Message, encode_dialog
from adapters.checkpoint import CheckpointError
from adapters.generation import SamplingConfig, generate, stream_text
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


def load_model(args):
    if args.checkpoint:
        from adapters.model_io import load_checkpoint

        return load_checkpoint(args.checkpoint), Path(args.checkpoint)
    from adapters.model_io import load_multimodal_checkpoint

    return load_multimodal_checkpoint(args.mllama), Path(args.mllama)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our checkpoint directory")
    src.add_argument("--mllama", help="HF Mllama or Meta Llama 3.2 Vision directory")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

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
    stream_answer(model, tok, Message("user", args.question, n_images=1), args, images=images)
    return 0


def stream_answer(model, tok: Tokenizer, message: Message, args, images=None, videos=None) -> None:
    """Generate the answer to one user message and print it as it comes (sampling from ``args``)."""
    prompt = torch.tensor([encode_dialog(tok, [message])])
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    ids = (int(t[0]) for t in generate(model, prompt, images, sampling, tok.stop_ids, videos=videos))
    for piece in stream_text(tok, ids, tok.stop_ids):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    raise SystemExit(main())
