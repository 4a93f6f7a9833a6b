"""The shard builder's report: counts per stage and reason (adding up to the inputs) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from common.config import config_to_dict
from data_curation.curation_config import CurationConfig
from data_curation.shard_jobs import _atomic_write, read_status_rows, status_counts


def _plots(out: Path, clip_scores: list[float], nn_sim: np.ndarray, cfg: CurationConfig, top: list) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rep = out / "report"
    rep.mkdir(exist_ok=True)
    def hist(name: str, values, threshold: float, xlabel: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(values, bins=50)
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
        ax.set(xlabel=xlabel, ylabel="samples", title=title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(rep / name, dpi=100)
        plt.close(fig)
        written.append(f"report/{name}")

    if clip_scores:
        hist("clip_score_hist.png", clip_scores, cfg.clip.threshold, "CLIP image-text cosine similarity",
             "CLIP score")
    found = nn_sim[nn_sim > -1]
    if found.size:
        hist("nn_similarity_hist.png", found, cfg.dedup.threshold, "nearest-neighbour SSCD cosine similarity",
             "De-duplication")
    if top:
        before = [b for _, b, _ in top]
        after = [a for _, _, a in top]
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(top))
        ax.plot(x, before, label="before resampling")
        ax.plot(x, after, label="after resampling")
        ax.axhline(cfg.resample.t, color="red", linestyle="--", label=f"t = {cfg.resample.t:g}")
        ax.set(yscale="log", xlabel="n-gram entries, most frequent first", ylabel="captions containing it",
               title="n-gram frequencies")
        ax.legend()
        fig.tight_layout()
        fig.savefig(rep / "ngram_frequencies.png", dpi=100)
        plt.close(fig)
        written.append("report/ngram_frequencies.png")
    return written


def write_report(out: Path, n_shards: int, cfg: CurationConfig, seconds: dict, engine: dict) -> dict:
    """Aggregate every shard's status parquet into ``report.json`` + plots (counts and reason kinds as in
    every builder's report: ``shard_jobs.status_counts``); ``engine``: each pass-1 stage's time and throughput
    and the chunks each Ray node ran, in this run (``engine.StageTimes.report``)."""
    work = out / "_work"
    rows = read_status_rows(out, n_shards)
    clip_scores: list[float] = []
    ocr = {"read": 0, "skipped_no_text": 0}
    for i in range(n_shards):
        chunk = pq.read_table(work / f"chunk_{i:05d}.parquet", columns=["fields"]).column("fields").to_pylist()
        for f in map(json.loads, chunk):
            if "clip_score" in f:
                clip_scores.append(f["clip_score"])
            for image in f.get("images", [f]):  # a conversation record's images, or the sample's one
                if "ocr_skipped" in image:
                    ocr["skipped_no_text" if image["ocr_skipped"] else "read"] += 1
    g = pq.read_table(work / "global.parquet")
    nn_sim = np.asarray(g.column("dedup_nn_similarity").to_numpy(), np.float32)
    gstats = json.loads((work / "global_stats.json").read_text())
    top = gstats.get("resample", {}).get("top_entries", [])
    report = {
        **status_counts(rows, n_shards),
        "global": gstats,
        "seconds": seconds,
        "images_per_s": round(len(rows) / max(seconds["total"], 1e-9), 2),
        "engine": engine,
        "ocr_images": ocr,
        "stages_enabled": {k: v.get("enabled", True) for k, v in config_to_dict(cfg).items() if isinstance(v, dict)},
    }
    report["plots"] = _plots(out, clip_scores, nn_sim, cfg, top)
    _atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    return report
