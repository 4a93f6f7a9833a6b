"""Write an image-adapter export (and its LM) as a Hugging Face ``MllamaForConditionalGeneration`` checkpoint.

    python -m scripts.export_hf EXPORT OUT [--dtype bf16|fp32] [--max-shard-size 5GB] [--lm PATH]

EXPORT:  our image model export (``adapters.model_io``); one without its LM finds it as the demos do, or --lm.
OUT:     a new or empty directory: config.json, safetensors (an index past --max-shard-size),
         generation_config.json, preprocessor_config.json and, when EXPORT has tokenizer.model,
         tokenizer.json + tokenizer_config.json (`adapters.mllama_export`). Load it with
         ``MllamaForConditionalGeneration.from_pretrained(OUT)`` (transformers 4.45 .. 4.54) or our demos' --mllama.
--dtype: of the written weights (default: the export's own).

A model Mllama cannot hold (video adapter, reward head, vision attention biases, another cross-attention
schedule...), a speech export, a used OUT and bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from common.config import CheckpointError
from common.export import TOKENIZER, ExportFormatError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"export_hf: {message}\n")


def _size(text: str) -> str:
    from adapters.mllama_export import parse_size

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m scripts.export_hf", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", metavar="EXPORT", help="our image model export")
    p.add_argument("out", metavar="OUT", help="new or empty directory for the HF Mllama checkpoint")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="of the written weights (default: as stored)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="per safetensors file (default 5GB)")
    p.add_argument("--lm", default=None, help="the frozen LM of an export that does not hold it")
    args = p.parse_args(argv)  # --help exits 0, a bad argument 2 with one line (argparse's SystemExit)

    from adapters.mllama_export import HFExportWarning, check_out_dir, save_mllama_hf
    from adapters.model_io import load_checkpoint

    export = Path(args.export)
    tokenizer = export / TOKENIZER
    try:
        check_out_dir(args.out)  # before the model is read
        try:
            model = load_checkpoint(export, DTYPES.get(args.dtype), lm_path=args.lm).eval()
        except ExportFormatError as e:
            if e.found_kind in ("speech", "speech-encoder"):
                raise CheckpointError(f"{export}: a {e.found_kind} export; Mllama has no speech part") from None
            raise
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HFExportWarning)
            out = save_mllama_hf(model, args.out, tokenizer if tokenizer.is_file() else None,
                                 max_shard_size=args.max_shard_size)
    except CheckpointError as e:  # HFExportError, ExportFormatError, LMMismatchError
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"export_hf: warning: {w.message}", file=sys.stderr)
    note = "" if tokenizer.is_file() else f" (no {TOKENIZER} in {export}: no tokenizer files written)"
    print(f"export_hf: wrote {export} as an HF Mllama checkpoint to {out}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
