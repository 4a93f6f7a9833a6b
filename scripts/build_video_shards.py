"""Curate video-text pairs into webdataset shards (Llama 3 sec. 7.4).

    python -m scripts.build_video_shards INPUT OUT [--config configs/video_curation.yaml] [--workers N]
        [--max-sample-bytes N] [--allow-outside-root] [--json]

INPUT: a folder of videos with sidecar captions (x.mp4 + x.txt / x.json), a JSONL or parquet manifest of
video paths + captions, or webdataset tars of key.mp4 + key.txt / key.json (a .tar, a glob or a brace
pattern). Runs caption cleaning and rules, language id, decoding, OCR text overlay, CLIP frame and video
scores and the motion score, then writes OUT/shard_NNNNN.{tar,parquet} and shard_NNNNN_stats.json (written
last: rerunning after a kill resumes), plus OUT/report.json and plots under OUT/report/. See
data_curation/video_shards.py for the stages and configs/video_curation.yaml for every option.
Exit code 2: a config, input or stage setup error, a resume whose config or inputs differ from
what OUT holds, or OUT in use by another live build (one line names it).
"""

from __future__ import annotations

from scripts._shard_cli import shard_main


def _builder():
    from data_curation.video_shards import build_video_shards, load_video_config

    return load_video_config, build_video_shards


def main(argv: list[str] | None = None) -> int:
    return shard_main(argv, doc=__doc__, name="build_video_shards", builder=_builder,
                      config_help="video_curation.yaml (default: every stage at its defaults)")


if __name__ == "__main__":
    raise SystemExit(main())
