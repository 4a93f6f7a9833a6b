"""scripts.build_grounding turns a COCO-layout JSON of rendered scenes with known boxes into conversation shards the
trainer's codec decodes: box text equals the normalised truth, each mark is drawn inside its box, every bad record
gives its error row, the counts add up, the same seed gives the same bytes."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from adapters.chat import image_input_id
from data_curation.grounding import PALETTE, CocoLayoutError, load_coco, parse_boxes
from scripts import _rendered, build_grounding
from tests.tiny import conversation_shards

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "bar"}]
SHAPE_FILL = {1: (90, 90, 90), 2: (200, 180, 160), 3: (40, 90, 40)}  # none is a mark colour
# (file, width, height, [(annotation id, category, phrase or None, (x, y, w, h))]): the good scenes
SCENES = [
    ("a.png", 160, 120, [(1, 1, None, (10, 12, 50, 40)), (2, 2, "grey disc", (90, 50, 60, 60))]),
    ("b.jpg", 96, 200, [(3, 3, None, (8, 100, 70, 90)), (4, 1, None, (30, 10, 40, 40)),
                        (5, 1, None, (50, 60, 40, 30))]),  # two squares: "Where is each square?"
    ("c.png", 300, 150, [(6, 2, None, (0, 0, 300, 150)), (7, 3, "the bar", (200, 20, 80.5, 100))]),
]


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _members(tar: Path) -> list[tuple[str, bytes | dict]]:
    with tarfile.open(tar) as f:
        out = [(m.name, f.extractfile(m).read()) for m in f.getmembers()]
    return [(n, {k: v for k, v in json.loads(d).items() if k != "source"} if n.endswith(".json") else d)
            for n, d in out]


def expected_box(bbox, width: int, height: int) -> list[int]:
    """Independent of the module: corners x 1000 / side, half up, by exact fractions."""
    from fractions import Fraction

    x, y, w, h = (Fraction(str(v)) for v in bbox)
    return [int((1000 * v / s) + Fraction(1, 2)) for v, s in ((x, width), (y, height), (x + w, width),
                                                              (y + h, height))]


def make_dataset(root: Path) -> Path:
    """Rendered scenes plus one record of every bad kind; -> the JSON's path."""
    images, anns = [], []
    for iid, (name, width, height, shapes) in enumerate(SCENES, 1):
        img = Image.new("RGB", (width, height), (235, 235, 245))
        draw = ImageDraw.Draw(img)
        for _, cat, _, (x, y, w, h) in shapes:
            (draw.ellipse if cat == 2 else draw.rectangle)([x, y, x + w - 1, y + h - 1], fill=SHAPE_FILL[cat])
        img.save(root / name, quality=95)
        images.append({"id": iid, "file_name": name, "width": width, "height": height})
        anns += [{"id": aid, "image_id": iid, "category_id": cat, "bbox": list(bbox), **({"phrase": p} if p else {})}
                 for aid, cat, p, bbox in shapes]
    Image.new("RGB", (100, 100), (235, 235, 245)).save(root / "d.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images += [{"id": 4, "file_name": "d.png", "width": 100, "height": 100},       # only bad annotations
               {"id": 5, "file_name": "gone.png", "width": 100, "height": 100},    # missing file
               {"id": 6, "file_name": "broken.jpg", "width": 100, "height": 100},  # undecodable
               {"id": 7, "file_name": "d.png", "width": 100, "height": 100}]       # no annotation at all
    anns += [{"id": 20, "image_id": 4, "category_id": 1, "bbox": [60, 10, 50, 20]},   # beyond the right edge
             {"id": 21, "image_id": 4, "category_id": 1, "bbox": [10, 10, -5, 20]},   # negative width
             {"id": 22, "image_id": 4, "category_id": 1, "bbox": [10, 10, 20, 0]},    # zero area
             {"id": 23, "image_id": 4, "category_id": 9, "bbox": [10, 10, 20, 20]},   # unknown category
             {"id": 24, "image_id": 99, "category_id": 1, "bbox": [10, 10, 20, 20]},  # unknown image
             {"id": 25, "image_id": 5, "category_id": 1, "bbox": [10, 10, 20, 20]},
             {"id": 26, "image_id": 6, "category_id": 1, "bbox": [10, 10, 20, 20]}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grounding")
    (tmp / "data").mkdir()
    ann = make_dataset(tmp / "data")
    cfg = yaml.safe_load(Path(_rendered.DEFAULT_CONFIG).read_text())
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "workers": 1}))  # the shipped config, in-process
    args = [str(ann), str(tmp / "out"), "--seed", "3", "--config", str(tmp / "cfg.yaml"), "--json"]
    assert build_grounding.main(args) == 0
    return tmp, args


def test_every_bad_record_has_its_error_row_and_the_counts_add_up(built):
    tmp, _ = built
    out = tmp / "out"
    status = {(r["record"], r["id"]): r for r in rows(out / "build_status.jsonl")}
    assert len(status) == 7 + 14
    want = {("annotation", 20): "box_outside_image", ("annotation", 21): "empty_box",
            ("annotation", 22): "empty_box", ("annotation", 23): "unknown_category_id",
            ("annotation", 24): "unknown_image_id", ("annotation", 25): "image_error",
            ("annotation", 26): "image_error", ("image", 4): "no_valid_annotation",
            ("image", 5): "missing_image_file", ("image", 6): "undecodable_image", ("image", 7): "no_valid_annotation"}
    assert {k: r["error"] for k, r in status.items() if r["status"] == "error"} == want
    assert "annotation 20" in status["annotation", 20]["reason"] and "beyond" in status["annotation", 20]["reason"]
    assert "gone.png" in status["image", 5]["reason"]
    assert status["image", 1]["samples"] == ["000000_boxes", "000000_marks"]
    report = json.loads((out / "report.json").read_text())
    assert report["records"] == {"image": {"total": 7, "ok": 3, "error": 4},
                                 "annotation": {"total": 14, "ok": 7, "error": 7}}
    assert report["samples"] == {"boxes": 3, "marks": 3, "total": 6}
    assert report["error_kinds"] == {"box_outside_image": 1, "empty_box": 2, "unknown_category_id": 1,
                                     "unknown_image_id": 1, "image_error": 2, "no_valid_annotation": 2,
                                     "missing_image_file": 1, "undecodable_image": 1}
    s = report["shards"]
    assert s["inputs"] == 6 and s["kept"] + s["dropped"] + s["error"] == 6 and s["kept"] == 6
    assert Image.open(out / "preview.png").format == "PNG"


def test_shards_decode_and_box_text_is_the_normalised_truth(built, tmp_path):
    tmp, _ = built
    out = tmp / "out"
    raws, metas, tok, codec = conversation_shards(out / "shards", tmp_path / "tok")
    assert len(raws) == 6
    texts = [t["content"].replace("<|image|>", "") for m in metas for t in m["conversations"]]
    for raw in raws:
        ex = codec.decode(raw)
        assert len(ex.media) == 1 and ex.tokens.count(image_input_id(tok)) == 1
    truth = {(iid, aid): (expected_box(bbox, w, h), phrase or CATEGORIES[cat - 1]["name"])
             for iid, (_, w, h, shapes) in enumerate(SCENES, 1) for aid, cat, phrase, bbox in shapes}
    assert sorted((m["image_id"], m["mode"]) for m in metas) == [(i, m) for i in (1, 2, 3) for m in ("boxes", "marks")]
    for m in metas:
        turns = m["conversations"]
        assert turns[0]["content"].startswith("<|image|>") and [t["role"] for t in turns[::2]] == ["user"] * (
            len(turns) // 2)
        qa = {q["content"].replace("<|image|>", ""): a["content"] for q, a in zip(turns[::2], turns[1::2])}
        mine = {aid: truth[m["image_id"], aid] for (iid, aid) in truth if iid == m["image_id"]}
        if m["mode"] == "boxes":
            for aid, (box, phrase) in mine.items():
                text = f"<box>[{', '.join(map(str, box))}]</box>"
                assert qa[f"What is in {text}?"] == phrase
                same = [b for b, p in mine.values() if p == phrase]
                where = qa[f"Where is the {phrase}?" if len(same) == 1 else f"Where is each {phrase}?"]
                assert sorted(parse_boxes(where)) == sorted(map(tuple, same))
            assert len(qa) == len(mine) + len({p for _, p in mine.values()})
        else:
            marks = {r["annotation_id"]: r["mark"] for r in m["regions"]}
            assert sorted(marks.values()) == list(range(1, len(mine) + 1))
            for aid, (_, phrase) in mine.items():
                assert qa[f"What is mark {marks[aid]}?"] == phrase
                same = sorted(marks[a] for a, (_, p) in mine.items() if p == phrase)
                which = f"Which mark is the {phrase}?" if len(same) == 1 else f"Which marks are the {phrase}?"
                assert qa[which] == ", ".join(map(str, same))
            assert len(qa) == len(mine) + len({p for _, p in mine.values()})
    assert "Where is the grey disc?" in texts and "Where is each square?" in texts


def test_each_mark_is_drawn_inside_its_box(built):
    tmp, _ = built
    raw = tmp / "out" / "raw"
    for index, (name, width, height, shapes) in enumerate(SCENES):
        side = json.loads((raw / f"{index:06d}_marks.json").read_text())
        assert side["mode"] == "marks" and side["caption"]
        px = np.asarray(Image.open(raw / f"{index:06d}_marks.png").convert("RGB")).astype(int)
        assert px.shape == (height, width, 3)
        by_id = {aid: bbox for aid, _, _, bbox in shapes}
        for region in side["regions"]:
            x, y, w, h = by_id[region["annotation_id"]]
            colour = np.array(PALETTE[(region["mark"] - 1) % len(PALETTE)])
            mask = (px == colour).all(-1)
            inside = np.zeros_like(mask)
            inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
            assert mask[inside].sum() > 2 * (w + h), (name, region)  # the outline (and label) in the box
            if len({PALETTE[(r["mark"] - 1) % len(PALETTE)] for r in side["regions"]}) == len(side["regions"]):
                # no other region has this colour: none of it outside this box, except where boxes overlap
                others = np.zeros_like(mask)
                for r in side["regions"]:
                    if r is not region:
                        ox, oy, ow, oh = by_id[r["annotation_id"]]
                        others[int(oy):int(np.ceil(oy + oh)), int(ox):int(np.ceil(ox + ow))] = True
                assert not mask[~inside & ~others].any(), (name, region)
            # the box edges are drawn: its left column and top row carry the colour along most of their length
            assert mask[int(y):int(y + h), int(x)].mean() > 0.9 and mask[int(y), int(x):int(x + w)].mean() > 0.9


def test_same_seed_same_bytes_resume_and_other_arguments_refused(built, capsys):
    tmp, args = built
    out = tmp / "out"
    again = [args[0], str(tmp / "again"), *args[2:]]
    assert build_grounding.main(again) == 0
    capsys.readouterr()
    assert files(out / "raw") == files(tmp / "again" / "raw")
    tars = sorted(p.name for p in (out / "shards").glob("shard_*.tar"))
    assert tars and tars == sorted(p.name for p in (tmp / "again" / "shards").glob("shard_*.tar"))
    for name in tars:  # the shards too, but for the source path build_shards records
        assert _members(out / "shards" / name) == _members(tmp / "again" / "shards" / name)
    assert (out / "build_status.jsonl").read_bytes() == (tmp / "again" / "build_status.jsonl").read_bytes()
    # another seed: another order of turns / marks over the same records
    from data_curation.grounding import ground

    coco = load_coco(args[0])
    a = [s.conversation for _, ss in ground(coco, Path(args[0]).parent, ("marks",), 3) for s in ss]
    b = [s.conversation for _, ss in ground(coco, Path(args[0]).parent, ("marks",), 4) for s in ss]
    assert len(a) == len(b) == 3 and a != b
    # a rerun resumes; other arguments or another JSON over the same OUT: one line, exit 2
    report = json.loads((out / "report.json").read_text())
    assert build_grounding.main(args) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == report["shards"]
    for other in ([*args, "--mode", "boxes"], [*args[:2], "--seed", "4", *args[4:]]):
        assert build_grounding.main(other) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("build_grounding:") and "other arguments" in err and "\n" not in err


def test_not_coco_and_bad_arguments_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_grounding.main(["--help"])
    assert e.value.code == 0 and "build_grounding ANNOTATIONS.json OUT" in capsys.readouterr().out
    (tmp_path / "a.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    for bad, words in ((["--mode", "circles"], "--mode"), (["--seed", "-1"], "--seed"), ([], "required")):
        with pytest.raises(SystemExit) as e:
            build_grounding.main([str(tmp_path / "a.json"), str(tmp_path / "o")] * bool(bad) + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("build_grounding:") and words in err and err.count("\n") == 1
    for content, words in (("[1, 2]", "not the COCO object"), ('{"images": [], "annotations": {}}', "'annotations'"),
                           ("{not json", "is not JSON"),
                           (json.dumps({"images": [{"id": 1}, {"id": 1}], "annotations": [], "categories": []}),
                            "repeats id 1")):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(CocoLayoutError):
            load_coco(tmp_path / "bad.json")
        assert build_grounding.main([str(tmp_path / "bad.json"), str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("build_grounding:") and words in err and err.count("\n") == 1
    assert build_grounding.main([str(tmp_path / "a.json"), str(tmp_path / "o"), "--images", str(tmp_path / "no")]) == 2
    assert "--images" in capsys.readouterr().err and not (tmp_path / "o").exists()
