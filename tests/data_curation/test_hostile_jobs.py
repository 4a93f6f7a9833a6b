"""The shard builders' jobs against hostile inputs and hostile reruns: text that no writer can encode, a
second live build, a resume with another config or another input listing, an output folder inside the
input; and, for each builder, random mixes of the readers' hostile corpus through the CLI (exit 0, counts
that add up to the inputs, nothing written outside OUT)."""

import json
import os
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from data_curation.records import Sample
from data_curation.shard_jobs import (LOCK_NAME, OutputBusyError, ResumeConfig, ResumeMismatchError, _replacing,
                                      check_inputs_unchanged, guard_text, output_lock, reason_kind,
                                      write_status_shard)
from scripts import build_audio_shards, build_shards, build_video_shards
from tests.data_curation.hostile import LAYOUT_CASES, case_names, good_media, make_hostile_corpus

# The cheap stages only: every model-backed stage off, one process.
CHEAP = {
    "image": {"workers": 1, "samples_per_shard": 3, "image": {"min_side": 1}, "language": None, "safety": None,
              "ocr": None, "clip": None, "dedup": None, "resample": None},
    "video": {"workers": 1, "samples_per_shard": 3, "language": None, "ocr": None, "clip": None, "motion": None},
    "audio": {"workers": 1, "samples_per_shard": 3, "vad": None},
}
CLI = {"image": build_shards, "video": build_video_shards, "audio": build_audio_shards}
LAYOUTS = ("folder", "jsonl", "tar")


def _config(tmp_path: Path, media: str, **over) -> Path:
    path = tmp_path / f"{media}.yaml"
    path.write_text(yaml.safe_dump({**CHEAP[media], **over}))
    return path


def _listing(root: Path, skip: Path) -> set[str]:
    """Every path under ``root`` except under ``skip`` (links not followed)."""
    out = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if Path(d, x) != skip]
        out |= {os.path.relpath(os.path.join(d, x), root) for x in dirs + files}
    return out


def _statuses(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("shard_*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def _run(media: str, argv: list[str], capsys) -> tuple[int, str, str]:
    code = CLI[media].main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------------------ text (point 2)


def test_guard_text_fails_unwritable_text_and_escapes_names():
    ok = Sample(key="k", source="d/a.png", caption="A fine caption")
    bad_caption = Sample(key="k2", source="d/b.png", caption="caf\ud800 au lait")
    bad_meta = Sample(key="k3", source="d/c.png", caption="fine", meta={"tags": ["x", "\udfff"]})
    failed = Sample(key="k4", source="d/d.png", caption="\ud800").fail("read", "already bad")
    ok.source = "d/caf\udce9.png"  # a name that bypassed the reader's escaping
    guard_text([ok, bad_caption, bad_meta, failed])
    assert ok.ok and ok.source == "d/caf\\xe9.png"
    assert (bad_caption.status, bad_caption.stage) == ("error", "text")
    assert "'caption'" in bad_caption.reason and "lone surrogate" in bad_caption.reason
    assert bad_caption.caption == "caf\\ud800 au lait"  # escaped, for the error record
    assert bad_meta.status == "error" and "meta.tags[1]" in bad_meta.reason
    assert failed.reason == "already bad" and failed.caption == "\\ud800"
    for s in (ok, bad_caption, bad_meta, failed):
        for text in (s.key, s.source, s.caption, s.reason or ""):
            text.encode("utf-8")


def test_a_status_shard_with_unwritable_text_is_written_and_leaves_no_temporaries(tmp_path):
    samples = [Sample(key="a", source="a.wav", caption="fine", image_bytes=b"x"),
               Sample(key="b", source="b.wav", caption="bad \ud800", image_bytes=b"y")]
    samples[0].source = "caf\udce9.wav"
    members = lambda s: {"flac": s.image_bytes, "txt": s.caption}  # noqa: E731
    stats = write_status_shard(tmp_path, 0, samples, members, ())
    assert (stats["ok"], stats["error"]) == (1, 1)
    rows = pq.read_table(tmp_path / "shard_00000.parquet").to_pylist()
    assert rows[0]["source"] == "caf\\xe9.wav" and rows[1]["stage"] == "text"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_leaves_no_temporary_and_temporaries_are_unique(tmp_path):
    target = tmp_path / "chunk.parquet"
    with pytest.raises(RuntimeError, match="simulated"):
        with _replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("simulated")
    assert not list(tmp_path.iterdir())
    with _replacing(target) as first, _replacing(target) as second:  # e.g. an orphaned worker and a resume
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert target.read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == ["chunk.parquet"]


# -------------------------------------------------------------------------- lock and config (point 6)


def test_a_second_live_build_is_refused_and_a_stale_lock_file_is_not(tmp_path, capsys):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputBusyError, match="another build is running"):
            with output_lock(out):
                pass
        corpus = make_hostile_corpus(tmp_path / "in", "audio", "folder", cases=[])
        code, _, err = _run("audio", [str(corpus.spec), str(out), "--config", _config(tmp_path, "audio").as_posix()],
                            capsys)
        assert code == 2 and "another build is running" in err and len(err.strip().splitlines()) == 1
    assert (out / LOCK_NAME).exists()  # left behind, as by a killed build: it blocks nothing
    with output_lock(out):
        pass


def test_resume_config_names_the_keys_that_differ_and_ignores_workers(tmp_path):
    from data_curation.audio_shards import load_audio_config

    file = tmp_path / "config.json"
    ResumeConfig(file, load_audio_config(None, {"workers": 1})).save()
    ResumeConfig(file, load_audio_config(None, {"workers": 4})).check()
    changed = load_audio_config(None, {"max_sample_bytes": 10, "vad": {"threshold": 0.5}})
    with pytest.raises(ResumeMismatchError, match=r"different config .*: max_sample_bytes, vad.threshold differ"):
        ResumeConfig(file, changed).check()


def test_the_cli_reports_a_resume_mismatch_in_one_line_and_accepts_other_workers(tmp_path, capsys):
    corpus = make_hostile_corpus(tmp_path / "in", "image", "folder", cases=["non_utf8_name"])
    out, cfg = tmp_path / "out", _config(tmp_path, "image").as_posix()
    assert _run("image", [str(corpus.spec), str(out), "--config", cfg, "--json"], capsys)[0] == 0
    assert _run("image", [str(corpus.spec), str(out), "--config", cfg, "--workers", "2", "--json"], capsys)[0] == 0
    code, _, err = _run("image", [str(corpus.spec), str(out), "--config", cfg, "--max-sample-bytes", "100"], capsys)
    assert code == 2 and "max_sample_bytes differ" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run("image", [str(corpus.spec), str(out), "--config", cfg, "--allow-outside-root"], capsys)
    assert code == 2 and "allow_outside_root differ" in err


def test_a_setup_error_pins_no_config_so_the_corrected_rerun_runs(tmp_path, capsys):
    corpus = make_hostile_corpus(tmp_path / "in", "image", "folder", cases=[])
    out = tmp_path / "out"
    bad = _config(tmp_path, "image", dedup={"sscd": str(tmp_path / "misspelt.pt"), "keep": "first"})
    code, _, err = _run("image", [str(corpus.spec), str(out), "--config", str(bad)], capsys)
    assert code == 2 and "misspelt.pt" in err
    assert not (out / "_work" / "config.json").exists()
    assert _run("image", [str(corpus.spec), str(out), "--config", str(_config(tmp_path, "image")), "--json"],
                capsys)[0] == 0


@pytest.mark.parametrize("text, key", [("max_sample_bytes: 0", "max_sample_bytes"),
                                       ("allow_outside_root: 'no'", "allow_outside_root")])
def test_reader_fields_are_checked(tmp_path, text, key):
    from data_curation.audio_shards import load_audio_config
    from data_curation.curation_config import ConfigError, load_config
    from data_curation.video_shards import load_video_config

    (tmp_path / "c.yaml").write_text(f"{text}\ndedup: null\n")
    for load in (load_config, load_video_config, load_audio_config):
        if load is not load_config:
            (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=key):
            load(tmp_path / "c.yaml")


# ------------------------------------------------------------------------------- reasons (point 7)


@pytest.mark.parametrize("reason, source, key, kind", [
    ("/d/x.jpg: image file is truncated (5 bytes not processed)", "/d/x.jpg", "x", "image file is truncated"),
    ("orphan caption file sub/x.txt: no image named sub/x.*", "/d/sub/x.txt", "sub__x_txt",
     "orphan caption file *: no image named *.*"),
    ("missing caption: no y.txt or y.json", "/d/y.jpg", "y", "missing caption: no *.txt or *.json"),
    ("m.jsonl line 3: image file not found: /d/missing.jpg", "/d/m.jsonl:3", "m_000000003",
     "*.jsonl line #: image file not found: *"),
    ("a.png is not a recognised image format", "/d/a.png", "a", "* is not a recognised image format"),
    ("cannot open shard /d/s.tar: No such file", "/d/s.tar", "s__shard_error", "cannot open shard *: No such file"),
    ("duplicate_of(coffee_copy)", "/d/coffee.jpg", "coffee", "duplicate_of"),
    ("too_short(3<5)", "/d/a.jpg", "a", "too_short"),
])
def test_reason_kind_drops_what_names_the_input(reason, source, key, kind):
    assert reason_kind({"reason": reason, "source": source, "key": key}) == kind


def test_the_image_report_counts_reason_kinds_not_files(tmp_path, capsys):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / f"{name}.png").write_bytes(good_media("image")[:40])  # truncated: a decode error each
        (root / f"{name}.txt").write_text("A small broken picture")
    code, out, _ = _run("image", [str(root), str(tmp_path / "out"), "--config", str(_config(tmp_path, "image")),
                                  "--json"], capsys)
    assert code == 0
    decode = {k: n for k, n in json.loads(out)["by_reason"].items() if k.startswith("decode:")}
    assert list(decode.values()) == [3], decode


# ------------------------------------------------------------------------- input listing (point 15)


def _folder(root: Path, media: str, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = {"image": "png", "audio": "wav"}[media]
    for name in names:
        (root / f"{name}.{ext}").write_bytes(good_media(media))
        (root / f"{name}.txt").write_text(f"A small sample named {name}")
    return root


@pytest.mark.parametrize("media", ["image", "audio"])
def test_resume_refuses_a_changed_listing_and_processes_new_inputs_at_the_end(tmp_path, capsys, media):
    root = _folder(tmp_path / "in", media, ["b", "c", "d", "e"])
    out, cfg = tmp_path / "out", str(_config(tmp_path, media, samples_per_shard=2))
    argv = [str(root), str(out), "--config", cfg, "--json"]
    assert _run(media, argv, capsys)[0] == 0
    _folder(root, media, ["f"])  # sorted last: a new chunk, processed on resume
    code, report, _ = _run(media, argv, capsys)
    assert code == 0 and json.loads(report)["inputs"] == 5 and json.loads(report)["counts"]["kept"] == 5
    fresh = tmp_path / "fresh"
    assert _run(media, [str(root), str(fresh), "--config", cfg, "--json"], capsys)[0] == 0
    assert _statuses(out) == _statuses(fresh)
    _folder(root, media, ["a"])  # sorted first: every finished chunk now holds other inputs
    code, _, err = _run(media, argv, capsys)
    assert code == 2 and "not the ones it was built from" in err and len(err.strip().splitlines()) == 1
    for name in ("a", "f"):  # back to b..e: a chunk past the end of the listing is refused
        for p in root.glob(f"{name}.*"):
            p.unlink()
    code, _, err = _run(media, argv, capsys)
    assert code == 2 and "ends before this finished chunk" in err
    _folder(root, media, ["f"])
    assert _run(media, argv, capsys)[0] == 0  # the listing it was built from resumes


def test_a_finished_chunk_without_a_fingerprint_is_refused(tmp_path):
    with pytest.raises(ResumeMismatchError, match="older build"):
        check_inputs_unchanged(None, "abc", tmp_path / "shard_00000_stats.json")
    check_inputs_unchanged("abc", "abc", tmp_path / "shard_00000_stats.json")


@pytest.mark.parametrize("media", ["image", "audio"])
def test_an_output_folder_inside_the_input_is_refused(tmp_path, capsys, media):
    root = _folder(tmp_path / "in", media, ["a", "b"])
    code, _, err = _run(media, [str(root), str(root / "out"), "--config", str(_config(tmp_path, media))], capsys)
    assert code == 2 and "inside the input folder" in err and not (root / "out").exists()


# -------------------------------------------------------------------- hostile mixes (points 2 and 10)


def _mixes(media: str, n_random: int, seed: int) -> list[tuple[str, list[str]]]:
    """(layout, cases) mixes of the hostile corpus for ``media``: every case of each layout, then
    ``n_random`` seeded random subsets."""
    rng = random.Random(seed)
    layouts = [layout for layout in LAYOUTS if layout in LAYOUT_CASES]
    mixes = [(layout, list(case_names(media, layout))) for layout in layouts]
    for _ in range(n_random):
        layout = rng.choice(layouts)
        cases = [c for c in case_names(media, layout) if c != "good"]
        mixes.append((layout, rng.sample(cases, rng.randint(1, len(cases)))))
    return mixes


@pytest.mark.parametrize("media, seed", [("image", 0), ("video", 1), ("audio", 2)])
def test_any_mix_of_hostile_inputs_builds_and_reruns(tmp_path, capsys, media, seed):
    for i, (layout, cases) in enumerate(_mixes(media, 3, seed)):
        base = tmp_path / f"mix{i}"
        corpus = make_hostile_corpus(base / "data", media, layout, cases=cases)
        out = base / "out"
        argv = [str(corpus.spec), str(out), "--config", str(_config(base, media)), "--json",
                "--max-sample-bytes", str(corpus.max_sample_bytes)]
        before = _listing(base, out)
        for run in ("first", "rerun"):
            code, stdout, err = _run(media, argv, capsys)
            assert code == 0, (layout, cases, run, err)
            report = json.loads(stdout)
            assert report["inputs"] == corpus.inputs == sum(report["counts"].values()), (layout, cases, report)
        assert _listing(base, out) == before, (layout, cases)  # nothing outside OUT
        assert not list(out.rglob("*.tmp"))
        rows = corpus.by_case(_statuses(out))
        for case in corpus.cases:
            expected = corpus.expected_reason(case)
            got = rows[case]
            if expected is None:  # read as a good sample, and a good one: the cheap stages keep it
                assert got["status"] == "ok", (layout, case, got)
            else:
                assert got["status"] == "error" and expected in got["reason"], (layout, case, got)
