"""Rendered web pages as conversation shards: a marked element's HTML and the page's text (screenshot parsing).

    python -m scripts.build_screenshots OUT [--html DIR] [--n N] [--seed S] [--timeout SEC]
        [--config CURATION_YAML] [--json]

Pages: the *.html files of --html DIR (sorted by name; --n takes the first N), or N pages generated from the
templates of synthetic/screenshots.py (nav bars, forms, tables, lists, cards; default N 1000). Each is loaded from a
file:// URL (generated pages are written to a temporary folder) into one headless Chromium (common/browser.py,
Debian's chromium + chromedriver; restarted when a page hangs or kills it) with a 640 x 480 viewport, and gives
two samples in OUT/raw, each NNNNNN_TASK.png + a sidecar NNNNNN_TASK.json {"caption": the page's text,
"conversations": [...], "task", "page", "source"}, the folder input of scripts.build_shards:

- NNNNNN_element: the screenshot with a red frame around one element (picked by the seed) -> "What is the HTML
  of the marked element?" -> its outerHTML, each whitespace run made one space;
- NNNNNN_text: the unmarked screenshot -> "Read all the text on this page." -> document.body.innerText, each
  whitespace run made one space.

The caption (what build_shards' caption rules judge) is the page's text for both: the HTML target would be
dropped by the rules' HTML check (so an element sample of a page without text is dropped there as caption:empty,
and one of a page showing a URL or a tag as url / html). Then scripts.build_shards curates OUT/raw into
OUT/shards with --config (default configs/curation_rendered.yaml).

Writes OUT/build_status.jsonl (one row per sample: id, page, task, source, status ok|error, reason: a page that
does not load within --timeout seconds, a file that is not UTF-8, no markable element, empty page text, content
larger than the viewport, a browser failure), OUT/preview.png (the first samples of each task, their targets as
titles) and OUT/report.json, last: rendered + errors == 2 x pages, and the shard build's kept + dropped + error ==
rendered. Targets are the same for the same seed with the same Chromium (the report names its version); PNG bytes
may differ between Chromium versions. A rerun with the same arguments resumes (rendering is skipped once
OUT/render.json exists); other arguments, or other --html files, over the same OUT are refused.
Exit code 2, with one line: bad arguments, an --html folder without *.html files, chromium or chromedriver
missing (the apt packages to install), an OUT holding another build, or a shard build error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from scripts import _rendered

WIDTH, HEIGHT = 640, 480
TASKS = ("element", "text")
DEFAULT_N = 1000
PREVIEW_PER_TASK = 3


class BuildScreenshotsError(_rendered.RenderedBuildError):
    """A build that cannot start: an --html folder without pages, no browser, an OUT holding another build."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 600]")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _rendered.OneLineParser(prog="python -m scripts.build_screenshots", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT")
    p.add_argument("--html", default=None, metavar="DIR", help="render these *.html pages instead of templates")
    p.add_argument("--n", type=_rendered.whole(1), default=None,
                   help=f"pages (default: {DEFAULT_N} templates, or every --html page)")
    p.add_argument("--seed", type=_rendered.whole(0), default=0, help="same seed, same pages and marks (default 0)")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds a page may take to load (default 10)")
    p.add_argument("--config", default=str(_rendered.DEFAULT_CONFIG), help="the shard build's curation YAML")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    return p


def html_pages(folder: str, n: int | None) -> list[Path]:
    """The first ``n`` (all: None) *.html files of ``folder``, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise BuildScreenshotsError(f"--html {folder} is not a folder")
    pages = sorted(p for p in root.iterdir() if p.suffix.lower() == ".html" and p.is_file())
    if not pages:
        raise BuildScreenshotsError(f"--html {folder} holds no *.html file")
    return pages[:n]


def _error_rows(key: str, source: str, reason: str) -> list[dict]:
    return [{"id": f"{key}_{task}", "page": key, "task": task, "source": source, "status": "error", "reason": reason}
            for task in TASKS]


def _one_line(e: Exception) -> str:
    text = getattr(e, "msg", None) or str(e)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _page(browser, raw: Path, key: str, source: str, url: str, seed: int, index: int, timeout: float) -> list[dict]:
    """Shoot one page into ``raw`` -> its two status rows; a hung or dead browser is restarted."""
    from selenium.common.exceptions import TimeoutException, WebDriverException

    from synthetic.screenshots import page_rng, shoot

    try:
        shot = shoot(browser.driver, url, page_rng(seed, index), WIDTH, HEIGHT)
    except TimeoutException:
        browser.restart()  # the renderer may still be spinning: a fresh browser for the next page
        return _error_rows(key, source, f"the page did not render within {timeout:g} s")
    except WebDriverException as e:
        browser.restart()
        return _error_rows(key, source, f"the browser failed on this page: {_one_line(e)}")
    rows = []
    for task in TASKS:
        error, png = (shot.element_error, shot.marked_png) if task == "element" else (shot.text_error, shot.png)
        row = {"id": f"{key}_{task}", "page": key, "task": task, "source": source, "status": "ok", "reason": None}
        if error is not None:
            rows.append({**row, "status": "error", "reason": error})
            continue
        (raw / f"{key}_{task}.png").write_bytes(png)
        sidecar = {"caption": shot.text, "conversations": shot.conversation(task), "task": task, "page": key,
                   "source": source}
        (raw / f"{key}_{task}.json").write_text(json.dumps(sidecar) + "\n")
        rows.append(row)
    return rows


def render_raw(out: Path, pages: list[Path] | int, seed: int, timeout: float) -> tuple[list[dict], dict]:
    """Render every page (given files, or that many templates) into ``out/raw`` -> (status rows, browser info)."""
    from common.browser import BrowserError, Chromium
    from synthetic.screenshots import template_page

    try:
        browser = Chromium(WIDTH, HEIGHT, timeout)
    except BrowserError as e:
        raise BuildScreenshotsError(str(e)) from None
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
            for i in range(pages if isinstance(pages, int) else len(pages)):
                key = f"{i:06d}"
                if isinstance(pages, int):
                    page = template_page(seed, i)
                    path, source = Path(tmp) / f"{key}.html", f"template:{'+'.join(page.blocks)}"
                    path.write_text(page.html, encoding="utf-8")
                else:
                    path, source = pages[i].resolve(), pages[i].name
                    data = path.read_bytes()
                    try:
                        data.decode("utf-8-sig")
                    except UnicodeDecodeError as e:
                        rows += _error_rows(key, source, f"not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                                                         f"{e.start})")
                        continue
                rows += _page(browser, raw, key, source, path.as_uri(), seed, i, timeout)
        info = {"chromium": browser.version, "browser_starts": browser.starts}
    except BrowserError as e:  # a restart after a hung page failed: no browser left to go on with
        raise BuildScreenshotsError(f"chromium could not be restarted: {e}") from None
    finally:
        browser.close()
    return rows, info


def _preview(out: Path, rows: list[dict]) -> str | None:
    from synthetic.charts import short_target

    grid = []
    for task in TASKS:
        ok = [r["id"] for r in rows if r["task"] == task and r["status"] == "ok"][:PREVIEW_PER_TASK]
        grid.append([((out / "raw" / f"{k}.png").read_bytes(),
                      f"{task}: {short_target(_target(out, k), 32)}") for k in ok])
    return _rendered.write_preview(out, grid)


def _target(out: Path, key: str) -> str:
    return json.loads((out / "raw" / f"{key}.json").read_text())["conversations"][1]["content"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, pages: list[Path] | int, seed: int, timeout: float, config: str, quiet: bool) -> dict | int:
    """Render (or resume), curate, preview, report -> the report, or build_shards' exit code when it failed."""
    given = not isinstance(pages, int)
    n_pages = len(pages) if given else pages
    settings = {"pages": n_pages, "seed": seed, "timeout": timeout, "viewport": [WIDTH, HEIGHT],
                "html": [[p.name, _digest(p)] for p in pages] if given else None}

    def render() -> list[dict]:
        rows, info = render_raw(out, pages, seed, timeout)
        _rendered.write_atomic(out / "browser.json", json.dumps(info) + "\n")
        return rows

    rows = _rendered.render_or_resume(out, settings, render)
    info = json.loads((out / "browser.json").read_text())
    rendered = sum(r["status"] == "ok" for r in rows)
    shards = _rendered.shard_counts(out, config, quiet, rendered)
    if isinstance(shards, int):
        return shards
    by_task, errors = _rendered.status_counts(rows, "task", TASKS), _rendered.error_counts(rows)
    samples = len(TASKS) * n_pages
    report = {"pages": n_pages, "samples": samples, "seed": seed, "source": "html" if given else "templates",
              "rendered": rendered, "errors": len(rows) - rendered, "by_task": by_task, "error_reasons": errors,
              **info, **_rendered.outputs(out, shards, _preview(out, rows))}
    return _rendered.write_report(out, report, rows, samples, "samples")


def _summary(report: dict) -> str:
    return (f"{report['pages']} pages -> {report['samples']} samples: {report['rendered']} rendered, "
            f"{report['errors']} errors; " + _rendered.shards_line(report))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def start() -> dict | int:
        pages = html_pages(args.html, args.n) if args.html is not None else (args.n or DEFAULT_N)
        if not Path(args.config).is_file():
            raise BuildScreenshotsError(f"--config {args.config} not found")
        return build(Path(args.out), pages, args.seed, args.timeout, args.config, args.json)

    return _rendered.run_build("build_screenshots", start, _summary, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
