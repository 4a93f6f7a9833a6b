"""What every shard builder shares, whatever the media: the files of a shard, the resume rule, the worker pool
and the report's counts.

A builder (``shards`` for images, ``video_shards``, ``audio_shards``) supplies a processor (built once per worker,
``process(chunk)`` sets every sample's status) and the writers for its shards and report; ``run_shard_job``
chunks the inputs, skips the chunks whose ``shard_i_stats.json`` exists (written last: the resume marker), runs
the rest in a bounded window of spawned worker processes, then writes the report. The image builder's global
pass (dedup, resampling) needs every chunk before any shard, so it drives its own passes and uses only the
small helpers here.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_curation.curation_config import config_to_dict
from data_curation.records import DROPPED, ERROR, OK, STATUSES, Sample

STATUS_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("status", pa.string()),
                           ("stage", pa.string()), ("reason", pa.string()), ("shard", pa.string())])


class StageSetupError(RuntimeError):
    """A stage's model or resource cannot be loaded (SSCD file, CLIP model, blocklist, tesseract, classifier)."""


@dataclass
class BuildResult:
    out: Path
    n_inputs: int
    n_shards: int
    counts: dict
    report: dict


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[tuple[int, list[Sample]]]:
    chunk: list[Sample] = []
    index = 0
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield index, chunk
            index, chunk = index + 1, []
    if chunk:
        yield index, chunk


# ---------------------------------------------------------------------------------------------- shards


def write_status_shard(out: Path, index: int, samples: list[Sample], members: Callable[[Sample], dict],
                       columns: tuple[str, ...]) -> dict:
    """``shard_i.tar`` with ``members(s)`` of every kept sample, ``shard_i.parquet`` with a status row (plus
    ``columns`` from ``s.fields``, as float64) for every sample, then ``shard_i_stats.json``, the resume
    marker. Each file is written under a temporary name and renamed."""
    import webdataset as wds

    name = f"shard_{index:05d}"
    tmp_tar = out / f"{name}.tar.tmp"
    with open(tmp_tar, "wb") as fh:
        writer = wds.TarWriter(fh, mtime=0.0)
        for s in filter(lambda s: s.ok, samples):
            writer.write({"__key__": s.key, **members(s)})
        writer.close()
    counts = {"inputs": len(samples), **{k: sum(s.status == k for s in samples) for k in STATUSES}}
    assert sum(counts[k] for k in STATUSES) == len(samples), "a sample has an unknown status"
    schema = pa.schema(list(STATUS_SCHEMA) + [pa.field(c, pa.float64()) for c in columns])
    rows = [{**s.status_row(), "shard": f"{name}.tar" if s.ok else None, **{c: s.fields.get(c) for c in columns}}
            for s in samples]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    _atomic_write(out / f"{name}.parquet", sink.getvalue())
    os.replace(tmp_tar, out / f"{name}.tar")
    stats = {"shard": name, **counts, "written_at": time.time()}
    _atomic_write(out / f"{name}_stats.json", json.dumps(stats).encode())  # last: the resume marker
    return stats


# ---------------------------------------------------------------------------------------------- report


def read_status_rows(out: Path, n_shards: int) -> list[dict]:
    """Every shard's status rows, in input order; a shard whose rows do not match its stats is an error."""
    rows: list[dict] = []
    for i in range(n_shards):
        expected = json.loads((out / f"shard_{i:05d}_stats.json").read_text())["inputs"]
        part = pq.read_table(out / f"shard_{i:05d}.parquet").to_pylist()
        if len(part) != expected:
            raise RuntimeError(f"shard_{i:05d}: {len(part)} status rows but {expected} inputs")
        rows += part
    return rows


def status_counts(rows: list[dict], n_shards: int) -> dict:
    """The head of a report: inputs, shards, kept / dropped / error counts (which add up to the inputs), and
    counts per stage and reason."""
    status = Counter(r["status"] for r in rows)
    if set(status) - {OK, DROPPED, ERROR}:
        raise RuntimeError(f"unknown statuses in {dict(status)}")
    not_ok = [r for r in rows if r["status"] != OK]
    return {"inputs": len(rows), "shards": n_shards,
            "counts": {"kept": status[OK], "dropped": status[DROPPED], "error": status[ERROR]},
            "by_stage": dict(sorted(Counter(f"{r['status']}:{r['stage']}" for r in not_ok).items())),
            "by_reason": dict(sorted(Counter(f"{r['stage']}:{_reason_kind(r)}" for r in not_ok).items()))}


def report_head(out: Path, n_shards: int, seconds: dict, *, decoded: Callable[[dict], bool],
                stats: Callable[[list[dict]], dict], unit: str) -> tuple[dict, list[dict], list[dict]]:
    """The part of a report every media shares -> (report, decoded rows, kept rows): ``status_counts``, then
    ``stats`` of the rows that ``decoded`` accepts and of the kept ones among them, ``seconds`` and the
    throughput in ``{unit}s_per_s``."""
    rows = read_status_rows(out, n_shards)
    decoded_rows = [r for r in rows if decoded(r)]
    kept = [r for r in decoded_rows if r["status"] == OK]
    report = {
        **status_counts(rows, n_shards),
        "stats_decoded": stats(decoded_rows),
        "stats_kept": stats(kept),
        "seconds": seconds,
        f"{unit}s_per_s": round(len(rows) / max(seconds["total"], 1e-9), 2),
    }
    return report, decoded_rows, kept


def _reason_kind(row: dict) -> str:
    """A reason without the file name a decode error starts with and without its numbers, for counting."""
    reason = row["reason"] or ""
    if reason.startswith(row["source"]):
        reason = reason.split(": ", 1)[-1]
    return reason.split("(")[0].strip()


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = np.asarray(values, np.float64)
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "median": round(float(np.median(v)), 4),
            "p10": round(float(np.percentile(v, 10)), 4), "p90": round(float(np.percentile(v, 90)), 4),
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}


def _share(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


# ---------------------------------------------------------------------------------------------- driver


def run_shard_job(read_inputs: Callable[[], Iterable[Sample]], out: Path, cfg: Any, *, make_processor: Callable,
                  write_shard: Callable, write_report: Callable, progress: bool, max_chunks: int | None,
                  unit: str = "sample") -> BuildResult:
    """Chunks of ``cfg.samples_per_shard`` inputs -> ``make_processor(cfg).process(chunk)`` -> ``write_shard(out,
    i, chunk)``, skipping chunks whose ``shard_i_stats.json`` exists; then ``write_report(out, n_shards, cfg,
    seconds)``. ``read_inputs`` is called once the config is known to match ``out/config.json`` (the config a
    resume must match, less ``workers``, which changes no result). The processor is built in this process
    first, so a setup error is raised once, up front, and ``config.json`` is written only after it worked.
    ``cfg.workers > 1``: a bounded window of chunks in flight in spawned processes, one thread each.
    ``max_chunks`` stops after that many new shards (to simulate an interrupted job in tests). A rerun with
    nothing left to do builds no processor and rewrites nothing."""
    global _WORKER
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps({k: v for k, v in config_to_dict(cfg).items() if k != "workers"}, sort_keys=True)
    cfg_file = out / "config.json"
    if cfg_file.exists() and cfg_file.read_text() != cfg_json:
        raise ValueError(f"{out}: already built with a different config ({cfg_file}); use a new output folder")
    inputs = read_inputs()
    t0 = time.perf_counter()
    n_chunks = started = 0
    stopped = False

    def todo() -> Iterator[tuple[Callable, int, list[Sample], str]]:
        nonlocal n_chunks, started, stopped
        for i, chunk in _chunks(inputs, cfg.samples_per_shard):
            if (out / f"shard_{i:05d}_stats.json").exists():
                n_chunks = i + 1
                continue
            if max_chunks is not None and started >= max_chunks:
                stopped = True
                return
            n_chunks, started = i + 1, started + 1
            yield write_shard, i, chunk, str(out)

    jobs = todo()
    first = next(jobs, None)
    if first is not None:
        import torch

        threads = torch.get_num_threads()  # restored after: the caller's setting is not ours to keep
        try:
            # Stage models load here first: a bad model path or a missing tesseract is one named error up
            # front, not a pool of workers failing in their initializer.
            _init_worker(make_processor, cfg, max(1, os.cpu_count() or 1))
            _atomic_write(cfg_file, cfg_json.encode())
            _run_jobs(itertools.chain([first], jobs), make_processor, cfg, progress, unit)
        finally:
            _WORKER = None  # free this process's copy of the stage models
            torch.set_num_threads(threads)
    if not cfg_file.exists():
        _atomic_write(cfg_file, cfg_json.encode())
    if stopped:
        return BuildResult(out, -1, started, {}, {})
    missing = [i for i in range(n_chunks) if not (out / f"shard_{i:05d}_stats.json").exists()]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:5]} were not written")
    if started == 0 and (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text())
    else:
        report = write_report(out, n_chunks, cfg, {"total": round(time.perf_counter() - t0, 2)})
    return BuildResult(out, report["inputs"], n_chunks, report["counts"], report)


def _run_jobs(jobs: Iterator[tuple], make_processor: Callable, cfg: Any, progress: bool, unit: str) -> None:
    bar = tqdm(desc=f"{unit}s", unit=unit, disable=not progress)
    if cfg.workers == 1:
        for job in jobs:
            bar.update(_run_chunk(job))
    else:
        # A bounded window of chunks in flight: Pool.imap would read every input into memory up front.
        with mp.get_context("spawn").Pool(cfg.workers, _init_worker, (make_processor, cfg, 1)) as pool:
            pending: list = []
            for job in jobs:
                pending.append(pool.apply_async(_run_chunk, (job,)))
                while len(pending) >= 2 * cfg.workers:
                    bar.update(pending.pop(0).get())
            for res in pending:
                bar.update(res.get())
    bar.close()


_WORKER: Any = None  # this process's processor


def _init_worker(make_processor: Callable, cfg: Any, threads: int) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(threads)
    _WORKER = make_processor(cfg)


def _run_chunk(job: tuple[Callable, int, list[Sample], str]) -> int:
    write_shard, index, samples, out = job
    write_shard(Path(out), index, _WORKER.process(samples))
    return len(samples)
