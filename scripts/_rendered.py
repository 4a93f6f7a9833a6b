"""What the builders of rendered / derived image sets share (scripts.build_charts, build_grounding,
build_screenshots): the default curation config, a one-line argparse, whole-number arguments, atomic writes, the
render step's resume marker (OUT/render.json + OUT/build_status.jsonl), the shard build of OUT/raw into
OUT/shards by scripts.build_shards, the ``main`` tail and the preview grid."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "curation_rendered.yaml"


class RenderedBuildError(ValueError):
    """A build that cannot start: an unreadable input, an OUT holding another build."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``<script name>: message``, exit code 2 (not the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog.rsplit('.', 1)[-1]}: {message}\n")


def whole(low: int):
    """An argparse type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {low}")
        return value
    return parse


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finished_render(out: Path, settings: dict) -> list[dict] | None:
    """The status rows of a finished render of the same ``settings`` (None: nothing rendered yet); another
    build's OUT is a `RenderedBuildError`."""
    marker, raw = out / "render.json", out / "raw"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done != settings:
            raise RenderedBuildError(f"{out} holds a build with other arguments ({marker}); remove it or choose "
                                     "another OUT")
        return [json.loads(line) for line in (out / "build_status.jsonl").read_text().splitlines()]
    if raw.exists() and any(raw.iterdir()):
        raise RenderedBuildError(f"{raw} holds files but no finished render ({marker} is missing); remove it or "
                                 "choose another OUT")
    return None


def mark_rendered(out: Path, rows: list[dict], settings: dict) -> None:
    """Write the status rows, then OUT/render.json: the render's resume marker, last."""
    write_atomic(out / "build_status.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_atomic(out / "render.json", json.dumps(settings) + "\n")


def render_or_resume(out: Path, settings: dict, render: Callable[[], list[dict]]) -> list[dict]:
    """The status rows of OUT's finished render of ``settings``, else ``render()``'s (then marked finished)."""
    if out.exists() and not out.is_dir():
        raise RenderedBuildError(f"OUT {out} is a file, not a folder")
    rows = finished_render(out, settings)
    if rows is None:
        rows = render()
        mark_rendered(out, rows, settings)
    return rows


def status_counts(rows: list[dict], field: str, values) -> dict[str, dict[str, int]]:
    """Per value of ``field``, how many rows are ok and how many error."""
    return {v: {s: sum(r[field] == v and r["status"] == s for r in rows) for s in ("ok", "error")} for v in values}


def error_counts(rows: list[dict], key: str = "reason") -> dict[str, int]:
    """How many error rows per ``key`` (their reason or error kind)."""
    counts: dict[str, int] = {}
    for r in rows:
        if r["status"] == "error":
            counts[r[key]] = counts.get(r[key], 0) + 1
    return counts


def run_build_shards(out: Path, config: str, quiet: bool) -> dict | int:
    """scripts.build_shards on OUT/raw -> OUT/shards; its report, or its exit code when it failed."""
    from scripts import build_shards

    with contextlib.redirect_stdout(io.StringIO()):  # its report JSON: ours holds its counts
        rc = build_shards.main([str(out / "raw"), str(out / "shards"), "--config", config, *(["--json"] * quiet)])
    if rc != 0:
        return rc
    return json.loads((out / "shards" / "report.json").read_text())


def shard_counts(out: Path, config: str, quiet: bool, samples: int) -> dict | int:
    """The shard build of ``samples`` raw samples -> its counts (inputs, kept, dropped, error, shards, by_reason),
    checked to add up to ``samples``; build_shards' exit code when it failed. No samples: no build, zero counts
    (an empty raw folder is a build_shards input error; nothing to curate is no error here)."""
    counts = {"inputs": 0, "kept": 0, "dropped": 0, "error": 0, "shards": 0, "by_reason": {}}
    if samples:
        sub = run_build_shards(out, config, quiet)
        if isinstance(sub, int):
            return sub
        counts = {"inputs": sub["inputs"], **sub["counts"], "shards": sub["shards"], "by_reason": sub["by_reason"]}
    # every sample accounted for: a mismatch is a bug in this job, never a report to write
    if counts["inputs"] != samples or counts["kept"] + counts["dropped"] + counts["error"] != samples:
        raise RuntimeError(f"the shard build's counts {counts} do not add up to the {samples} samples written")
    return counts


def outputs(out: Path, shards: dict, preview: str | None) -> dict:
    """The report's fields naming what a build wrote."""
    return {"shards": {"dir": str(out / "shards"), **shards}, "raw": str(out / "raw"),
            "build_status": str(out / "build_status.jsonl"), "preview": preview}


def write_report(out: Path, report: dict, rows: list[dict], expected: int, what: str) -> dict:
    """OUT/report.json, last, once the status rows account for all ``expected`` inputs (a mismatch is a bug in
    the job, never a report to write)."""
    if len(rows) != expected:
        raise RuntimeError(f"{len(rows)} status rows for {expected} {what}: the build lost or doubled an input")
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def shards_line(report: dict) -> str:
    """The end of a builder's summary line: what the shard build kept and where the preview is."""
    s = report["shards"]
    return (f"shards: {s['kept']} kept, {s['dropped']} dropped, {s['error']} errors under {s['dir']}; preview "
            f"{report['preview']}")


def run_build(name: str, start: Callable[[], dict | int], summary: Callable[[dict], str], quiet: bool) -> int:
    """A builder's ``main`` after parsing: ``start()`` (its checks and build) -> the exit code. A
    `RenderedBuildError` is one line ``name: reason`` and 2; build_shards' failing exit code passes through;
    else the ``summary`` line (stderr, not with ``quiet``) and the report JSON (stdout), 0."""
    try:
        report = start()
    except RenderedBuildError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    if isinstance(report, int):
        return report
    if not quiet:
        print(summary(report), file=sys.stderr)
    print(json.dumps(report, indent=None if quiet else 2))
    return 0


def write_preview(out: Path, grid: list[list[tuple[bytes, str]]]) -> str | None:
    """OUT/preview.png: one row per non-empty list of (PNG, title) cells -> its path; None when every row is empty."""
    from synthetic.charts import preview_grid

    grid = [cells for cells in grid if cells]
    if not grid:
        return None
    (out / "preview.png").write_bytes(preview_grid(grid))
    return str(out / "preview.png")
