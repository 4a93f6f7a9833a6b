"""Readers: every input (good, broken, orphan, truncated) comes out as exactly one accounted-for Sample."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from skimage import data as skdata

from data_curation.input_files import CurationInputError, sanitize_key
from data_curation.readers import decode_image, open_input, read_folder, read_manifest
from data_curation.records import ERROR, OK, Sample, bad_text_field, escape_text
from data_curation.wds_reader import read_webdataset


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def rendered(fmt: str = "GIF") -> bytes:
    img = Image.new("RGB", (160, 96), (30, 90, 200))
    ImageDraw.Draw(img).ellipse((40, 20, 110, 80), fill=(240, 200, 20))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


ASTRONAUT = encode(skdata.astronaut(), "JPEG")
COFFEE = encode(skdata.coffee(), "PNG")
CHELSEA = encode(skdata.chelsea(), "JPEG")


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def by_key(samples: list[Sample]) -> dict[str, Sample]:
    out = {s.key: s for s in samples}
    assert len(out) == len(samples), "keys must be unique"
    return out


# ------------------------------------------------------------------------------------------- folder


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "raw"
    write(root / "astronaut.jpg", ASTRONAUT)
    write(root / "astronaut.txt", "An astronaut in a white suit beside a flag.\n")
    write(root / "sub dir" / "coffee.png", COFFEE)
    write(root / "sub dir" / "coffee.json", json.dumps({"caption": "A cup of coffee on a saucer.", "url": "u", "w": 600}))
    write(root / "chelsea.jpg", CHELSEA)  # no caption
    write(root / "truncated.jpg", ASTRONAUT[: len(ASTRONAUT) // 3])
    write(root / "truncated.txt", "A truncated photo.")
    write(root / "fake.jpg", b"this is a text file renamed to .jpg\n")
    write(root / "fake.txt", "Not really an image.")
    write(root / "empty.jpg", b"")
    write(root / "empty.txt", "An empty file.")
    write(root / "badcap.png", COFFEE)
    write(root / "badcap.txt", b"\xff\xfe bad")
    write(root / "UPPER.JPEG", CHELSEA)
    write(root / "UPPER.txt", "A cat, upper-case extension.")
    write(root / "nested" / "deeper" / "rendered.gif", rendered())
    write(root / "nested" / "deeper" / "rendered.json", json.dumps({"caption": "A yellow disc on blue."}))
    write(root / "nocap.png", COFFEE)
    write(root / "nocap.json", json.dumps({"title": "no caption key"}))
    write(root / "orphan.txt", "A caption whose image went missing.")
    write(root / "notes.pdf", b"%PDF-1.4 not an image")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")  # an unreadable entry, also when run as root
    write(root / "dangling.txt", "A link to nowhere.")
    return root


# inputs: 11 images (dangling link included) + orphan.txt + notes.pdf; 10 more files are their sidecars
FOLDER_INPUTS = 13


def test_read_folder_accounts_for_every_file(folder):
    samples = list(read_folder(folder))
    on_disk = [p for p in folder.rglob("*") if not p.is_dir()]
    assert len(on_disk) == FOLDER_INPUTS + 10
    assert len(samples) == FOLDER_INPUTS
    s = by_key(samples)
    assert sorted(s) == sorted([
        "astronaut", "sub_dir__coffee", "chelsea", "truncated", "fake", "empty", "badcap", "UPPER",
        "nested__deeper__rendered", "nocap", "orphan_txt", "notes_pdf", "dangling"])

    ok = s["astronaut"]
    assert ok.status == OK and ok.caption == "An astronaut in a white suit beside a flag."
    assert ok.image_bytes == ASTRONAUT and ok.source == str(folder / "astronaut.jpg")
    assert s["sub_dir__coffee"].caption == "A cup of coffee on a saucer."
    assert s["sub_dir__coffee"].meta == {"url": "u", "w": 600}
    assert s["UPPER"].ok and s["nested__deeper__rendered"].caption == "A yellow disc on blue."
    # broken image bytes are the decode stage's business; the reader hands the raw bytes on
    for key in ("truncated", "fake", "empty"):
        assert s[key].ok, s[key].reason
    assert s["empty"].image_bytes == b""

    def err(key):
        assert s[key].status == ERROR and s[key].stage == "read", (key, s[key].status)
        return s[key].reason

    assert err("chelsea") == "missing caption: no chelsea.txt or chelsea.json"
    assert "badcap.txt" in err("badcap") and "UTF-8" in err("badcap")
    assert "'caption'" in err("nocap") and "nocap.json" in err("nocap")
    assert err("orphan_txt").startswith("orphan caption file orphan.txt")
    assert err("notes_pdf") == "unsupported file type .pdf: notes.pdf"
    assert err("dangling").startswith("cannot read dangling.jpg")


def test_read_folder_is_deterministic_and_keys_are_unique(folder):
    first = [(s.key, s.source, s.status) for s in read_folder(folder)]
    assert first == [(s.key, s.source, s.status) for s in read_folder(folder)]
    assert [src for _, src, _ in first] == sorted(src for _, src, _ in first)  # sorted listing order

    # x.jpg and x.png share x.txt; "a b.jpg" and "a_b.jpg" sanitise to the same key
    root = folder.parent / "collide"
    for name in ("x.jpg", "x.png", "a b.jpg", "a_b.jpg"):
        write(root / name, CHELSEA)
    for name in ("x.txt", "a b.txt", "a_b.txt"):
        write(root / name, "A cat on a sofa.")
    samples = list(read_folder(root))
    assert len(samples) == 4 and all(s.ok for s in samples)
    keys = [s.key for s in samples]
    assert len(set(keys)) == 4
    assert all(k.startswith(("x-", "a_b-")) and set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-")
               for k in keys)


def test_folder_duplicate_sidecar_and_empty_folder(tmp_path):
    root = tmp_path / "dup"
    write(root / "cat.jpg", CHELSEA)
    write(root / "cat.TXT", "Upper-case sidecar.")
    write(root / "cat.txt", "Lower-case sidecar.")
    samples = list(read_folder(root))
    assert len(samples) == 2
    s = by_key(samples)
    assert s["cat"].ok and s["cat"].caption == "Upper-case sidecar."  # sorted: "cat.TXT" < "cat.txt"
    assert s["cat_txt"].status == ERROR and "duplicate caption file cat.txt" in s["cat_txt"].reason

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(CurationInputError, match="empty input folder: .*empty"):
        read_folder(tmp_path / "empty")  # raised when called, not at the first next()


def test_sanitize_key():
    assert sanitize_key("sub dir/x.y") == "sub_dir__x_y"
    long = sanitize_key("d/" + "a" * 300)
    assert len(long) == 100 and long != sanitize_key("d/" + "a" * 299)


# ------------------------------------------------------------------------------------------- decode


def test_decode_image_real_photos_and_broken_bytes(folder):
    s = by_key(list(read_folder(folder)))
    img = decode_image(s["astronaut"])
    assert img.mode == "RGB" and img.size == (512, 512) and s["astronaut"].ok
    assert decode_image(s["nested__deeper__rendered"]).size == (160, 96)
    for key, why in (("truncated", "cannot decode"), ("fake", "not a recognised image format"),
                     ("empty", "empty data (0 bytes)")):
        assert decode_image(s[key]) is None
        assert s[key].status == ERROR and s[key].stage == "decode"
        assert s[key].reason.startswith(f"{folder / (key + '.jpg')}: ") and why in s[key].reason, s[key].reason
    big = s["UPPER"]
    assert decode_image(big, max_pixels=1000) is None and "above the limit of 1000 pixels" in big.reason
    none = Sample(key="k", source="somewhere.tar:k.jpg")
    assert decode_image(none) is None and none.reason == "somewhere.tar:k.jpg: no image bytes"


# ----------------------------------------------------------------------------------------- manifest


def test_read_manifest_jsonl_rows_and_bad_lines(tmp_path):
    write(tmp_path / "imgs" / "astronaut.jpg", ASTRONAUT)
    absolute = write(tmp_path / "elsewhere" / "coffee.png", COFFEE)
    rows = [
        json.dumps({"image": "imgs/astronaut.jpg", "caption": " An astronaut. ", "url": "http://x/1.jpg"}),
        '{"image": "imgs/astronaut.jpg", "caption": ',  # broken JSON
        json.dumps({"image": "imgs/missing.jpg", "caption": "Gone."}),
        json.dumps({"caption": "No image field."}),
        "",  # blank: not a row
        json.dumps({"image": str(absolute), "caption": "Coffee, absolute path.", "score": 0.5}),
        "[1, 2]",
        '{"image": "imgs/astronaut.jpg", "caption": "bad \xff"}',
        json.dumps({"image": "https://example.com/a.jpg", "caption": "A URL, not a file."}),
        json.dumps({"image": "imgs/astronaut.jpg", "caption": 42}),
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes("\n".join(rows).replace("\xff", "\udcff").encode("utf-8", "surrogateescape") + b"\n")
    samples = list(read_manifest(manifest))
    assert len(samples) == 9  # 10 lines, one blank
    s = {int(x.source.rsplit(":", 1)[1]): x for x in samples}
    assert all(x.source == f"{manifest}:{line}" for line, x in s.items())
    assert s[1].ok and s[1].caption == "An astronaut." and s[1].image_bytes == ASTRONAUT
    assert s[1].meta == {"url": "http://x/1.jpg"} and s[1].key == "manifest_000000001"
    assert s[6].ok and s[6].image_bytes == COFFEE and s[6].meta == {"score": 0.5}
    reasons = {line: x.reason for line, x in s.items() if x.status == ERROR}
    assert sorted(reasons) == [2, 3, 4, 7, 8, 9, 10]
    assert reasons[2].startswith("manifest.jsonl line 2 is not valid JSON")
    assert reasons[3] == f"manifest.jsonl line 3: image file not found: {tmp_path / 'imgs' / 'missing.jpg'}"
    assert reasons[4] == "manifest.jsonl line 4: missing field 'image'"
    assert "not a JSON object" in reasons[7] and "not valid UTF-8" in reasons[8]
    assert "is a URL" in reasons[9] and "'caption' is a int" in reasons[10]
    assert len({x.key for x in samples}) == 9


def test_read_manifest_parquet_custom_columns_and_bytes(tmp_path):
    write(tmp_path / "a.jpg", ASTRONAUT)
    table = pa.table({
        "file": ["a.jpg", "missing.jpg", "a.jpg"],
        "text": ["An astronaut.", "Missing.", None],
        "uid": ["u0", "u1", "u2"],
    })
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=2)
    samples = list(open_input(tmp_path / "rows.parquet", image_key="file", caption_key="text"))
    assert [x.status for x in samples] == [OK, ERROR, ERROR]
    assert samples[0].meta == {"uid": "u0"} and samples[0].source == f"{tmp_path / 'rows.parquet'}:0"
    assert "image file not found" in samples[1].reason and "missing field 'text'" in samples[2].reason

    embedded = pa.table({"image": [{"bytes": CHELSEA, "path": "c.jpg"}], "caption": ["A cat."]})
    pq.write_table(embedded, tmp_path / "hf.parquet")
    (only,) = list(read_manifest(tmp_path / "hf.parquet"))
    assert only.ok and only.image_bytes == CHELSEA and decode_image(only).size == (451, 300)

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CurationInputError, match="broken.parquet"):
        read_manifest(tmp_path / "broken.parquet")


# --------------------------------------------------------------------------------------- webdataset


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def member_offsets(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name: m for m in tf.getmembers()}


@pytest.fixture
def shards(tmp_path) -> Path:
    d = tmp_path / "shards"
    make_tar(d / "00000.tar", [
        ("000000.jpg", ASTRONAUT), ("000000.txt", b"An astronaut."),
        ("000001.png", COFFEE), ("000001.json", json.dumps({"caption": "Coffee.", "url": "u1"}).encode()),
        ("000002.jpg", CHELSEA),  # no caption
        ("000003.txt", b"A caption alone."),  # no image
        ("sub/000004.jpg", CHELSEA), ("sub/000004.txt", b"A cat in a folder."),
    ])
    make_tar(d / "00001.tar", [
        ("000000.jpg", CHELSEA), ("000000.txt", b"Same key as in shard 0."),
        ("000010.jpg", ASTRONAUT), ("000010.txt", b"\xff\xfe bad"),
    ])
    # 00002: cut in the middle of 000021.jpg's data
    full = make_tar(d / "full2.tar", [(f"0000{i}.{e}", p) for i in (20, 21, 22)
                                      for e, p in (("jpg", CHELSEA), ("txt", b"A cat."))])
    info = member_offsets(full)["000021.jpg"]
    (d / "00002.tar").write_bytes(full.read_bytes()[: info.offset_data + info.size // 2])
    # 00003: cut exactly at a header (a block boundary): tarfile alone sees a clean end
    full = make_tar(d / "full3.tar", [(f"0000{i}.{e}", p) for i in (30, 31)
                                      for e, p in (("jpg", CHELSEA), ("txt", b"A cat."))])
    (d / "00003.tar").write_bytes(full.read_bytes()[: member_offsets(full)["000031.jpg"].offset])
    # 00004: cut inside the header of 000041.txt, right after 000041.jpg
    full = make_tar(d / "full4.tar", [(f"0000{i}.{e}", p) for i in (40, 41)
                                      for e, p in (("jpg", CHELSEA), ("txt", b"A cat."))])
    (d / "00004.tar").write_bytes(full.read_bytes()[: member_offsets(full)["000041.txt"].offset + 100])
    for name in ("full2.tar", "full3.tar", "full4.tar"):
        (d / name).unlink()
    return d


def test_read_webdataset_groups_members_and_reports_damage(shards):
    before = sorted(shards.parent.rglob("*"))
    samples = list(open_input(f"{shards}/{{00000..00003}}.tar"))
    assert sorted(shards.parent.rglob("*")) == before  # streamed, nothing extracted
    # shard 0: 5 groups; shard 1: 2; shard 2: 1 good + 1 truncated; shard 3: 1 good + 1 "no end marker"
    assert len(samples) == 5 + 2 + 2 + 2
    s = by_key(samples)
    assert s["000000"].ok and s["000000"].caption == "An astronaut." and s["000000"].image_bytes == ASTRONAUT
    assert s["000000"].source == f"{shards / '00000.tar'}:000000.jpg"
    assert s["000001"].caption == "Coffee." and s["000001"].meta == {"url": "u1"}
    assert s["sub__000004"].ok and s["sub__000004"].caption == "A cat in a folder."
    assert "has no caption (key 000002;" in s["000002"].reason
    assert "has no image member (key 000003;" in s["000003"].reason and "000003.txt" in s["000003"].reason
    assert s["00001__000000"].ok and s["00001__000000"].caption == "Same key as in shard 0."
    assert s["000010"].status == ERROR and "00001.tar:000010.txt is not valid UTF-8" in s["000010"].reason
    assert s["000020"].ok and decode_image(s["000020"]).size == (451, 300)

    cut = s["000021"]
    assert cut.status == ERROR and cut.source == f"{shards / '00002.tar'}:000021.jpg"
    assert "00002.tar at member 000021.jpg" in cut.reason and "unexpected end of data" in cut.reason
    assert s["000030"].ok
    eof = s["00003__shard_error"]
    assert eof.status == ERROR and "end-of-archive marker after member 000030.txt" in eof.reason
    assert "000022" not in s and "000031" not in s  # lost with the damage, reported above

    # a cut header also ends tarfile's iteration silently: the half group and the shard are reported
    s4 = by_key(list(read_webdataset(shards / "00004.tar")))
    assert len(s4) == 3 and s4["000040"].ok
    assert s4["000041"].status == ERROR and "has no caption (key 000041;" in s4["000041"].reason
    assert "no valid header or end-of-archive marker after member 000041.jpg" in s4["00004__shard_error"].reason


def test_webdataset_bad_shards_and_patterns(shards):
    (shards / "junk.tar").write_bytes(b"this is not a tar archive " * 40)
    (shards / "zero.tar").write_bytes(b"")
    samples = list(read_webdataset([shards / "junk.tar", shards / "zero.tar", shards / "00001.tar"]))
    assert [x.status for x in samples] == [ERROR, ERROR, OK, ERROR]
    assert samples[0].key == "junk__shard_error" and "junk.tar at its start: invalid header" in samples[0].reason
    assert "zero.tar at its start: empty file" in samples[1].reason
    with pytest.raises(CurationInputError, match=r"00009.tar not found \(1 of 2 missing\)"):
        read_webdataset([shards / "00009.tar", shards / "00001.tar"])  # a missing shard stops the job up front
    with pytest.raises(CurationInputError, match=r"00005.tar not found \(5 of 10 missing\)"):
        open_input(f"{shards}/{{00000..00009}}.tar")  # brace names too: every one must exist

    assert len(list(open_input(f"{shards}/0000[01].tar"))) == 5 + 2
    assert len(list(open_input(shards / "00001.tar"))) == 2
    with pytest.raises(CurationInputError, match="no shards match"):
        open_input(f"{shards}/nothing_*.tar")
    with pytest.raises(CurationInputError, match="non-tar"):
        write(shards / "x.txt", "x")
        open_input(f"{shards}/*")


# -------------------------------------------------------------------------------------- open_input


def test_open_input_dispatch_and_job_level_errors(tmp_path, folder):
    assert len(list(open_input(folder))) == FOLDER_INPUTS
    assert len(list(open_input(str(folder)))) == FOLDER_INPUTS
    write(tmp_path / "m.jsonl", json.dumps({"image": "raw/astronaut.jpg", "caption": "An astronaut."}) + "\n")
    (row,) = list(open_input(tmp_path / "m.jsonl"))
    assert row.ok and row.image_bytes == ASTRONAUT
    with pytest.raises(CurationInputError, match="input not found: .*nope"):
        open_input(tmp_path / "nope")
    write(tmp_path / "table.csv", "image,caption\n")
    with pytest.raises(CurationInputError, match="unknown input kind: .*table.csv"):
        open_input(tmp_path / "table.csv")


# --------------------------------------------------------------------------------- hostile details
# (the corpus-wide checks are in test_hostile_readers.py)


def test_escape_text_and_bad_text_field():
    assert escape_text("café ok") == "café ok"
    assert escape_text("caf\udce9.jpg") == "caf\\xe9.jpg"  # an undecodable file-name byte
    assert escape_text("a\ud800b") == "a\\ud800b"  # a lone surrogate from JSON
    assert bad_text_field({"caption": "fine", "tags": ["x", {"deep": "\udfff"}]}) == "tags[1].deep"
    assert bad_text_field({"ok\ud800": 1}) == "ok\\ud800 (the name)"
    assert bad_text_field({"caption": "café", "n": 3, "b": b"\xff"}) is None
    s = Sample(key="caf\udce9", source="dir/caf\udce9.jpg").fail("read", "bad \ud800 name")
    assert (s.key, s.source, s.reason) == ("caf\\xe9", "dir/caf\\xe9.jpg", "bad \\ud800 name")


def test_parquet_oversize_bytes_and_invalid_utf8_cell_fail_their_row_only(tmp_path):
    text = pa.array([b"A cat.", b"caf\xe9", b"A cat."], pa.binary()).view(pa.string())  # row 1: not UTF-8
    table = pa.table({"image": [CHELSEA + b"\0", CHELSEA, CHELSEA], "caption": text})
    pq.write_table(table, tmp_path / "rows.parquet")
    samples = list(read_manifest(tmp_path / "rows.parquet", max_sample_bytes=len(CHELSEA)))
    assert [s.status for s in samples] == [ERROR, ERROR, OK]
    assert samples[0].reason == (f"cannot read rows.parquet row 0: 'image': {len(CHELSEA) + 1} bytes, above "
                                 f"max_sample_bytes ({len(CHELSEA)})")
    assert samples[1].reason.startswith("rows.parquet row 1: field 'caption' is not valid UTF-8")
    assert samples[2].image_bytes == CHELSEA


def test_jsonl_long_line_is_skipped_and_later_lines_keep_their_numbers(tmp_path):
    write(tmp_path / "a.jpg", b"tiny")  # the reader hands bytes on undecoded
    row = json.dumps({"image": "a.jpg", "caption": "An astronaut."})
    write(tmp_path / "m.jsonl", "\n".join([row, json.dumps({"image": "a.jpg", "caption": "x" * 5000}), row]) + "\n")
    samples = list(read_manifest(tmp_path / "m.jsonl", max_sample_bytes=1000))
    assert [(s.source.rsplit(":", 1)[1], s.status) for s in samples] == [("1", OK), ("2", ERROR), ("3", OK)]
    assert samples[1].reason == "cannot read m.jsonl line 2: longer than 1000 bytes, above max_sample_bytes"
    assert samples[2].image_bytes == b"tiny" and samples[2].caption == "An astronaut."


def test_manifest_paths_stay_inside_unless_allowed(tmp_path):
    outside = write(tmp_path / "outside.jpg", CHELSEA)
    write(tmp_path / "data" / "in.jpg", ASTRONAUT)
    os.symlink(tmp_path / "data" / "in.jpg", tmp_path / "data" / "link_in.jpg")  # a link inside: fine
    rows = [{"image": "in.jpg"}, {"image": "link_in.jpg"}, {"image": "../outside.jpg"}, {"image": str(outside)},
            {"image": "bad\u0000name.jpg"}]
    write(tmp_path / "data" / "m.jsonl", "".join(json.dumps({**r, "caption": "c"}) + "\n" for r in rows))
    strict = list(read_manifest(tmp_path / "data" / "m.jsonl"))
    assert [s.status for s in strict] == [OK, OK, ERROR, ERROR, ERROR]
    assert strict[2].reason == (f"m.jsonl line 3: cannot read {tmp_path / 'data' / '..' / 'outside.jpg'}: outside "
                                f"the dataset root {tmp_path / 'data'} (it resolves to {outside}; allow_outside_root "
                                "reads it)")
    assert "embedded null byte" in strict[4].reason
    loose = list(read_manifest(tmp_path / "data" / "m.jsonl", allow_outside_root=True))
    assert [s.status for s in loose] == [OK, OK, OK, OK, ERROR] and loose[3].image_bytes == CHELSEA


def test_folder_links_loops_and_outside_targets(tmp_path):
    root = tmp_path / "raw"
    write(root / "a.jpg", ASTRONAUT)
    os.symlink(root / "a.jpg", root / "same.jpg")  # inside: read
    os.symlink(write(tmp_path / "secret.jpg", CHELSEA), root / "out.jpg")
    os.symlink(root / "loop.jpg", root / "loop.jpg")
    os.symlink(tmp_path, root / "up")  # a link to a folder: not followed, reported
    for stem in ("a", "same", "out", "loop"):
        write(root / f"{stem}.txt", "A caption.")
    strict = by_key(list(read_folder(root)))
    assert sorted(strict) == ["a", "loop", "out", "same", "up"]
    assert strict["a"].ok and strict["same"].ok and strict["same"].image_bytes == ASTRONAUT
    assert "outside the dataset root" in strict["out"].reason and "secret.jpg" in strict["out"].reason
    assert strict["loop"].reason.startswith("cannot read loop.jpg: ")
    assert strict["up"].reason == "cannot read up: not a regular file (a symbolic link to a folder; links to " \
                                  "folders are not followed)"
    loose = by_key(list(read_folder(root, allow_outside_root=True)))
    assert loose["out"].ok and loose["out"].image_bytes == CHELSEA
    assert loose["loop"].reason.startswith("cannot read loop.jpg: ") and loose["up"].status == ERROR


def test_tar_duplicate_member_and_hard_link_to_oversize_member(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, payload in (("a.jpg", ASTRONAUT), ("a.txt", b"One."), ("a.txt", b"Two."),
                              ("b.jpg", CHELSEA), ("b.txt", b"A cat.")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("c.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "./b.jpg"  # normalised: b.jpg
        tf.addfile(link)
        info = tarfile.TarInfo("c.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"Cat."))
    s = by_key(list(read_webdataset(shard, max_sample_bytes=len(CHELSEA))))
    assert "sample a has two 'txt' members (a.txt, a.txt)" in s["a"].reason
    assert s["b"].ok and s["c"].ok and s["c"].image_bytes == CHELSEA and s["c"].source.endswith("s.tar:c.jpg")
    small = by_key(list(read_webdataset(shard, max_sample_bytes=len(CHELSEA) - 1)))
    assert small["c"].reason == f"cannot read s.tar:c.jpg: {len(CHELSEA)} bytes, above max_sample_bytes " \
                                f"({len(CHELSEA) - 1})"
