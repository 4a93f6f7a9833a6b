"""N-gram resampling: whole-word matching (two backends against brute force and a regex oracle),
document frequencies, the keep rule and its probabilities, vocabulary files, the CLI."""

import json
import random
import re
import unicodedata

import numpy as np
import pytest

from data_curation.ngram_match import (Matches, NgramMatcher, Vocabulary, VocabularyError, brute_force_match,
                                       normalize, tokenize)
from data_curation.resample import (build_report, document_frequencies, entry_probabilities, keep_probability,
                                    resample, uniforms)
from scripts import resample as cli

BACKENDS = ("tokens", "ahocorasick")
EDGE_VOCAB = ["cat", "new", "new york", "york", "New York City", "it's", "café", "über", "x",
              "abcdefgh", "abcdefghi", "abcdefghijklmnop", "abcdefghijklmnopq", "ééééééééé", "东京", "a b c"]


def regex_oracle(text: str, vocab: Vocabulary) -> list[int]:
    """Independent whole-word definition: the entry's words separated by non-word runs, with no
    word character on either side."""
    folded = unicodedata.normalize("NFC", text).lower()
    found = []
    for i, e in enumerate(vocab.entries):
        pat = r"(?<![^\W_])" + r"[\W_]+".join(map(re.escape, e.split(" "))) + r"(?![^\W_])"
        if re.search(pat, folded):
            found.append(i)
    return found


def names(vocab, ids):
    return {vocab[i] for i in ids}


@pytest.fixture(scope="module")
def edge():
    vocab = Vocabulary(EDGE_VOCAB)
    return vocab, {b: NgramMatcher(vocab, backend=b) for b in BACKENDS}


# ------------------------------------------------------------------------------------------- words


def test_tokenize_is_the_word_definition():
    assert tokenize("A New-York_street, CAFÉ!") == ["a", "new", "york", "street", "café"]
    assert normalize("It\u2019s  Rock'n'Roll\t2024 ") == "it s rock n roll 2024"
    assert tokenize("cafe\u0301") == ["café"]  # NFC: a combining accent joins its letter
    assert tokenize("") == [] and tokenize(" ,;\x00\n") == []


def test_vocabulary_normalises_and_deduplicates_in_order():
    v = Vocabulary(["New York", "cat", "new  york", "", "!!", "Cat", "It's"])
    assert v.entries == ["new york", "cat", "it s"]
    assert v.index("NEW-YORK") == 0 and len(v) == 3 and v.max_words == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("text, expected", [
    ("A cat in the category", {"cat"}),
    ("category bobcat cats catalog", set()),  # never inside a word
    ("cat", {"cat"}),  # the whole string
    ("CAT.", {"cat"}),
    ("(cat)", {"cat"}),
    ("cat9 9cat", set()),  # digits are word characters
    ("a new york street", {"new", "new york", "york"}),  # overlapping entries all count
    ("New York", {"new", "new york", "york"}),  # at start and end
    ("New-York_City!", {"new", "new york", "york", "new york city"}),
    ("york, new", {"new", "york"}),  # order matters for multi-word entries
    ("newyork", set()),
    ("new\nyork", {"new", "new york", "york"}),
    ("it\u2019s a CAFÉ", {"it s", "café"}),
    ("cafe\u0301 and cafés", {"café"}),
    ("ÜBER alles; uber", {"über"}),
    ("x x x", {"x"}),  # once per caption however often it occurs
    ("abcdefgh abcdefghi", {"abcdefgh", "abcdefghi"}),  # 8 and 9 bytes: packing boundaries
    ("abcdefghijklmnop abcdefghijklmnopq", {"abcdefghijklmnop", "abcdefghijklmnopq"}),  # 16 and 17
    ("abcdefghijklmnopqr abcdefghij abcdefghijklmno", set()),  # near misses around the boundaries
    ("ÉÉÉÉÉÉÉÉÉ", {"ééééééééé"}),  # 18 UTF-8 bytes
    ("在东京", set()),  # no word boundary inside CJK text (no segmentation, as MetaCLIP v1)
    ("东京 tower", {"东京"}),
    ("a b c d", {"a b c"}),
    ("a\x00b c", {"a b c"}),  # control characters separate words too
    ("cat\ud800x \U0001f431cat\u00a0x", {"cat", "x"}),  # a lone surrogate, an emoji, a no-break space
    ("\u0130stanbul", set()),  # "İ".lower() is "i" + a combining dot (not a word character)
    ("", set()),
    ("   ", set()),
])
def test_whole_word_edge_cases(edge, backend, text, expected):
    vocab, matchers = edge
    got = matchers[backend].match(text)
    assert names(vocab, got) == expected
    assert got == sorted(got) == brute_force_match(text, vocab) == regex_oracle(text, vocab)


def random_caption(rng: random.Random, pool: list[str]) -> str:
    seps = [" ", " ", " ", ", ", "-", "_", "'", " \u2014 ", "\n", "  "]
    words = [rng.choice(pool) for _ in range(rng.randint(0, 14))]
    words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.1 else w for w in words]
    text = "".join(w + rng.choice(seps) for w in words)
    return rng.choice(["", "\u201c", "("]) + text + rng.choice(["", ".", "!", "\u2019s"])


def test_backends_equal_brute_force_and_regex_on_random_captions():
    rng = random.Random(0)
    pool = ["cat", "dog", "new", "york", "red", "car", "a", "the", "on", "of", "über", "naïve", "x1", "東京",
            "zebra", "longwordthatexceedssixteen", "abcdefghi"]
    entries = pool[:14] + [" ".join(rng.sample(pool, k)) for k in (2, 2, 2, 2, 3, 3, 4) for _ in range(6)]
    vocab = Vocabulary(entries)
    pieces = pool + ["category", "dogs", "york's", "newyork"] + entries[14:]  # some entries whole
    captions = [random_caption(rng, pieces) for _ in range(400)]
    want = [brute_force_match(c, vocab) for c in captions]
    assert want == [regex_oracle(c, vocab) for c in captions]
    for backend in BACKENDS:
        matcher = NgramMatcher(vocab, backend=backend, batch_size=37)  # many batch boundaries
        assert matcher.match_many(captions) == want
        assert matcher.match_batch(captions).tolist() == want
    assert sum(map(len, want)) > 800  # the captions do match, including multi-word entries
    assert {len(vocab[i].split()) for ids in want for i in ids} == {1, 2, 3, 4}


def test_matcher_handles_empty_inputs():
    m = NgramMatcher(Vocabulary(["cat"]))
    assert m.match_many([]) == [] and m.match_many(["", ""]) == [[], []]
    assert NgramMatcher(Vocabulary([]), backend="ahocorasick").match_many(["cat"]) == [[]]
    assert NgramMatcher(Vocabulary([])).match_many(["cat"]) == [[]]
    with pytest.raises(ValueError, match="backend"):
        NgramMatcher(Vocabulary(["cat"]), backend="regex")


def test_default_vocabulary_from_wordfreq():
    v = Vocabulary.default()
    assert 300_000 < len(v) <= 500_000  # wordfreq ships ~319k English words and no bigrams
    assert v.entries[:100] == [str(i) for i in range(100)]  # MetaCLIP's metadata starts with 0-99
    assert "the" in v and "Photograph" in v and "it's" in v and "zzzzqx" not in v
    assert 10_000 < sum(" " in e for e in v.entries) < 50_000  # "it s", "women s", "u s", "new york"
    assert not any(re.search(r"\d\d", e) for e in v.entries[100:])  # wordfreq's "a00" placeholders
    assert Vocabulary.default().entries == v.entries  # cached, and a fresh copy
    assert len(Vocabulary.default(1000)) == 1000
    m = NgramMatcher(v)
    found = names(v, m.match("A photo of a tabby cat on a sofa, 2 kids."))
    assert found >= {"photo", "tabby", "cat", "sofa", "2"}


def test_benchmark_smoke():
    from data_curation.bench_ngram import run_ngram_benchmark

    r = run_ngram_benchmark(n_captions=2000, n_vocab=20_000, reps=1, n_check=300)
    assert json.loads(json.dumps(r))["n_vocab"] == 20_000
    assert r["identical_to_brute_force"] and r["mismatches"] == 0 and r["backends_identical"]
    assert r["captions_per_s_per_core"] > 0 and 5 <= r["words_per_caption"] <= 20


# -------------------------------------------------------------------------------------- vocab files


def test_vocabulary_from_file(tmp_path):
    f = tmp_path / "vocab.txt"
    f.write_text("# metadata\ncat\n\nNew York\t12345\n  dog  \ncat\n", encoding="utf-8")
    assert Vocabulary.from_file(f).entries == ["cat", "new york", "dog"]
    j = tmp_path / "metadata.json"
    j.write_text(json.dumps(["0", "Cat", "san francisco"]), encoding="utf-8")
    assert Vocabulary.from_file(j).entries == ["0", "cat", "san francisco"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "not found"),
    ("empty.txt", b"", "no entries"),
    ("comments.txt", b"# only\n\n   \n", "no entries"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("bad.json", b"[\"cat\", ", "not valid JSON"),
    ("dict.json", b"{\"cat\": 1}", "list of strings"),
])
def test_vocabulary_file_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VocabularyError, match=message) as e:
        Vocabulary.from_file(path)
    assert name in str(e.value)


def test_vocabulary_from_texts_counts_unigrams_and_bigrams():
    texts = ["a red car", "A red car.", "the red bus", "red car"]
    v = Vocabulary.from_texts(texts, min_count=2)
    assert v.entries == ["red", "car", "red car", "a", "a red"]
    assert Vocabulary.from_texts(texts, min_count=1, max_n=1, max_entries=2).entries == ["red", "car"]


# -------------------------------------------------------------------------------------- frequencies


def test_document_frequencies_count_captions_not_occurrences():
    matches = [[0, 2], [2, 2, 2], [], [1, 2]]
    assert document_frequencies(matches, 4).tolist() == [1, 1, 3, 0]
    assert document_frequencies(Matches.from_lists(matches), 4).tolist() == [1, 1, 3, 0]
    with pytest.raises(ValueError, match="out of range"):
        document_frequencies([[5]], 4)


# ----------------------------------------------------------------------------------------- the rule


def test_entry_probabilities():
    p = entry_probabilities(np.array([0, 5, 10, 40, 1000]), t=10)
    assert np.allclose(p, [1, 1, 1, 0.5, 0.1])
    assert np.allclose(entry_probabilities(np.array([5, 40]), 10, "linear"), [1, 0.25])
    with pytest.raises(ValueError, match="prob"):
        entry_probabilities(np.array([1]), 10, "log")
    with pytest.raises(ValueError, match="positive"):
        entry_probabilities(np.array([1]), 0)


def test_tail_entry_always_kept_and_unmatched_follow_the_flag():
    freqs = np.array([10**9, 3, 10**9])  # entry 1 is rare
    matches = [[0, 1], [1], [], [0, 2]] * 500
    for seed in range(5):
        keep = resample(matches, freqs, t=100, seed=seed)
        assert keep[0::4].all() and keep[1::4].all() and not keep[2::4].any()
        assert keep[3::4].mean() < 0.01  # p = sqrt(1e-7) per head entry
        assert resample(matches, freqs, t=100, seed=seed, keep_unmatched=True)[2::4].all()
    assert keep_probability([0, 1], freqs, 100) == 1.0
    assert keep_probability([], freqs, 100) == 0.0
    assert keep_probability([], freqs, 100, keep_unmatched=True) == 1.0


def test_resampling_is_deterministic_and_independent_of_batching():
    rng = np.random.default_rng(0)
    matches = [sorted(set(rng.integers(0, 50, rng.integers(0, 5)).tolist())) for _ in range(3000)]
    freqs = document_frequencies(matches, 50)
    keep = resample(matches, freqs, t=40, seed=7)
    assert np.array_equal(keep, resample(Matches.from_lists(matches), freqs, t=40, seed=7))
    assert not np.array_equal(keep, resample(matches, freqs, t=40, seed=8))
    parts = [resample(matches[a:a + 700], freqs, t=40, seed=7, start_index=a) for a in range(0, 3000, 700)]
    assert np.array_equal(keep, np.concatenate(parts))
    shuffled = [ids[::-1] for ids in matches]  # the order of a caption's ids does not matter
    assert np.array_equal(keep, resample(shuffled, freqs, t=40, seed=7))
    assert 0.3 < keep.mean() < 0.99


def binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("prob, expected", [("sqrt", 0.5), ("linear", 0.25)])
def test_keep_rate_of_a_head_entry(prob, expected):
    n, t = 40_000, 10_000  # every caption holds entry 0 once: f = n = 4t
    matches = Matches(np.arange(n + 1, dtype=np.int64), np.zeros(n, np.int64))
    freqs = document_frequencies(matches, 1)
    assert freqs[0] == 4 * t
    keep = resample(matches, freqs, t=t, prob=prob, seed=3)
    assert binomial_ok(int(keep.sum()), n, expected)
    assert keep_probability([0], freqs, t, prob) == pytest.approx(expected)
    after = build_report(matches, keep, t=t, n_entries=1, prob=prob).freq_after[0]
    assert binomial_ok(int(after), n, expected)  # sqrt: about sqrt(t * f) = 2t captions survive


@pytest.mark.parametrize("prob, p1, p2", [("sqrt", 0.5, 0.25), ("linear", 0.25, 1 / 16)])
def test_keep_rate_of_two_head_entries(prob, p1, p2):
    n, t = 40_000, 1_000
    freqs = np.array([4 * t, 16 * t])
    matches = Matches(np.arange(0, 2 * n + 1, 2, dtype=np.int64), np.tile([0, 1], n).astype(np.int64))
    expected = 1 - (1 - p1) * (1 - p2)
    assert keep_probability([0, 1], freqs, t, prob) == pytest.approx(expected)
    keep = resample(matches, freqs, t=t, prob=prob, seed=11)
    assert binomial_ok(int(keep.sum()), n, expected)


def test_uniforms_look_uniform_and_independent():
    u = uniforms(0, np.repeat(np.arange(50_000), 2), np.tile([3, 4], 50_000))
    assert abs(u.mean() - 0.5) < 0.005 and abs(np.var(u) - 1 / 12) < 0.002
    assert 0 <= u.min() and u.max() < 1
    assert abs(np.corrcoef(u[0::2], u[1::2])[0, 1]) < 0.02  # two entries of one caption
    assert abs(np.corrcoef(u[0:-2:2], u[2::2])[0, 1]) < 0.02  # neighbouring captions


def test_report_counts_and_json():
    vocab = Vocabulary(["cat", "dog", "emu"])
    matches = [[0], [0, 1], [], [0], [1], []]
    keep = np.array([True, False, True, False, True, False])
    r = build_report(matches, keep, t=2, n_entries=3, seed=1)
    assert (r.n, r.kept, r.unmatched, r.kept_unmatched) == (6, 3, 2, 1)
    assert r.freq_before.tolist() == [3, 2, 0] and r.freq_after.tolist() == [1, 1, 0]
    d = json.loads(json.dumps(r.to_dict(vocab)))
    assert d["keep_rate"] == 0.5 and d["head_entries"] == 2 and d["entries_matched"] == 2
    assert d["top_entries"] == [{"id": 0, "entry": "cat", "before": 3, "after": 1},
                                {"id": 1, "entry": "dog", "before": 2, "after": 1}]
    with pytest.raises(ValueError, match="rows"):
        build_report(matches, keep[:3], t=2, n_entries=3)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("cat\ndog\nnew york\n", encoding="utf-8")
    return path


CAPTIONS = ["A cat.", "A dog", "cat and dog", "New York at night", "nothing here"] * 20


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_cli_writes_mask_and_json_summary(tmp_path, vocab_file, capsys, fmt):
    path = tmp_path / f"caps.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": c, "id": i}) + "\n" for i, c in enumerate(CAPTIONS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": CAPTIONS}), path)
    out = tmp_path / "mask" / "keep.npy"
    argv = [str(path), "--t", "30", "--vocab", str(vocab_file), "--out", str(out), "--json",
            "--caption-key", "text"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    keep = np.load(out)
    assert keep.dtype == bool and keep.shape == (100,)
    assert not keep[4::5].any() and keep[3::5].all()  # unmatched dropped; "new york" (f=20 < t) kept
    assert summary["n"] == 100 and summary["kept"] == int(keep.sum()) and summary["unmatched"] == 20
    top = {r["entry"]: (r["before"], r["after"]) for r in summary["top_entries"]}
    assert top["cat"][0] == 40 and top["new york"] == (20, 20) and top["cat"][1] < 40
    assert cli.main(argv + ["--keep-unmatched"]) == 0
    assert np.load(out)[4::5].all()


def test_cli_text_output_and_default_mask_path(tmp_path, vocab_file, capsys):
    path = tmp_path / "caps.txt"
    path.write_text("a cat\r\n\r\na dog\r\n", encoding="utf-8")
    assert cli.main([str(path), "--t", "1", "--vocab", str(vocab_file), "--prob", "linear"]) == 0
    text = capsys.readouterr().out
    assert "kept 2 of 3 captions" in text and "'cat'" in text
    assert np.load(str(path) + ".keep.npy").tolist() == [True, False, True]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "not found"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("empty.txt", b"", "no captions"),
    ("bad.jsonl", b'{"caption": "a cat"}\n{"caption": \n', "bad.jsonl:2: not valid JSON"),
    ("nokey.jsonl", b'{"text": "a cat"}\n', "nokey.jsonl:1: expected an object with key 'caption'"),
    ("number.jsonl", b'{"caption": 3}\n', "not a string"),
    ("broken.parquet", b"PAR1 not really", "cannot read parquet"),
])
def test_cli_bad_captions_exit_2_naming_the_file(tmp_path, vocab_file, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert cli.main([str(path), "--t", "10", "--vocab", str(vocab_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and name in err


def test_cli_bad_parquet_column_vocab_and_threshold(tmp_path, vocab_file, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "caps.parquet"
    pq.write_table(pa.table({"text": ["a cat"]}), path)
    assert cli.main([str(path), "--t", "10", "--vocab", str(vocab_file)]) == 2
    assert "no column 'caption' (columns: text)" in capsys.readouterr().err
    missing = tmp_path / "nope.txt"
    assert cli.main([str(path), "--t", "10", "--caption-key", "text", "--vocab", str(missing)]) == 2
    assert "nope.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([str(path), "--t", "0", "--caption-key", "text", "--vocab", str(vocab_file)])
    assert e.value.code == 2


def test_distributed_document_frequencies_equal_one_process():
    """Batches matched in Ray tasks (one matcher per worker process), counts summed on the driver: the
    same counts and the same matches, in order, as one matcher over all captions."""
    from data_curation.resample import distributed_document_frequencies

    rng = random.Random(1)
    pool = ["cat", "dog", "new", "york", "red", "car", "a", "the", "on", "of", "über", "x1", "東京", "zebra"]
    vocab = Vocabulary(pool + [" ".join(rng.sample(pool, k)) for k in (2, 2, 3) for _ in range(8)])
    captions = [random_caption(rng, pool) for _ in range(3000)]
    matches = NgramMatcher(vocab).match_many(captions)
    want = document_frequencies(matches, len(vocab))
    for batch_size in (3000, 257):  # one task, then 12 with a short last one
        freqs, got = distributed_document_frequencies(captions, vocab, batch_size=batch_size, workers=2)
        assert freqs.dtype == np.int64 and freqs.tolist() == want.tolist()
        assert got.tolist() == matches
    assert want.sum() > 3000 and (want > 0).sum() > 20  # the captions do match
    freqs, got = distributed_document_frequencies([], vocab)
    assert freqs.tolist() == [0] * len(vocab) and len(got) == 0
