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
import json
from pathlib import Path

from scripts import _rendered
from synthetic.charts import KINDS

PREVIEW_PER_KIND = 3


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind {unknown[0]!r} (choose from {','.join(KINDS)})" if unknown
                                         else "no kinds given")
    return kinds


def _parser() -> argparse.ArgumentParser:
    p = _rendered.OneLineParser(prog="python -m scripts.build_charts", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT")
    p.add_argument("--n", type=_rendered.whole(1), default=1000, help="samples to render (default 1000)")
    p.add_argument("--seed", type=_rendered.whole(0), default=0, help="same seed, same samples (default 0)")
    p.add_argument("--kinds", type=_kinds, default=KINDS, help=f"comma-separated, in turn (default {','.join(KINDS)})")
    p.add_argument("--equations", default=None, help="a file of LaTeX equations, one per line (instead of templates)")
    p.add_argument("--config", default=str(_rendered.DEFAULT_CONFIG), help="the shard build's curation YAML")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    return p


def read_equations(path: str) -> list[str]:
    """The non-blank lines of ``path``, stripped, without enclosing ``$...$``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _rendered.RenderedBuildError(f"cannot read --equations {path}: {e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln[1:-1] if len(ln) > 1 and ln.startswith("$") and ln.endswith("$") else ln for ln in lines]
    if not lines:
        raise _rendered.RenderedBuildError(f"--equations {path} holds no equation (one LaTeX per line)")
    return lines


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


def _preview(out: Path, rows: list[dict], kinds: tuple[str, ...]) -> str | None:
    from synthetic.charts import short_target

    grid = []
    for kind in kinds:
        ok = [r["id"] for r in rows if r["kind"] == kind and r["status"] == "ok"][:PREVIEW_PER_KIND]
        grid.append([((out / "raw" / f"{k}.png").read_bytes(),
                      f"{kind}: {short_target(json.loads((out / 'raw' / f'{k}.json').read_text())['caption'])}")
                     for k in ok])
    return _rendered.write_preview(out, grid)


def build(out: Path, n: int, seed: int, kinds: tuple[str, ...], equations: list[str] | None, config: str,
          quiet: bool) -> dict | int:
    """Render (or resume), curate, preview, report -> the report, or build_shards' exit code when it failed."""
    settings = {"n": n, "seed": seed, "kinds": list(kinds), "equations": equations}
    rows = _rendered.render_or_resume(out, settings, lambda: render_raw(out, n, seed, kinds, equations))
    rendered = sum(r["status"] == "ok" for r in rows)
    shards = _rendered.shard_counts(out, config, quiet, rendered)
    if isinstance(shards, int):
        return shards
    by_kind, errors = _rendered.status_counts(rows, "kind", kinds), _rendered.error_counts(rows)
    report = {"n": n, "seed": seed, "kinds": list(kinds), "rendered": rendered, "errors": len(rows) - rendered,
              "by_kind": by_kind, "error_reasons": errors, **_rendered.outputs(out, shards, _preview(out, rows, kinds))}
    return _rendered.write_report(out, report, rows, n, "samples")


def _summary(report: dict) -> str:
    return f"{report['n']} samples -> {report['rendered']} rendered, {report['errors']} errors; " + \
        _rendered.shards_line(report)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def start() -> dict | int:
        equations = read_equations(args.equations) if args.equations is not None else None
        if not Path(args.config).is_file():
            raise _rendered.RenderedBuildError(f"--config {args.config} not found")
        return build(Path(args.out), args.n, args.seed, args.kinds, equations, args.config, args.json)

    return _rendered.run_build("build_charts", start, _summary, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
