"""Curate speech-transcript pairs into webdataset shards (Llama 3 sec. 8: VAD score above 0.7).

    python -m scripts.build_audio_shards INPUT OUT [--config configs/audio_curation.yaml] [--workers N]
        [--max-sample-bytes N] [--allow-outside-root] [--json]

INPUT: a folder of audio files with sidecar transcripts (x.wav / x.flac / x.ogg + x.txt, or x.json with
"text"), or a JSONL / parquet manifest of {"audio": path, "text": ...} rows. Runs decoding, duration, silence
and clipping checks and silero VAD, then writes OUT/shard_NNNNN.{tar,parquet} (key.flac at 16 kHz mono,
key.txt, key.json) and shard_NNNNN_stats.json (written last: rerunning after a kill resumes), plus
OUT/report.json and plots under OUT/report/. See data_curation/audio_shards.py for the stages and
configs/audio_curation.yaml for every option.
Exit code 2: a config, input or stage setup error, a resume whose config or inputs differ from
what OUT holds, or OUT in use by another live build (one line names it).
"""

from __future__ import annotations

from scripts._shard_cli import shard_main


def _builder():
    from data_curation.audio_shards import build_audio_shards, load_audio_config

    return load_audio_config, build_audio_shards


def main(argv: list[str] | None = None) -> int:
    return shard_main(argv, doc=__doc__, name="build_audio_shards", builder=_builder,
                      config_help="audio_curation.yaml (default: every check at its defaults)",
                      kept_detail=lambda r: f" ({r['stats_kept']['hours']} h)")


if __name__ == "__main__":
    raise SystemExit(main())
