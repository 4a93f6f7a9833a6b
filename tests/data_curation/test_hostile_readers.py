"""The readers against the hostile-input corpus (tests/data_curation/hostile.py): for every media and layout,
one record per input, every str writable as UTF-8, the named reason per case, and nothing hangs."""

import os
import signal
from contextlib import contextmanager

import pytest

from data_curation.audio_shards import open_audio_input
from data_curation.input_files import NOT_REGULAR, OUTSIDE_ROOT, TOO_LARGE, CurationInputError
from data_curation.readers import open_input, read_manifest
from data_curation.records import ERROR, OK, Sample
from data_curation.video_shards import open_video_input
from tests.data_curation.hostile import CASES, LAYOUT_CASES, case_names, make_hostile_corpus

OPENERS = {"image": open_input, "video": open_video_input, "audio": open_audio_input}


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer comes, which never does."""
    def hung(signum, frame):
        raise TimeoutError(f"reader still running after {seconds} s (blocked on a FIFO or device?)")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def strings(value):
    """Every str in a record: its fields, meta walked (keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def read_all(corpus, allow_outside_root: bool) -> list[Sample]:
    with deadline(30):
        return list(OPENERS[corpus.media](corpus.spec, max_sample_bytes=corpus.max_sample_bytes,
                                          allow_outside_root=allow_outside_root))


@pytest.mark.parametrize("allow_outside_root", [False, True])
@pytest.mark.parametrize("layout", ["folder", "jsonl", "tar"])
@pytest.mark.parametrize("media", ["image", "video", "audio"])
def test_every_hostile_input_is_one_record_with_its_named_reason(tmp_path, media, layout, allow_outside_root):
    corpus = make_hostile_corpus(tmp_path, media, layout)
    assert set(corpus.cases) == set(case_names(media, layout)) and len(corpus.cases) >= 9
    samples = read_all(corpus, allow_outside_root)
    assert len(samples) == corpus.inputs
    assert len({s.key for s in samples}) == len(samples)
    for s in samples:
        for text in strings([s.key, s.source, s.caption, s.reason, s.meta]):
            text.encode("utf-8")  # what the parquet and tar writers do
    for case, s in corpus.by_case(samples).items():
        want = corpus.expected_reason(case, allow_outside_root)
        if want is None:
            assert s.status == OK and s.caption, (case, s.reason)
            if case == "gif_member":
                assert s.image_bytes.startswith(b"GIF8")
            else:
                assert s.image_bytes == corpus.good_bytes, case
        else:
            assert s.status == ERROR and s.stage == "read" and want in s.reason, (case, want, s.reason)


def test_names_that_are_not_utf8_are_read_with_the_byte_escaped(tmp_path):
    for layout in ("folder", "tar"):
        corpus = make_hostile_corpus(tmp_path / layout, "image", layout, ["non_utf8_name"])
        s = corpus.by_case(read_all(corpus, False))["non_utf8_name"]
        assert s.ok and s.source.endswith("caf\\xe9.png") and s.key == "caf_"  # backslash, x, e, 9


def test_surrogate_reasons_name_the_file_and_field(tmp_path):
    folder = make_hostile_corpus(tmp_path / "f", "audio", "folder", ["surrogate_sidecar"])
    s = folder.by_case(read_all(folder, False))["surrogate_sidecar"]
    assert s.reason.startswith("surrogate_sidecar.json: field 'text' holds a lone surrogate"), s.reason
    jsonl = make_hostile_corpus(tmp_path / "j", "image", "jsonl", ["surrogate_caption", "surrogate_field"])
    got = jsonl.by_case(read_all(jsonl, False))
    assert got["surrogate_caption"].reason.startswith("manifest.jsonl line 2: field 'caption' holds a lone")
    assert got["surrogate_field"].reason.startswith("manifest.jsonl line 3: field 'tags[1]' holds a lone")
    tar = make_hostile_corpus(tmp_path / "t", "video", "tar", ["surrogate_sidecar"])
    s = tar.by_case(read_all(tar, False))["surrogate_sidecar"]
    assert s.reason.startswith("hostile.tar:surrogate_sidecar.json: field 'caption' holds a lone"), s.reason


def test_hard_link_reads_the_earlier_member_without_a_second_copy_in_the_stream(tmp_path):
    corpus = make_hostile_corpus(tmp_path, "video", "tar", ["hardlink_member", "hardlink_unresolved"])
    got = corpus.by_case(read_all(corpus, False))
    assert got["hardlink_member"].ok and got["hardlink_member"].image_bytes == corpus.good_bytes
    assert "(nowhere.mp4)" in got["hardlink_unresolved"].reason


def test_oversize_cap_is_the_parameter(tmp_path):
    corpus = make_hostile_corpus(tmp_path, "image", "folder", ["oversize"])
    with deadline(30):
        loose = corpus.by_case(open_input(corpus.spec, max_sample_bytes=corpus.max_sample_bytes + 1))
        tight = corpus.by_case(open_input(corpus.spec, max_sample_bytes=len(corpus.good_bytes) - 1))
    assert loose["oversize"].ok and loose["good"].ok
    cap = len(corpus.good_bytes) - 1
    assert f"{corpus.max_sample_bytes + 1} bytes, {TOO_LARGE} ({cap})" in tight["oversize"].reason
    assert TOO_LARGE in tight["good"].reason


def test_dev_zero_row_is_refused_without_reading(tmp_path):
    corpus = make_hostile_corpus(tmp_path, "audio", "jsonl", ["dev_zero"])
    with deadline(10):  # reading /dev/zero never ends without the cap; with it, it would say TOO_LARGE
        got = corpus.by_case(read_manifest(corpus.spec, image_key="audio", caption_key="text",
                                           max_sample_bytes=1 << 40, allow_outside_root=True))
    assert got["dev_zero"].reason == f"manifest.jsonl line 2: cannot read /dev/zero: {NOT_REGULAR} (a character device)"
    with deadline(10):
        got = corpus.by_case(read_manifest(corpus.spec, image_key="audio", caption_key="text"))
    assert OUTSIDE_ROOT in got["dev_zero"].reason and "it resolves to /dev/zero" in got["dev_zero"].reason


def test_fifo_as_manifest_or_shard_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "rows.jsonl")
    with deadline(10), pytest.raises(CurationInputError, match=f"rows.jsonl: {NOT_REGULAR} \\(a FIFO\\)"):
        open_input(tmp_path / "rows.jsonl")
    os.mkfifo(tmp_path / "00000.tar")
    with deadline(10):
        (s,) = list(open_input(str(tmp_path / "0000*.tar")))
    assert s.status == ERROR and s.reason == f"cannot read shard {tmp_path / '00000.tar'}: {NOT_REGULAR} (a FIFO)"


def test_corpus_rejects_unknown_cases(tmp_path):
    with pytest.raises(ValueError, match="gif_member"):
        make_hostile_corpus(tmp_path, "audio", "tar", ["gif_member"])
    with pytest.raises(ValueError, match="layout"):
        make_hostile_corpus(tmp_path, "image", "zip")
    assert set(CASES) == {c for cases in LAYOUT_CASES.values() for c in cases}  # every case is written somewhere
