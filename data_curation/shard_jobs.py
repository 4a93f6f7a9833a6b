"""What every shard builder shares, whatever the media: the files of a shard, the resume rule, the run on Ray
and the report's counts.

A builder (``shards`` for images, ``video_shards``, ``audio_shards``) supplies a processor (built once per worker,
``process(chunk)`` sets every sample's status) and the writers for its shards and report; ``run_shard_job``
chunks the inputs, skips the chunks whose ``shard_i_stats.json`` exists (written last: the resume marker), runs
the rest as Ray Data stages (``run_chunks``, ``engine``), then writes the report. The image builder's pass 1
has a stage per step (``shards.image_stages``) and its global pass (dedup, resampling) needs every chunk before
any shard, so it drives its own passes and uses only ``run_chunks`` and the small helpers here.

What guards a job against its inputs and against itself, for every builder:

* an exclusive lock on ``OUT/.build.lock`` for the job's life (``output_lock``): a second live build on the
  same folder is refused;
* ``ResumeConfig``: the config a resume must match (all but ``workers``; the Ray address is no config),
  written once setup worked;
* ``inputs_digest`` of every chunk's (key, source) list, kept beside the finished chunk: a resume whose input
  listing changed under a finished chunk is refused, as is an output folder inside the input folder;
* ``guard_text`` before any stage and again in every writer: text that UTF-8 cannot encode (a lone surrogate)
  fails its sample or is escaped, so it never kills a writer;
* unique temporary names (``_replacing``), removed when a write fails.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import config_to_dict
from data_curation.engine import Stage, StageTimes, build_stages, check_address, connect, run_stages
from data_curation.input_files import LONE_SURROGATE, CurationInputError
from data_curation.records import DROPPED, ERROR, OK, STATUSES, Sample, bad_text_field, escape_text

STATUS_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("status", pa.string()),
                           ("stage", pa.string()), ("reason", pa.string()), ("shard", pa.string())])


class StageSetupError(RuntimeError):
    """A stage's model or resource cannot be loaded (SSCD file, CLIP model, blocklist, tesseract, classifier)."""


class ResumeMismatchError(ValueError):
    """The output folder holds a build this run cannot continue: another config, or other inputs."""


class OutputBusyError(RuntimeError):
    """Another live build holds the output folder's lock."""


@dataclass
class BuildResult:
    out: Path
    n_inputs: int
    n_shards: int
    counts: dict
    report: dict


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write, renamed onto ``path`` when the block ends, removed when it
    fails. The name is unique (pid + random), so an orphaned worker of a killed build still writing the same
    chunk never writes through the file this build renames."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # O_EXCL: ours alone; umask applies
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    with _replacing(path) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------------------------------------- guards

LOCK_NAME = ".build.lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``out/.build.lock`` held for the block: a second live build on ``out`` gets
    ``OutputBusyError``. The kernel releases the lock when its holder dies, so the file a killed build
    leaves behind blocks nothing. The file is never written (a rerun with nothing to do changes nothing)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(f"{out}: another build is running on this output folder (it holds {path}); "
                                  "wait for it to end or use another output folder") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def refuse_output_inside_input(input_spec: str | Path, out: Path) -> None:
    """A folder input's listing would take in the build's own files (shards, temporaries) and shift every
    chunk on resume: an output folder inside (or equal to) the input folder is a ``CurationInputError``."""
    root = Path(input_spec)
    if not root.is_dir():
        return
    root, target = root.resolve(), out.resolve()
    if target == root or root in target.parents:
        raise CurationInputError(f"output folder {out} is inside the input folder {input_spec}: the build would "
                                 "read its own files as inputs; choose an output folder outside it")


class ResumeConfig:
    """The part of a job's config that decides its output (all but ``workers``), kept in ``file``: a rerun
    must match it to resume. ``save`` is called once the job's setup worked, so a failed setup (a misspelt
    model path) never pins the config its corrected rerun would be refused against."""

    def __init__(self, file: Path, cfg: Any) -> None:
        self.file = file
        self.values = _without_workers(config_to_dict(cfg))

    def check(self) -> None:
        """``ResumeMismatchError`` naming the keys that differ from the saved config, if any."""
        if not self.file.exists():
            return
        try:
            saved = _without_workers(json.loads(self.file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ResumeMismatchError(f"{self.file}: not a readable config ({e}); use a new output folder") from None
        differ = _differing_keys(saved, self.values)
        if differ:
            raise ResumeMismatchError(f"{self.file.parent}: already built with a different config ({self.file}): "
                                      f"{', '.join(differ)} differ; rerun with that config or use a new output "
                                      "folder")

    def save(self) -> None:
        if not self.file.exists():
            _atomic_write(self.file, json.dumps(self.values, sort_keys=True).encode())


def _without_workers(values: Any) -> Any:
    # the worker count changes no output, so a resume may use another one
    return {k: v for k, v in values.items() if k != "workers"} if isinstance(values, dict) else values


def _differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (added and removed keys included)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix or "(config)"] if old != new else []
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        name = f"{prefix}.{k}" if prefix else str(k)
        out += _differing_keys(old.get(k), new.get(k), name) if k in old and k in new else [name]
    return out


def inputs_digest(samples: list[Sample]) -> str:
    """A fingerprint of a chunk's input listing: its (key, source) pairs in order."""
    h = hashlib.sha1()
    for s in samples:
        h.update(f"{escape_text(s.key)}\0{escape_text(s.source)}\n".encode())
    return h.hexdigest()


def check_inputs_unchanged(recorded: str | None, digest: str, where: Path) -> None:
    """Inputs are assigned to chunks by position: a finished chunk whose listing differs now (a file added,
    removed or renamed before or in it) would be skipped while holding other inputs, so the resume is
    refused; so is one written by an older build that kept no fingerprint (``recorded`` None)."""
    if recorded is None:
        raise ResumeMismatchError(f"{where}: written by an older build that kept no fingerprint of its inputs, "
                                  "so a resume cannot check them; use a new output folder")
    if recorded != digest:
        raise ResumeMismatchError(f"{where}: its inputs are not the ones it was built from (the input listing "
                                  "changed since: files added, removed or renamed); resume with the original "
                                  "inputs or use a new output folder")


def refuse_stale_chunk(path: Path) -> None:
    """A finished chunk past the end of today's listing: inputs were removed since the build began."""
    if path.exists():
        raise ResumeMismatchError(f"{path}: the input listing now ends before this finished chunk (inputs were "
                                  "removed since the build began); resume with the original inputs or use a new "
                                  "output folder")


def guard_text(samples: list[Sample]) -> list[Sample]:
    """Makes every sample's text writable, in place; the readers already do, this is the last line of
    defence (a reader, a stage or a caller that let one through would otherwise kill the parquet or tar
    writer, and every rerun with it). Names and messages (key, source, stage, reason) are escaped
    (``records.escape_text``); a kept sample whose caption or meta holds a lone surrogate fails, naming the
    field, and its caption is escaped for the error record. Run before the stages (no model sees such
    text) and again by every writer."""
    for s in samples:
        s.key, s.source = escape_text(s.key), escape_text(s.source)
        field = bad_text_field({"caption": s.caption, "meta": s.meta})
        if field is not None and s.ok:
            s.fail("text", f"field {field!r} holds a {LONE_SURROGATE}, not valid text; it cannot be written")
        if isinstance(s.caption, str):
            s.caption = escape_text(s.caption)
        s.stage, s.reason = s.stage and escape_text(s.stage), s.reason and escape_text(s.reason)
    return samples


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
    guard_text(samples)
    with _replacing(out / f"{name}.tar") as tmp_tar, open(tmp_tar, "wb") as fh:
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
    stats = {"shard": name, **counts, "inputs_digest": inputs_digest(samples), "written_at": time.time()}
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
            "by_reason": dict(sorted(Counter(f"{r['stage']}:{reason_kind(r)}" for r in not_ok).items()))}


def report_head(out: Path, n_shards: int, seconds: dict, engine: dict, *, decoded: Callable[[dict], bool],
                stats: Callable[[list[dict]], dict], unit: str) -> tuple[dict, list[dict], list[dict]]:
    """The part of a report every media shares -> (report, decoded rows, kept rows): ``status_counts``, then
    ``stats`` of the rows that ``decoded`` accepts and of the kept ones among them, ``seconds``, the
    throughput in ``{unit}s_per_s`` and each stage's time and the chunks per Ray node in this run (``engine``:
    ``engine.StageTimes.report``)."""
    rows = read_status_rows(out, n_shards)
    decoded_rows = [r for r in rows if decoded(r)]
    kept = [r for r in decoded_rows if r["status"] == OK]
    report = {
        **status_counts(rows, n_shards),
        "stats_decoded": stats(decoded_rows),
        "stats_kept": stats(kept),
        "seconds": seconds,
        f"{unit}s_per_s": round(len(rows) / max(seconds["total"], 1e-9), 2),
        "engine": engine,
    }
    return report, decoded_rows, kept


def reason_kind(row: dict) -> str:
    """A status row's reason without what names its input (the source, a tail of its path, its stem, its
    key, any absolute path: "*"), without a leading "<source>: ", without what follows a "(" (details) and
    without bare numbers ("#"), so
    that reports count kinds of failure, not files: ``"/d/x.jpg: image file is truncated (5 bytes)"`` ->
    ``"image file is truncated"``, ``"orphan caption file sub/x.txt: no image named sub/x.*"`` ->
    ``"orphan caption file *: no image named *.*"``."""
    reason = row["reason"] or ""
    for name in _input_names(row["source"] or "", row["key"] or ""):
        # a bare stem or key only where an extension follows ("x.txt", "x.*"): a file named "a" must not
        # hide the word "a"
        end = r"(?![\w-])" if re.search(r"[/.:]", name) else r"(?=\.)"
        reason = re.sub(rf"(?<![\w/.-]){re.escape(name)}{end}", "*", reason)
    reason = re.sub(r"(?<![\w.*])/[^\s:]+", "*", reason).removeprefix("*: ")  # other absolute paths too
    reason = re.sub(r"(?<![\w.-])\d+(?![\w-])", "#", reason.split("(")[0])
    return " ".join(reason.split())


def _input_names(source: str, key: str) -> list[str]:
    """The ways a reason names its input, longest first: the source ("/d/sub/x.jpg", "m.jsonl:12",
    "s.tar:x.jpg"), each tail of its path and of its member ("sub/x.jpg", "x.jpg") with and without the
    extension, and the key."""
    names = {source, key}
    for part in {source, *source.rsplit(":", 1)[1:]}:
        pieces = part.replace("\\", "/").split("/")
        for i in range(len(pieces)):
            tail = "/".join(pieces[i:])
            names |= {tail, tail.rsplit(".", 1)[0] if "." in pieces[-1] else tail}
    return sorted((n for n in names if n), key=len, reverse=True)


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


def run_shard_job(input_spec: str | Path, read_inputs: Callable[[], Iterable[Sample]], out: Path, cfg: Any, *,
                  make_processor: Callable, write_shard: Callable, write_report: Callable, progress: bool,
                  max_chunks: int | None, unit: str = "sample", address: str | None = None) -> BuildResult:
    """Chunks of ``cfg.samples_per_shard`` inputs -> ``make_processor(cfg).process(chunk)`` -> ``write_shard(out,
    i, chunk)`` as two Ray Data stages (``engine``), skipping chunks whose ``shard_i_stats.json`` exists; then
    ``write_report(out, n_shards, cfg, seconds, engine)``. Holds ``out``'s lock throughout; ``out`` may not
    lie inside the ``input_spec`` folder. ``read_inputs`` is called once the config is known to match
    ``out/config.json`` (``ResumeConfig``). The processor is built on one Ray worker first
    (``engine.build_stages``), so a setup error is raised once, up front, and ``config.json`` is written only
    after it worked. A finished shard whose input
    listing changed is a ``ResumeMismatchError``. ``max_chunks`` stops after that many new shards (to simulate an
    interrupted job in tests). A rerun with nothing left to do builds no processor and rewrites nothing."""
    refuse_output_inside_input(input_spec, out)
    check_address(address)
    with output_lock(out):
        return _run_locked(read_inputs, out, cfg, make_processor, write_shard, write_report, progress,
                           max_chunks, unit, address)


def _run_locked(read_inputs: Callable[[], Iterable[Sample]], out: Path, cfg: Any, make_processor: Callable,
                write_shard: Callable, write_report: Callable, progress: bool, max_chunks: int | None,
                unit: str, address: str | None) -> BuildResult:
    resume = ResumeConfig(out / "config.json", cfg)
    resume.check()
    inputs = read_inputs()
    t0 = time.perf_counter()
    n_chunks = started = 0
    stopped = False

    def todo() -> Iterator[tuple[int, list[Sample]]]:
        nonlocal n_chunks, started, stopped
        for i, chunk in _chunks(inputs, cfg.samples_per_shard):
            done = out / f"shard_{i:05d}_stats.json"
            if done.exists():
                check_inputs_unchanged(json.loads(done.read_text()).get("inputs_digest"), inputs_digest(chunk), done)
                n_chunks = i + 1
                continue
            if max_chunks is not None and started >= max_chunks:
                stopped = True
                return
            n_chunks, started = i + 1, started + 1
            yield i, chunk

    stages = [Stage("process", _ProcessStage(make_processor)), Stage("write", _WriteStage(write_shard, out))]
    times = run_chunks(todo(), stages, cfg, progress=progress, unit=unit, on_setup=resume.save, address=address)
    resume.save()
    if stopped:
        return BuildResult(out, -1, started, {}, {})
    refuse_stale_chunk(out / f"shard_{n_chunks:05d}_stats.json")
    missing = [i for i in range(n_chunks) if not (out / f"shard_{i:05d}_stats.json").exists()]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:5]} were not written")
    if started == 0 and (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text())
    else:
        report = write_report(out, n_chunks, cfg, {"total": round(time.perf_counter() - t0, 2)},
                              times.report(unit))
    return BuildResult(out, report["inputs"], n_chunks, report["counts"], report)


class _ProcessStage:
    """``make_processor(cfg).process`` as an engine stage (text guarded first, as every stage input is)."""

    def __init__(self, make_processor: Callable) -> None:
        self.make_processor = make_processor

    def __call__(self, cfg: Any, device: str) -> Callable[[int, list[Sample]], list[Sample]]:
        return _Process(self.make_processor(cfg))


class _Process:
    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.clock = getattr(processor, "clock", None)  # its steps' times (engine.StepClock), if it keeps them

    def __call__(self, index: int, samples: list[Sample]) -> list[Sample]:
        return self.processor.process(guard_text(samples))


class _WriteStage:
    """``write_shard(out, i, samples)`` as the last engine stage: it returns the samples' statuses only (the
    driver needs no more)."""

    def __init__(self, write_shard: Callable, out: Path) -> None:
        self.write_shard, self.out = write_shard, str(out)

    def __call__(self, cfg: Any, device: str) -> Callable[[int, list[Sample]], list[str]]:
        def write(index: int, samples: list[Sample]) -> list[str]:
            self.write_shard(Path(self.out), index, samples)
            return [s.status for s in samples]

        return write


def crashed_sample(sample: Sample, stage: str, message: str) -> Sample:
    """The engine's mark for a sample whose worker process died on it in ``stage``."""
    return sample.fail(stage, message)


def run_chunks(chunks: Iterator[tuple[int, list[Sample]]], stages: list[Stage], cfg: Any, *, progress: bool,
               unit: str, on_setup: Callable[[], None], address: str | None,
               crashed: Callable[[Any, str, str], Any] = crashed_sample) -> StageTimes:
    """Runs ``chunks`` through ``stages`` on Ray (``engine.run_stages``, ``cfg.workers`` at a time). The stages
    are built on one worker first (``engine.build_stages``), and only when there is a chunk: a bad model path
    or a missing tesseract is one named error up front, not every worker failing; ``on_setup`` runs once it
    worked (it saves the resume config)."""
    first = next(chunks, None)
    if first is None:
        return StageTimes()
    connect(address, cfg.workers)
    build_stages(stages, cfg)
    on_setup()
    return run_stages(itertools.chain([first], chunks), stages, cfg, workers=cfg.workers, crashed=crashed,
                      progress=progress, unit=unit)
