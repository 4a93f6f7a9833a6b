"""Curate image-text pairs into webdataset shards (Llama 3 sec. 7.1).

    python -m scripts.build_shards INPUT OUT [--config curation.yaml] [--workers N]
        [--max-sample-bytes N] [--allow-outside-root] [--json]

INPUT: a folder of images with sidecar captions (x.jpg + x.txt / x.json), a JSONL or parquet manifest of
image paths + captions, webdataset tars (a .tar, a glob or a brace pattern), or LLaVA conversation records (a
.json list, or a .jsonl whose rows have "conversations"; image paths start at the config's image_folder,
default the file's folder). Runs caption rules, language id, image rules, safety (pHash blocklist, classifier
hook, face blurring), OCR, CLIP score, SSCD + FAISS de-duplication and n-gram resampling, then writes
OUT/shard_NNNNN.{tar,parquet} and shard_NNNNN_stats.json (written last: rerunning after a kill resumes), plus
OUT/report.json and plots under OUT/report/. Conversation records become key.json (meta.conversations, read by
data.format conversation) with key.jpg, or key.0.jpg, key.1.jpg, ... for several images; they skip the caption
stages (caption rules, CLIP, dedup, resampling). See data_curation/shards.py for the passes and
configs/curation.yaml for every option.
Exit code 2: a config, input or stage setup error, a resume whose config or inputs differ from
what OUT holds, or OUT in use by another live build (one line names it).
"""

from __future__ import annotations

from scripts._shard_cli import shard_main


def _builder():
    from data_curation.curation_config import load_config
    from data_curation.shards import build_shards

    return load_config, build_shards


def main(argv: list[str] | None = None) -> int:
    return shard_main(argv, doc=__doc__, name="build_shards", builder=_builder,
                      config_help="curation.yaml (default: every stage at its defaults)")


if __name__ == "__main__":
    raise SystemExit(main())
