"""Rendered charts, tables and equations as conversation shards (the annealing set's structured content).

    python -m scripts.build_charts OUT [--n N] [--seed S] [--kinds bar,line,pie,table,equation]
        [--equations FILE] [--config CURATION_YAML] [--json]

Renders N samples (kinds in turn; synthetic/charts.py) into OUT/raw: NNNNNN.png + a sidecar NNNNNN.json
{"caption": target, "conversations": [...], "kind", "qa_kinds"}, the folder input of scripts.build_shards. The
conversation is the trainer's (data.format conversation): "<|image|>" + "Give the data of this chart as a
markdown table." (tables: "Give this table as markdown.", equations: "Write this equation in LaTeX.") -> the
target, then one user / assistant turn per question-answer pair (values, comparisons, extrema, table cells, an
equation's Greek letter). Then scripts.build_shards curates OUT/raw into OUT/shards with --config (default
configs/curation_rendered.yaml). --equations: one LaTeX per line, drawn instead of the templates (equation
sample k takes line k, cycling).

Writes OUT/build_status.jsonl (one row per sample: id, kind, status ok|error, reason: LaTeX mathtext cannot
parse, a render exception), OUT/preview.png (the first samples of each kind, their targets as titles) and
OUT/report.json, last: rendered + errors == N, and the shard build's kept + dropped + error == rendered. Sample i
is the same whatever N. A rerun with the same arguments resumes (rendering is skipped once OUT/render.json
exists; the shard build resumes itself); other arguments over the same OUT are refused.
Exit code 2, with one line: bad arguments, an unreadable --equations file, an OUT holding another build, or a
shard build error (scripts.build_shards names it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from synthetic.charts import KINDS

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "curation_rendered.yaml"
PREVIEW_PER_KIND = 3


class BuildChartsError(ValueError):
    """A build that cannot start: an unreadable equations file, an OUT holding another build."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"build_charts: {message}\n")


def _whole(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {low}")
        return value
    return parse


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind {unknown[0]!r} (choose from {','.join(KINDS)})" if unknown
                                         else "no kinds given")
    return kinds


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m scripts.build_charts", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT")
    p.add_argument("--n", type=_whole(1), default=1000, help="samples to render (default 1000)")
    p.add_argument("--seed", type=_whole(0), default=0, help="same seed, same samples (default 0)")
    p.add_argument("--kinds", type=_kinds, default=KINDS, help=f"comma-separated, in turn (default {','.join(KINDS)})")
    p.add_argument("--equations", default=None, help="a file of LaTeX equations, one per line (instead of templates)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the shard build's curation YAML")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    return p


def read_equations(path: str) -> list[str]:
    """The non-blank lines of ``path``, stripped, without enclosing ``$...$``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BuildChartsError(f"cannot read --equations {path}: {e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln[1:-1] if len(ln) > 1 and ln.startswith("$") and ln.endswith("$") else ln for ln in lines]
    if not lines:
        raise BuildChartsError(f"--equations {path} holds no equation (one LaTeX per line)")
    return lines


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_raw(out: Path, n: int, seed: int, kinds: tuple[str, ...], equations: list[str] | None) -> list[dict]:
    """Render every sample into ``out/raw`` (image + sidecar) -> one status row per sample."""
    from synthetic.charts import ChartError, render_chart

    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind, key = kinds[i % len(kinds)], f"{i:06d}"
        # each cycle of kinds holds one equation: equation sample i // len(kinds) takes that line (cycling)
        latex = equations[(i // len(kinds)) % len(equations)] if kind == "equation" and equations else None
        try:
            chart = render_chart(kind, seed, i, latex)
        except ChartError as e:
            rows.append({"id": key, "kind": kind, "status": "error", "reason": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 - a renderer failure is this sample's error; the job goes on
            rows.append({"id": key, "kind": kind, "status": "error",
                         "reason": f"render failed: {type(e).__name__}: {' '.join(str(e).split())}"})
            continue
        (raw / f"{key}.png").write_bytes(chart.png)
        sidecar = {"caption": chart.target, "conversations": chart.conversation(), "kind": kind,
                   "qa_kinds": [qa.kind for qa in chart.qas]}
        (raw / f"{key}.json").write_text(json.dumps(sidecar) + "\n")
        rows.append({"id": key, "kind": kind, "status": "ok", "reason": None})
    return rows


def _rendered(out: Path, settings: dict) -> list[dict] | None:
    """The status rows of a finished render of the same ``settings`` (None: nothing rendered yet); another
    build's OUT is a `BuildChartsError`."""
    marker, raw = out / "render.json", out / "raw"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done != settings:
            raise BuildChartsError(f"{out} holds a build with other arguments ({marker}); remove it or choose "
                                   "another OUT")
        return [json.loads(line) for line in (out / "build_status.jsonl").read_text().splitlines()]
    if raw.exists() and any(raw.iterdir()):
        raise BuildChartsError(f"{raw} holds files but no finished render ({marker} is missing); remove it or "
                               "choose another OUT")
    return None


def _shards(out: Path, config: str, quiet: bool) -> dict | int:
    """scripts.build_shards on OUT/raw -> OUT/shards; its report, or its exit code when it failed."""
    from scripts import build_shards

    with contextlib.redirect_stdout(io.StringIO()):  # its report JSON: ours holds its counts
        rc = build_shards.main([str(out / "raw"), str(out / "shards"), "--config", config, *(["--json"] * quiet)])
    if rc != 0:
        return rc
    return json.loads((out / "shards" / "report.json").read_text())


def _preview(out: Path, rows: list[dict], kinds: tuple[str, ...]) -> str | None:
    from synthetic.charts import preview_grid, short_target

    grid = []
    for kind in kinds:
        ok = [r["id"] for r in rows if r["kind"] == kind and r["status"] == "ok"][:PREVIEW_PER_KIND]
        cells = [((out / "raw" / f"{k}.png").read_bytes(),
                  f"{kind}: {short_target(json.loads((out / 'raw' / f'{k}.json').read_text())['caption'])}")
                 for k in ok]
        if cells:
            grid.append(cells)
    if not grid:
        return None
    (out / "preview.png").write_bytes(preview_grid(grid))
    return str(out / "preview.png")


def build(out: Path, n: int, seed: int, kinds: tuple[str, ...], equations: list[str] | None, config: str,
          quiet: bool) -> dict | int:
    """Render (or resume), curate, preview, report -> the report, or build_shards' exit code when it failed."""
    settings = {"n": n, "seed": seed, "kinds": list(kinds), "equations": equations}
    if out.exists() and not out.is_dir():
        raise BuildChartsError(f"OUT {out} is a file, not a folder")
    rows = _rendered(out, settings)
    if rows is None:
        rows = render_raw(out, n, seed, kinds, equations)
        _write(out / "build_status.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        _write(out / "render.json", json.dumps(settings) + "\n")  # last: the render's resume marker
    rendered = sum(r["status"] == "ok" for r in rows)
    shards = {"inputs": 0, "kept": 0, "dropped": 0, "error": 0, "shards": 0, "by_reason": {}}
    if rendered:  # an empty raw folder is a build_shards input error; nothing to curate is no error here
        sub = _shards(out, config, quiet)
        if isinstance(sub, int):
            return sub
        shards = {"inputs": sub["inputs"], **sub["counts"], "shards": sub["shards"], "by_reason": sub["by_reason"]}
    by_kind = {k: {s: sum(r["kind"] == k and r["status"] == s for r in rows) for s in ("ok", "error")} for k in kinds}
    errors = {}
    for r in rows:
        if r["status"] == "error":
            errors[r["reason"]] = errors.get(r["reason"], 0) + 1
    report = {"n": n, "seed": seed, "kinds": list(kinds), "rendered": rendered, "errors": len(rows) - rendered,
              "by_kind": by_kind, "error_reasons": errors, "shards": {"dir": str(out / "shards"), **shards},
              "raw": str(out / "raw"), "build_status": str(out / "build_status.jsonl"),
              "preview": _preview(out, rows, kinds)}
    # every input accounted for: a mismatch is a bug in this job, never a report to write
    if report["rendered"] + report["errors"] != n or len(rows) != n:
        raise RuntimeError(f"render counts {rendered} + {len(rows) - rendered} do not add up to N = {n}")
    if rendered and (shards["inputs"] != rendered or shards["kept"] + shards["dropped"] + shards["error"] != rendered):
        raise RuntimeError(f"the shard build's counts {shards} do not add up to the {rendered} rendered samples")
    _write(out / "report.json", json.dumps(report, indent=2) + "\n")  # last
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        equations = read_equations(args.equations) if args.equations is not None else None
        if not Path(args.config).is_file():
            raise BuildChartsError(f"--config {args.config} not found")
        report = build(Path(args.out), args.n, args.seed, args.kinds, equations, args.config, args.json)
    except BuildChartsError as e:
        print(f"build_charts: {e}", file=sys.stderr)
        return 2
    if isinstance(report, int):
        return report
    if not args.json:
        s = report["shards"]
        print(f"{report['n']} samples -> {report['rendered']} rendered, {report['errors']} errors; shards: "
              f"{s['kept']} kept, {s['dropped']} dropped, {s['error']} errors under {s['dir']}; preview "
              f"{report['preview']}", file=sys.stderr)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
