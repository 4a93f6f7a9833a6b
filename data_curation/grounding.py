"""Visual grounding samples from detection annotations (Llama 3 sec. 7.1's annealing data: noun phrases linked
to boxes, as text coordinates and as set-of-marks overlays), for scripts.build_grounding.

Input: the COCO detection layout: ``images: [{id, file_name, width, height}]``, ``annotations: [{id, image_id,
bbox: [x, y, w, h], category_id, phrase | caption (optional)}]``, ``categories: [{id, name}]``. A region's
phrase is its annotation's ``phrase`` (or ``caption``), else its category's name.

Box convention (Qwen-VL's: corners normalised to 0..1000, as text; Shikra writes [0, 1] decimals and Kosmos-2
location tokens on a 32 x 32 grid, resolution-free alike): a box is written ``<box>[x1, y1, x2, y2]</box>``, the
top-left and bottom-right corners in pixel-edge coordinates of the ORIGINAL image
(as decoded upright, EXIF applied, which is what the trainer decodes: the whole image is ``[0, 0, W, H]``),
each divided by the image's width or height, times 1000, rounded half up to an integer in 0..1000. So the
whole image is ``[0, 0, 1000, 1000]`` whatever its size or aspect; the tiling transform never changes these
numbers (``vision.tiling.box_to_tiles`` maps a pixel box onto the tiles when a model needs that).

Samples (the trainer's conversation format, ``<|image|>`` in the first user turn):
  boxes: the image itself; "Where is the {phrase}?" -> its box (several regions with the same phrase: "Where
         is each {phrase}?" -> their boxes, in reading order), and per region "What is in <box>[...]</box>?" ->
         its phrase;
  marks: a copy with each region's box outlined and numbered (set-of-marks; mark k has colour PALETTE[(k - 1) %
         10], its number on a label at the box's top-left corner, inside the box when it fits, else just above);
         "What is mark {k}?" -> phrase, "Which mark is the {phrase}?" -> "k" ("Which marks are the {phrase}?" ->
         "2, 5" when several).
The seed fixes the order of the turns and which region gets which mark number: image ``index`` of ``seed``
draws from its own ``random.Random``, so a sample is the same whatever else is in the file.

Bad input is a `RecordError` with a code and a reason naming the record: a box extending beyond its image (not
clipped: a box that does not fit its image says the annotation or the size is wrong), a zero or negative width
or height, a bbox that is not four finite numbers, an unknown image_id or category_id, a missing or undecodable
image file, a file whose size is not the one the JSON gives, an image with no valid annotation. A file that is not
the COCO layout at all is one `CocoLayoutError`.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from media.image import ImageLoadError, load_image_bytes

MODES = ("boxes", "marks")
BOX_SCALE = 1000
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")  # copied as they are; other formats are written as PNG
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (255, 225, 25))
_BOX_TEXT = re.compile(r"<box>\[\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\]</box>")


class CocoLayoutError(ValueError):
    """The file is not the COCO detection layout (or not JSON): the whole job cannot start."""


class RecordError(ValueError):
    """One image or annotation that cannot be used: ``code`` (a short kind, counted in the report) and the
    reason (names the record)."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Coco:
    images: list[dict]
    annotations: list[dict]
    categories: dict[Any, str]  # id -> name


@dataclass(frozen=True)
class Region:
    annotation_id: Any
    phrase: str
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) pixels of the original image


@dataclass(frozen=True)
class GroundingSample:
    key: str
    mode: str  # boxes | marks
    image: bytes  # encoded, ``ext``
    ext: str
    conversation: list[dict[str, str]]
    meta: dict  # image_id, regions [{annotation_id, phrase, box (normalised), mark (marks only)}]


# -------------------------------------------------------------------------------------------- layout


def _is_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def load_coco(path: str | Path) -> Coco:
    """Read and check the top-level COCO layout: ``images``, ``annotations`` and ``categories`` lists of objects
    with unique ids (categories with a name); anything else is a `CocoLayoutError` naming the field. The
    fields of each image and annotation are checked per record (`check_annotation`, `load_image_file`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CocoLayoutError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CocoLayoutError(f"{path} is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise CocoLayoutError(f"{path} is a JSON {type(data).__name__}, not the COCO object with images, "
                              "annotations and categories")
    for field in ("images", "annotations", "categories"):
        if not isinstance(data.get(field), list):
            what = "missing" if field not in data else f"a {type(data[field]).__name__}"
            raise CocoLayoutError(f"{path}: '{field}' is {what}, not a list (COCO layout: images, annotations, "
                                  "categories)")
        seen = set()
        for i, rec in enumerate(data[field]):
            if not isinstance(rec, dict) or not _is_id(rec.get("id")):
                raise CocoLayoutError(f"{path}: {field}[{i}] is not an object with an int or string 'id'")
            if rec["id"] in seen:
                raise CocoLayoutError(f"{path}: {field}[{i}] repeats id {rec['id']!r}")
            seen.add(rec["id"])
    categories = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat.get("name"), str) or not cat["name"].strip():
            raise CocoLayoutError(f"{path}: categories[{i}] has no 'name' string")
        categories[cat["id"]] = " ".join(cat["name"].split())
    return Coco(data["images"], data["annotations"], categories)


# ------------------------------------------------------------------------------------------- records


def image_size(image: dict) -> tuple[int, int]:
    """(width, height) of an image record; not positive integers: a `RecordError`."""
    w, h = image.get("width"), image.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise RecordError("bad_image_record", f"image {image['id']!r}: width {w!r} / height {h!r} are not positive "
                                              "integers")
    return w, h


def check_annotation(ann: dict, categories: dict, size: tuple[int, int]) -> Region:
    """An annotation of an image of ``size`` (width, height) -> its `Region`; a bad one: `RecordError`."""
    aid = ann["id"]
    cat = ann.get("category_id")
    if not _is_id(cat) or cat not in categories:
        raise RecordError("unknown_category_id", f"annotation {aid!r}: unknown category_id {cat!r}")
    phrase = ann.get("phrase", ann.get("caption"))
    if phrase is not None and (not isinstance(phrase, str) or not phrase.strip()):
        raise RecordError("bad_phrase", f"annotation {aid!r}: phrase {phrase!r} is not a non-empty string")
    bbox = ann.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise RecordError("bad_bbox", f"annotation {aid!r}: bbox {bbox!r} is not [x, y, w, h], four finite numbers")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise RecordError("empty_box", f"annotation {aid!r}: box {bbox} has zero or negative width or height")
    width, height = size
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise RecordError("box_outside_image", f"annotation {aid!r}: box {bbox} extends beyond its {width}x{height} "
                                               f"image {ann.get('image_id')!r}")
    return Region(aid, " ".join((phrase or categories[cat]).split()), (x, y, x + w, y + h))


def load_image_file(image: dict, root: Path) -> tuple[bytes, Image.Image]:
    """The image record's file under ``root`` -> (its bytes, decoded upright RGB); a missing, undecodable or
    other-size file, or a file_name leaving ``root``: `RecordError`."""
    iid, name = image["id"], image.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise RecordError("bad_image_record", f"image {iid!r}: file_name {name!r} is not a string")
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise RecordError("bad_image_record", f"image {iid!r}: file_name {name!r} leaves the images folder")
    if not path.is_file():
        raise RecordError("missing_image_file", f"image {iid!r}: missing image file {name}")
    data = path.read_bytes()
    try:
        img = load_image_bytes(data, name=name)
    except ImageLoadError as e:
        raise RecordError("undecodable_image", f"image {iid!r}: undecodable image file {e}") from None
    if img.size != image_size(image):
        raise RecordError("image_size_mismatch", f"image {iid!r}: {name} is {img.width}x{img.height}, the JSON "
                                                 f"says {image['width']}x{image['height']}")
    return data, img


# ------------------------------------------------------------------------------------------- samples


def normalise_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel (x1, y1, x2, y2) -> integers 0..1000 of the image's width / height (rounded half up)."""
    x1, y1, x2, y2 = box
    return tuple(math.floor(BOX_SCALE * v / s + 0.5) for v, s in ((x1, width), (y1, height),
                                                                   (x2, width), (y2, height)))


def box_text(nbox: tuple[int, int, int, int]) -> str:
    return f"<box>[{nbox[0]}, {nbox[1]}, {nbox[2]}, {nbox[3]}]</box>"


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every ``<box>[x1, y1, x2, y2]</box>`` in ``text`` -> normalised boxes, in order (a model's answer)."""
    return [tuple(int(v) for v in m.groups()) for m in _BOX_TEXT.finditer(text)]


def _groups(regions: list[Region]) -> dict[str, list[int]]:
    """Phrase (first spelling, matched case-insensitively) -> indices of its regions."""
    groups: dict[str, list[int]] = {}
    spelling: dict[str, str] = {}
    for i, r in enumerate(regions):
        groups.setdefault(spelling.setdefault(r.phrase.lower(), r.phrase), []).append(i)
    return groups


def _conversation(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for k, (q, a) in enumerate(turns):
        out += [{"role": "user", "content": "<|image|>" * (k == 0) + q}, {"role": "assistant", "content": a}]
    return out


def boxes_turns(regions: list[Region], width: int, height: int, rng: random.Random) -> list[tuple[str, str]]:
    """Where-is turns per phrase (boxes in reading order) and what-is-in turns per region, shuffled by ``rng``."""
    nboxes = [normalise_box(r.box, width, height) for r in regions]
    turns = []
    for phrase, idx in _groups(regions).items():
        boxes = sorted((nboxes[i] for i in idx), key=lambda b: (b[1], b[0], b))  # reading order: top, then left
        q = f"Where is the {phrase}?" if len(idx) == 1 else f"Where is each {phrase}?"
        turns.append((q, "".join(box_text(b) for b in boxes)))
    turns += [(f"What is in {box_text(b)}?", r.phrase) for r, b in zip(regions, nboxes)]
    rng.shuffle(turns)
    return turns


def marks_turns(regions: list[Region], marks: list[int], rng: random.Random) -> list[tuple[str, str]]:
    """What-is-mark turns per region and which-mark turns per phrase, shuffled by ``rng``."""
    turns = [(f"What is mark {k}?", r.phrase) for r, k in zip(regions, marks)]
    for phrase, idx in _groups(regions).items():
        ks = sorted(marks[i] for i in idx)
        q = f"Which mark is the {phrase}?" if len(ks) == 1 else f"Which marks are the {phrase}?"
        turns.append((q, ", ".join(map(str, ks))))
    rng.shuffle(turns)
    return turns


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same glyphs on every machine


def draw_marks(img: Image.Image, boxes: list[tuple[float, float, float, float]], labels: list[str] | None = None,
               colours: list[tuple[int, int, int]] | None = None) -> Image.Image:
    """A copy of ``img`` with each box outlined (inside its edges) and, with ``labels``, a filled label with
    the text at its top-left corner (inside the box when it fits, else just above it). Colours default to
    PALETTE in turn."""
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    line = max(2, round(side / 160))
    font = _font(max(10, side // 24))
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        colour = (colours or PALETTE)[i % len(colours or PALETTE)]
        px1, py1, px2, py2 = round(x1), round(y1), max(round(x2), round(x1) + 1), max(round(y2), round(y1) + 1)
        draw.rectangle([px1, py1, px2 - 1, py2 - 1], outline=colour, width=line)
        if labels is None:
            continue
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), labels[i], font=font)
        pad = max(1, line // 2)
        w, h = tx2 - tx1 + 2 * pad, ty2 - ty1 + 2 * pad
        top = py1 if (w <= px2 - px1 and h <= py2 - py1) or py1 < h else py1 - h
        draw.rectangle([px1, top, px1 + w - 1, top + h - 1], fill=colour)
        ink = (0, 0, 0) if sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114))) > 140 else (255, 255, 255)
        draw.text((px1 + pad - tx1, top + pad - ty1), labels[i], font=font, fill=ink)
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # PIL writes no time chunk: same pixels, same bytes
    return buf.getvalue()


def image_samples(key: str, image: dict, data: bytes, img: Image.Image, regions: list[Region],
                  modes: tuple[str, ...], seed: int, index: int) -> list[GroundingSample]:
    """One sample per mode for an image with its valid ``regions`` (``index``: its place in the file, which with
    ``seed`` picks its random stream)."""
    width, height = img.size
    rng = random.Random(f"grounding:{seed}:{index}")
    order = list(range(len(regions)))
    rng.shuffle(order)
    marks = [0] * len(regions)
    for k, i in enumerate(order, 1):
        marks[i] = k
    meta_regions = [{"annotation_id": r.annotation_id, "phrase": r.phrase,
                     "box": list(normalise_box(r.box, width, height))} for r in regions]
    out = []
    for mode in modes:
        if mode == "boxes":
            name = image["file_name"].lower()
            ext = next((e for e in IMAGE_EXTS if name.endswith(e)), None)
            encoded, ext = (data, ext[1:]) if ext else (png_bytes(img), "png")
            turns = boxes_turns(regions, width, height, rng)
            meta = {"image_id": image["id"], "regions": meta_regions}
        elif mode == "marks":
            by_mark = sorted(range(len(regions)), key=marks.__getitem__)
            drawn = draw_marks(img, [regions[i].box for i in by_mark], [str(marks[i]) for i in by_mark])
            encoded, ext = png_bytes(drawn), "png"
            turns = marks_turns(regions, marks, rng)
            meta = {"image_id": image["id"], "regions": [{**m, "mark": k} for m, k in zip(meta_regions, marks)]}
        else:
            raise ValueError(f"unknown grounding mode {mode!r}; choose from {', '.join(MODES)}")
        out.append(GroundingSample(f"{key}_{mode}", mode, encoded, ext, _conversation(turns), meta))
    return out


def ground(coco: Coco, root: Path, modes: tuple[str, ...], seed: int) -> Iterator[tuple[list[dict], list[GroundingSample]]]:
    """Every record of ``coco`` -> (status rows, samples), one image at a time in file order (the image's row,
    then its annotations' rows), then the rows of annotations whose image_id is no image. Rows: ``{"record":
    "image" | "annotation", "id", "image_id" (annotations), "status": "ok" | "error", "error": code, "reason"}``;
    an annotation is ok when it is in its image's samples."""
    images = {img["id"]: img for img in coco.images}
    per_image: dict[Any, list[dict]] = {}
    orphans = []
    for ann in coco.annotations:
        iid = ann.get("image_id")
        if _is_id(iid) and iid in images:
            per_image.setdefault(iid, []).append(ann)
        else:
            orphans.append(ann)
    for index, image in enumerate(coco.images):
        anns = per_image.get(image["id"], [])
        ann_rows, regions = [], []
        size, size_error = None, None
        try:
            size = image_size(image)
        except RecordError as e:
            size_error = e
        for ann in anns:
            try:
                if size_error is not None:
                    raise RecordError("image_error", f"annotation {ann['id']!r}: its image {image['id']!r} is bad "
                                                     f"({size_error.reason})")
                regions.append(check_annotation(ann, coco.categories, size))
                ann_rows.append(_row("annotation", ann["id"], None, image["id"]))
            except RecordError as e:
                ann_rows.append(_row("annotation", ann["id"], e, image["id"]))
        try:
            if size_error is not None:
                raise size_error
            data, img = load_image_file(image, root)
            if not regions:
                raise RecordError("no_valid_annotation", f"image {image['id']!r}: no valid annotation "
                                                         f"({len(anns)} given)")
            samples = image_samples(f"{index:06d}", image, data, img, regions, modes, seed, index)
        except RecordError as e:
            for row in ann_rows:
                if row["status"] == "ok":
                    row.update(status="error", error="image_error",
                               reason=f"annotation {row['id']!r}: its image is unusable ({e.reason})")
            yield [_row("image", image["id"], e), *ann_rows], []
            continue
        yield [{**_row("image", image["id"], None), "samples": [s.key for s in samples]}, *ann_rows], samples
    yield [_row("annotation", ann["id"], RecordError("unknown_image_id", f"annotation {ann['id']!r}: unknown "
                                                     f"image_id {ann.get('image_id')!r}"), ann.get("image_id"))
           for ann in orphans], []


def _row(record: str, rid: Any, err: RecordError | None, image_id: Any = None) -> dict:
    row = {"record": record, "id": rid}
    if record == "annotation":
        row["image_id"] = image_id
    return {**row, "status": "error" if err else "ok", "error": err.code if err else None,
            "reason": err.reason if err else None}
