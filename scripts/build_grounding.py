"""Visual grounding conversation shards from detection annotations (the annealing set's grounding data).

    python -m scripts.build_grounding ANNOTATIONS.json OUT [--images DIR] [--mode boxes|marks|both] [--seed S]
        [--config CURATION_YAML] [--json]

ANNOTATIONS.json is the COCO detection layout (images, annotations with bbox [x, y, w, h] and an optional phrase
or caption, categories); the image files are under --images (default: the JSON's folder). Each image with at
least one valid annotation becomes one sample per mode in OUT/raw (data_curation/grounding.py): ``boxes``, the
image with "Where is the dog?" -> ``<box>[x1, y1, x2, y2]</box>`` (corners as integers 0..1000 of the original
image's width and height) and "What is in <box>[...]</box>?" -> the phrase; ``marks``, a copy with numbered
marks drawn on the regions with "What is mark 2?" -> the phrase and "Which mark is the dog?" -> "2". Each
sample is NNNNNN_<mode>.<ext> + a sidecar NNNNNN_<mode>.json {"caption": the phrases, "conversations",
"mode", "image_id", "regions"}, the folder input of scripts.build_shards, which curates OUT/raw into
OUT/shards with --config (default configs/curation_rendered.yaml: image checks on, caption stages relaxed).

Writes OUT/build_status.jsonl (one row per image and per annotation of the JSON: record, id, status ok|error,
error code and reason: a box extending beyond its image (never clipped), a zero or negative width or height,
an unknown image_id or category_id, a missing or undecodable image file, a file of another size than the JSON
says, an image with no valid annotation), OUT/preview.png (the first images in each mode) and OUT/report.json,
last: per record kind ok + error == the JSON's count, samples == ok images x modes, and the shard build's kept
+ dropped + error == samples. Same seed, same bytes. A rerun with the same arguments resumes (sample writing is
skipped once OUT/render.json exists; the shard build resumes itself); other arguments or another ANNOTATIONS
content over the same OUT are refused.
Exit code 2, with one line: bad arguments, a file that is not JSON in the COCO layout, a missing --images
folder, an OUT holding another build, or a shard build error (scripts.build_shards names it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from scripts import _rendered

PREVIEW_IMAGES = 4
MODE_CHOICES = {"boxes": ("boxes",), "marks": ("marks",), "both": ("boxes", "marks")}


def _parser() -> argparse.ArgumentParser:
    p = _rendered.OneLineParser(prog="python -m scripts.build_grounding", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", metavar="ANNOTATIONS.json")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--images", default=None, help="folder the file_names start at (default: the JSON's folder)")
    p.add_argument("--mode", choices=tuple(MODE_CHOICES), default="both",
                   help="boxes as text, set-of-marks images, or one sample of each per image (default both)")
    p.add_argument("--seed", type=_rendered.whole(0), default=0, help="same seed, same samples (default 0)")
    p.add_argument("--config", default=str(_rendered.DEFAULT_CONFIG), help="the shard build's curation YAML")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    return p


def write_raw(out: Path, coco, root: Path, modes: tuple[str, ...], seed: int) -> list[dict]:
    """Every sample into ``out/raw`` (image + sidecar) -> the status rows of every record."""
    from data_curation.grounding import ground

    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows = []
    for record_rows, samples in ground(coco, root, modes, seed):
        rows += record_rows
        for s in samples:
            (raw / f"{s.key}.{s.ext}").write_bytes(s.image)
            phrases = list(dict.fromkeys(r["phrase"] for r in s.meta["regions"]))
            sidecar = {"caption": "; ".join(phrases), "conversations": s.conversation, "mode": s.mode, **s.meta}
            (raw / f"{s.key}.json").write_text(json.dumps(sidecar) + "\n")
    return rows


def _preview(out: Path, rows: list[dict], modes: tuple[str, ...]) -> str | None:
    """The first images, one row per mode: boxes with their boxes outlined (the text answer drawn), marks as
    written; each titled with its first question and answer."""
    from data_curation.grounding import BOX_SCALE, draw_marks, png_bytes
    from media.image import load_image
    from synthetic.charts import short_target

    keys = [k.rsplit("_", 1)[0] for r in rows if r["record"] == "image" and r["status"] == "ok"
            for k in r["samples"][:1]][:PREVIEW_IMAGES]
    grid = []
    for mode in modes:
        cells = []
        for key in keys:
            side = json.loads((out / "raw" / f"{key}_{mode}.json").read_text())
            path = next(p for p in (out / "raw").glob(f"{key}_{mode}.*") if p.suffix != ".json")
            img = load_image(path)  # upright, as the trainer decodes it
            if mode == "boxes":
                img = draw_marks(img, [(b[0] * img.width / BOX_SCALE, b[1] * img.height / BOX_SCALE,
                                        b[2] * img.width / BOX_SCALE, b[3] * img.height / BOX_SCALE)
                                       for b in (r["box"] for r in side["regions"])])
            first = " ".join(t["content"].replace("<|image|>", "") for t in side["conversations"][:2])
            cells.append((png_bytes(img), f"{mode}: {short_target(first, 40)}"))
        grid.append(cells)
    return _rendered.write_preview(out, grid)


def build(annotations: Path, out: Path, root: Path, modes: tuple[str, ...], seed: int, config: str,
          quiet: bool) -> dict | int:
    """Write the samples (or resume), curate, preview, report -> the report, or build_shards' exit code."""
    from data_curation.grounding import CocoLayoutError, load_coco

    try:
        coco = load_coco(annotations)
    except CocoLayoutError as e:
        raise _rendered.RenderedBuildError(str(e)) from None
    settings = {"annotations": str(annotations.resolve()), "sha256": hashlib.sha256(annotations.read_bytes())
                .hexdigest(), "images": str(root.resolve()), "modes": list(modes), "seed": seed}
    rows = _rendered.render_or_resume(out, settings, lambda: write_raw(out, coco, root, modes, seed))
    records = {kind: {"total": n, **{s: sum(r["record"] == kind and r["status"] == s for r in rows)
                                     for s in ("ok", "error")}}
               for kind, n in (("image", len(coco.images)), ("annotation", len(coco.annotations)))}
    samples = {m: sum(k.endswith(f"_{m}") for r in rows if r["record"] == "image" for k in r.get("samples", []))
               for m in modes}
    errors = _rendered.error_counts(rows, "error")
    # every record and sample accounted for: a mismatch is a bug in this job, never a report to write
    for kind, c in records.items():
        if c["ok"] + c["error"] != c["total"] or sum(r["record"] == kind for r in rows) != c["total"]:
            raise RuntimeError(f"{kind} records {c} do not add up")
    if any(n != records["image"]["ok"] for n in samples.values()):
        raise RuntimeError(f"samples per mode {samples} are not one per ok image ({records['image']['ok']})")
    shards = _rendered.shard_counts(out, config, quiet, sum(samples.values()))
    if isinstance(shards, int):
        return shards
    report = {"annotations": str(annotations), "images_dir": str(root), "modes": list(modes), "seed": seed,
              "records": records, "samples": {**samples, "total": sum(samples.values())}, "error_kinds": errors,
              **_rendered.outputs(out, shards, _preview(out, rows, modes))}
    return _rendered.write_report(out, report, rows, len(coco.images) + len(coco.annotations), "records")


def _summary(report: dict) -> str:
    im, an = report["records"]["image"], report["records"]["annotation"]
    return (f"{im['total']} images, {an['total']} annotations -> {im['ok']} images ok ({im['error']} errors), "
            f"{an['ok']} annotations ok ({an['error']} errors), {report['samples']['total']} samples; "
            + _rendered.shards_line(report))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    annotations = Path(args.annotations)
    root = Path(args.images) if args.images is not None else annotations.parent

    def start() -> dict | int:
        if not annotations.is_file():
            raise _rendered.RenderedBuildError(f"ANNOTATIONS {annotations} is not a file")
        if not root.is_dir():
            raise _rendered.RenderedBuildError(f"--images {root} is not a folder")
        if not Path(args.config).is_file():
            raise _rendered.RenderedBuildError(f"--config {args.config} not found")
        return build(annotations, Path(args.out), root, MODE_CHOICES[args.mode], args.seed, args.config, args.json)

    return _rendered.run_build("build_grounding", start, _summary, args.json)

if __name__ == "__main__":
    raise SystemExit(main())
