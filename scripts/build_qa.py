"""Question-answer conversation shards from the captions and OCR text of image shards (the annealing set's QA).

    python -m scripts.build_qa SHARDS_OR_FOLDER OUT [--generator templates|EXPORT_OR_LLAMA_DIR] [--per-sample K]
        [--seed S] [--max-new-tokens N] [--config CURATION_YAML] [--json]

SHARDS_OR_FOLDER: image shards written by scripts.build_shards (a folder holding *.tar, a .tar, or a pattern of
them: key.jpg + key.txt caption + key.json, whose ``ocr_text`` the OCR stage writes), or a folder of images with
sidecars (x.jpg + x.txt, or x.json with "caption" and / or "ocr_text") as build_shards reads it. Each image with a
caption or OCR text becomes one sample in OUT/raw (data_curation/qa_text.py): the image and a sidecar
NNNNNN.json {"caption", "conversations": "<|image|>" + question -> answer, up to K turns, "generator",
"qa_kinds", "source_key"}, the folder input of scripts.build_shards, which curates OUT/raw into OUT/shards
with --config (default configs/curation_rendered.yaml). The shards' key.json meta.generator records who wrote
the pairs: "templates" (describe, read the text, first word, noun yes / no; same seed, same bytes) or the
--generator path: our export (adapters.model_io) or a Meta / HF Llama 3 directory (adapters.checkpoint), asked
in the Llama 3 chat format for "Q: ... A: ..." lines, greedy, up to --max-new-tokens (default 128).

Writes OUT/build_status.jsonl (one row per input: id, key, source, generator, status ok|error, reason: the
reader's (unreadable file, text that is not UTF-8), no caption and no OCR text, a model output without a
"Q: ... A: ..." pair, a prompt too long for the model), OUT/preview.png (the first samples, their first pair
as titles) and OUT/report.json, last: ok + errors == inputs, and the shard build's kept + dropped + error ==
ok. A rerun with the same arguments resumes (sample writing is skipped once OUT/render.json exists; the shard
build resumes itself); other arguments over the same OUT are refused.
Exit code 2, with one line: bad arguments, a missing or unreadable input, a model that cannot be loaded, an OUT
holding another build, or a shard build error (scripts.build_shards names it).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from scripts import _rendered

PREVIEW_SAMPLES = 6
DEFAULT_MAX_NEW_TOKENS = 128


def _parser() -> argparse.ArgumentParser:
    p = _rendered.OneLineParser(prog="python -m scripts.build_qa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="SHARDS_OR_FOLDER")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--generator", default="templates",
                   help="'templates', or an export / Llama 3 directory to ask (default templates)")
    p.add_argument("--per-sample", type=_rendered.whole(1), default=4, help="question-answer turns per image "
                   "(at most; default 4)")
    p.add_argument("--seed", type=_rendered.whole(0), default=0, help="same seed, same samples (default 0)")
    p.add_argument("--max-new-tokens", type=_rendered.whole(1), default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"an LLM generator's output length (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--config", default=str(_rendered.DEFAULT_CONFIG), help="the shard build's curation YAML")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    return p


def load_generator(path: str | Path, max_new_tokens: int) -> Callable[[list[dict[str, str]]], str]:
    """The model-facing part: the LM of our export or of a Meta / HF Llama 3 directory -> ``complete(messages)``,
    the greedy answer to the chat in the Llama 3 format. A text-only prompt through our export is its frozen LM
    alone (no image: every cross-attention layer is skipped), so both take the same decoding loop. A model that
    cannot be loaded: `RenderedBuildError`; a prompt too long for it: that sample's `QATextError`."""
    import torch

    from adapters.chat import Message, encode_dialog
    from adapters.checkpoint import CheckpointError, load_llama
    from adapters.generation import GenerationLengthError, SamplingConfig, check_length, collect_ids, decode
    from adapters.model_io import load_checkpoint
    from adapters.tokenizer import Tokenizer, TokenizerError
    from common.export import PREFIX, ExportFormatError
    from data_curation.qa_text import QATextError
    from scripts.demo_vqa import find_tokenizer

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        ours = str(config.get("format", "")).startswith(f"{PREFIX}/")
        lm = load_checkpoint(path).lm if ours else load_llama(path)
        tok = Tokenizer(find_tokenizer(path, None))
    except (CheckpointError, ExportFormatError, TokenizerError, OSError, ValueError) as e:
        raise _rendered.RenderedBuildError(f"cannot load --generator {path}: {e}") from None
    lm.eval()
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)  # temperature 0: greedy

    @torch.inference_mode()
    def complete(messages: list[dict[str, str]]) -> str:
        ids = encode_dialog(tok, [Message(m["role"], m["content"]) for m in messages])
        try:
            check_length(len(ids), max_new_tokens, lm.cfg.max_seq_len)
        except GenerationLengthError as e:
            raise QATextError(str(e)) from None
        cache = lm.new_cache(1, len(ids) + max_new_tokens)
        logits = lm(torch.tensor([ids]), cache=cache)[:, -1]
        steps = decode(logits, lambda nxt, i: lm(nxt[:, None], start_pos=len(ids) + i, cache=cache)[:, -1],
                       sampling, tok.stop_ids)
        return tok.decode(collect_ids(steps, tok.stop_ids)[0])

    return complete


def write_raw(out: Path, spec: str, generator: str, per_sample: int, seed: int, max_new_tokens: int) -> list[dict]:
    """Every sample into ``out/raw`` (image + sidecar) -> one status row per input."""
    from data_curation.input_files import CurationInputError
    from data_curation.qa_text import TEMPLATES, qa_samples

    complete = None if generator == TEMPLATES else load_generator(generator, max_new_tokens)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for row, sample in qa_samples(spec, generator, per_sample, seed, complete):
            rows.append(row)
            if sample is None:
                continue
            (raw / f"{row['id']}{sample.text.ext}").write_bytes(sample.text.image)
            (raw / f"{row['id']}.json").write_text(json.dumps(sample.sidecar()) + "\n")
    except CurationInputError as e:
        raise _rendered.RenderedBuildError(str(e)) from None
    return rows


def _preview(out: Path, rows: list[dict]) -> str | None:
    from synthetic.charts import short_target

    cells = []
    for r in [r for r in rows if r["status"] == "ok"][:PREVIEW_SAMPLES]:
        image = next(p for p in (out / "raw").glob(f"{r['id']}.*") if p.suffix != ".json")
        turns = json.loads((out / "raw" / f"{r['id']}.json").read_text())["conversations"]
        cells.append((image.read_bytes(), short_target(f"{turns[0]['content'].replace('<|image|>', '')} "
                                                       f"{turns[1]['content']}", 40)))
    return _rendered.write_preview(out, [cells])


def build(spec: str, out: Path, generator: str, per_sample: int, seed: int, max_new_tokens: int, config: str,
          quiet: bool) -> dict | int:
    """Write the samples (or resume), curate, preview, report -> the report, or build_shards' exit code."""
    settings = {"input": str(Path(spec).resolve()), "generator": generator, "per_sample": per_sample, "seed": seed,
                "max_new_tokens": max_new_tokens}
    rows = _rendered.render_or_resume(out, settings,
                                      lambda: write_raw(out, spec, generator, per_sample, seed, max_new_tokens))
    ok = sum(r["status"] == "ok" for r in rows)
    shards = _rendered.shard_counts(out, config, quiet, ok)
    if isinstance(shards, int):
        return shards
    kinds: dict[str, int] = {}
    for r in rows:
        for kind in r["kinds"]:
            kinds[kind] = kinds.get(kind, 0) + 1
    report = {"input": spec, "generator": generator, "per_sample": per_sample, "seed": seed, "inputs": len(rows),
              "ok": ok, "errors": len(rows) - ok, "pairs": sum(kinds.values()), "qa_kinds": kinds,
              "error_reasons": _rendered.error_counts(rows), **_rendered.outputs(out, shards, _preview(out, rows))}
    return _rendered.write_report(out, report, rows, report["ok"] + report["errors"], "inputs")


def _summary(report: dict) -> str:
    return (f"{report['inputs']} inputs -> {report['ok']} samples ({report['pairs']} pairs by {report['generator']}), "
            f"{report['errors']} errors; " + _rendered.shards_line(report))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def start() -> dict | int:
        from data_curation.qa_text import TEMPLATES

        if not Path(args.input).exists() and not any(c in args.input for c in "*?[{"):
            raise _rendered.RenderedBuildError(f"SHARDS_OR_FOLDER {args.input} not found")
        if args.generator != TEMPLATES and not Path(args.generator).is_dir():
            raise _rendered.RenderedBuildError(f"--generator {args.generator} is neither 'templates' nor a model "
                                               "directory")
        if not Path(args.config).is_file():
            raise _rendered.RenderedBuildError(f"--config {args.config} not found")
        return build(args.input, Path(args.out), args.generator, args.per_sample, args.seed, args.max_new_tokens,
                     args.config, args.json)

    return _rendered.run_build("build_qa", start, _summary, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
