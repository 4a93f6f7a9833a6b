"""WER/CER and their S/D/I counts agree with jiwer (the independent reference) after our normaliser;
the normaliser's rules; empty rows; the scoring CLI on TSV and JSONL files and its key checks."""

import json
import random

import jiwer
import pytest

from common.metrics import cer, edit_distance, normalize_text, wer
from scripts import eval_asr

# Mixed case, punctuation, curly apostrophes and annotations, so the normaliser has work to do;
# a small vocabulary makes equal-cost alignments (the S/D/I tie-breaks) common.
VOCAB = ["The", "the,", "cat", "CAT!", "sat", "on", "a", "mat.", "don't", "Don’t", "well-known", "—",
         "[noise]", "(laughs)", "it's", "'quoted'", "b", "B?"]


def _pair(rng: random.Random) -> tuple[str, str]:
    ref = [rng.choice(VOCAB) for _ in range(rng.randrange(0, 13))]
    if rng.random() < 0.2:  # unrelated hypothesis
        return " ".join(ref), " ".join(rng.choice(VOCAB) for _ in range(rng.randrange(0, 13)))
    hyp = list(ref)
    for _ in range(rng.randrange(0, 5)):
        op, k = rng.random(), rng.randrange(len(hyp) + 1)
        if op < 0.4 and k < len(hyp):
            hyp[k] = rng.choice(VOCAB)
        elif op < 0.7 and k < len(hyp):
            del hyp[k]
        else:
            hyp.insert(k, rng.choice(VOCAB))
    return " ".join(ref), " ".join(hyp)


def _sdi(out) -> tuple[int, int, int]:
    return out.substitutions, out.deletions, out.insertions


def test_per_utterance_counts_match_jiwer():
    rng = random.Random(0)
    checked = 0
    for _ in range(1500):
        ref, hyp = _pair(rng)
        nr, nh = normalize_text(ref), normalize_text(hyp)
        if not nr:
            continue  # a lone empty reference raises here by design; covered below
        w, c = wer(ref, hyp), cer(ref, hyp)
        jw, jc = jiwer.process_words(nr, nh), jiwer.process_characters(nr, nh)
        assert (w.substitutions, w.deletions, w.insertions) == _sdi(jw), (ref, hyp)
        assert (c.substitutions, c.deletions, c.insertions) == _sdi(jc), (ref, hyp)
        assert w.rate == pytest.approx(jiwer.wer(nr, nh)) and c.rate == pytest.approx(jiwer.cer(nr, nh))
        assert w.hits == jw.hits and c.hits == jc.hits
        checked += 1
    assert checked > 1000


def test_corpus_rates_match_jiwer_with_empty_rows():
    rng = random.Random(1)
    for _ in range(20):
        pairs = [_pair(rng) for _ in range(60)] + [("", "the cat"), ("[noise]", ""), ("", "")]
        refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
        nrefs, nhyps = [normalize_text(t) for t in refs], [normalize_text(t) for t in hyps]
        w, c = wer(refs, hyps), cer(refs, hyps)
        assert (w.substitutions, w.deletions, w.insertions) == _sdi(jiwer.process_words(nrefs, nhyps))
        assert (c.substitutions, c.deletions, c.insertions) == _sdi(jiwer.process_characters(nrefs, nhyps))
        assert w.rate == pytest.approx(jiwer.wer(nrefs, nhyps))
        assert c.rate == pytest.approx(jiwer.cer(nrefs, nhyps))
        assert w.n_ref == sum(len(t.split()) for t in nrefs) and c.n_ref == sum(map(len, nrefs))
        assert len(w.utterances) == len(pairs) and sum(u.errors for u in w.utterances) == w.errors


def test_unnormalised_scoring_matches_jiwer_defaults():
    rng = random.Random(2)
    refs, hyps = zip(*(_pair(rng) for _ in range(300)))
    refs = [f"  {r}   x" for r in refs]  # extra spaces: words split on them, characters keep inner ones
    hyps = [f"{h}  x " for h in hyps]
    assert wer(refs, hyps, normalize=False).rate == pytest.approx(jiwer.wer(refs, hyps))
    assert cer(refs, hyps, normalize=False).rate == pytest.approx(jiwer.cer(refs, hyps))
    c = cer(refs, hyps, normalize=False)
    assert (c.substitutions, c.deletions, c.insertions) == _sdi(jiwer.process_characters(refs, hyps))


@pytest.mark.parametrize("ref, hyp, sdi", [
    ("the cat sat on the mat", "the cat sat on the mat", (0, 0, 0)),
    ("the cat sat on the mat", "the cat sat on mat", (0, 1, 0)),
    ("the cat sat", "the cat sat down", (0, 0, 1)),
    ("the cat sat", "a cat sit", (2, 0, 0)),
    ("a b", "b c", (2, 0, 0)),  # equally (0, 1, 1): the tie goes as in jiwer
    ("a b c d", "x a b c", (0, 1, 1)),
    ("one two three", "", (0, 3, 0)),
])
def test_hand_made_pairs(ref, hyp, sdi):
    assert tuple(edit_distance(ref.split(), hyp.split())) == sdi
    assert _sdi(jiwer.process_words(ref, hyp)) == sdi


def test_edit_distance_total_matches_brute_force_on_any_sequences():
    def lev(a, b):
        prev = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            cur = [i]
            for j, y in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
            prev = cur
        return prev[-1]

    rng = random.Random(3)
    for _ in range(300):
        a = tuple(rng.randrange(3) for _ in range(rng.randrange(0, 10)))
        b = tuple(rng.randrange(3) for _ in range(rng.randrange(0, 10)))
        s, d, i = edit_distance(a, b)
        assert s + d + i == lev(a, b) and d - i == len(a) - len(b)
    assert edit_distance("kitten", "sitting") == (2, 0, 1) and edit_distance("kitten", "sitting").errors == 3


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("Don’t stop—believing.", "don't stop believing"),
    ("'quoted' dogs' o'clock rock'n'roll '90s", "quoted dogs o'clock rock'n'roll 90s"),
    ("it`s ʼtis", "it's tis"),
    ("well-known \t 3.5  $20 50%", "well known 3 5 20 50"),
    ("[noise] uh (laughs) <unk> yes", "uh yes"),
    ("ﬁne Ｆｕｌｌ\u00a0width", "fine full width"),
    ("co\u00adoperate zero\u200bwidth", "cooperate zero width"),
    ("CAFÉ naïve", "café naïve"),
    ("“Hi” «there» a_b a/b", "hi there a b a b"),
    ("twenty one 21", "twenty one 21"),  # numbers are left as written
    ("  \n ", ""),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected
    assert normalize_text(expected) == expected  # idempotent


def test_normalize_text_rejects_other_languages():
    with pytest.raises(ValueError, match="'fr' is not supported"):
        normalize_text("l'homme", lang="fr")


def test_empty_hypothesis_and_empty_reference_rows():
    r = wer(["the cat sat", "on the mat"], ["", "on the mat"])
    assert (r.substitutions, r.deletions, r.insertions, r.n_ref, r.n_hyp) == (0, 3, 0, 6, 3) and r.rate == 0.5
    r = wer(["", "the cat"], ["uh huh", "the cat"])  # an empty reference: its hypothesis words are insertions
    assert (r.insertions, r.n_ref, r.rate) == (2, 2, 1.0)
    assert r.utterances[0].rate == float("inf") and r.utterances[1].rate == 0.0
    with pytest.raises(ValueError, match="wer: the references hold zero words after normalisation"):
        wer(["", "[noise]"], ["a", ""])
    with pytest.raises(ValueError, match="cer: the references hold zero chars"):
        cer(["  "], ["a"], normalize=False)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no utterances"):
        wer([], [])


# --- the CLI -------------------------------------------------------------------------------------

REFS = {"u1": "The cat sat on the mat.", "u2": "Don't stop!", "u3": "", "u4": "hello world"}
HYPS = {"u1": "the cat sat on a mat", "u2": "don’t stop", "u3": "uh", "u4": "yellow world again"}


def _write_tsv(path, rows):
    path.write_text("".join(f"{k}\t{v}\n" for k, v in rows.items()), encoding="utf-8")
    return str(path)


def _write_jsonl(path, rows):
    lines = [json.dumps({"key": k, "text": v}) + "\n" for k, v in rows.items()]
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def test_cli_tsv_and_jsonl_json_report(tmp_path, capsys):
    refs = _write_tsv(tmp_path / "refs.tsv", REFS)
    hyps = _write_jsonl(tmp_path / "hyps.jsonl", dict(reversed(HYPS.items())))  # order does not matter
    assert eval_asr.main(["--refs", refs, "--hyps", hyps, "--json", "--show", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = list(REFS)
    expected_w = wer([REFS[k] for k in keys], [HYPS[k] for k in keys])
    expected_c = cer([REFS[k] for k in keys], [HYPS[k] for k in keys])
    assert out["wer"] == expected_w.to_dict() and out["cer"] == expected_c.to_dict()
    assert out["n_utterances"] == 4 and out["normalize"] is True
    assert (out["wer"]["substitutions"], out["wer"]["deletions"], out["wer"]["insertions"]) == (2, 0, 2)
    assert out["wer"]["n_ref"] == 10 and out["wer"]["rate"] == pytest.approx(0.4)
    assert [u["key"] for u in out["worst"]] == ["u4", "u3"]  # u3 ties u1 on errors; its WER is inf
    assert out["worst"][0]["ref"] == "hello world" and out["worst"][0]["wer"] == 1.0
    assert out["worst"][1]["wer"] is None and out["worst"][1]["insertions"] == 1

    # JSONL references, TSV hypotheses (the files swapped): u3's "uh" is now one deletion

    assert eval_asr.main(["--refs", hyps, "--hyps", refs, "--show", "5"]) == 0
    text = capsys.readouterr().out
    assert "WER" in text and "CER" in text and "u3: 1 errors / 1 words" in text


def test_cli_no_normalize(tmp_path, capsys):
    refs = _write_tsv(tmp_path / "refs.tsv", {"a": "Hello, World"})
    hyps = _write_tsv(tmp_path / "hyps.tsv", {"a": "hello world"})
    assert eval_asr.main(["--refs", refs, "--hyps", hyps, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["wer"]["rate"] == 0.0
    assert eval_asr.main(["--refs", refs, "--hyps", hyps, "--json", "--no-normalize"]) == 0
    assert json.loads(capsys.readouterr().out)["wer"]["rate"] == 1.0


def test_cli_mismatched_keys_exit_2(tmp_path, capsys):
    refs = _write_tsv(tmp_path / "refs.tsv", REFS)
    hyps = _write_jsonl(tmp_path / "hyps.jsonl", {"u1": "x", "u2": "y", "zz": "z"})
    assert eval_asr.main(["--refs", refs, "--hyps", hyps]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: keys differ")
    assert f"2 key(s) of {refs} missing from {hyps}: 'u3', 'u4'" in err
    assert f"1 key(s) of {hyps} not in {refs}: 'zz'" in err


@pytest.mark.parametrize("content, message", [
    ("a\tx\nb\ty\na\tz\n", "refs.tsv:3: duplicate key 'a' (first on line 1)"),
    ("a\tx\nb y\n", "refs.tsv:2: no tab"),
    ("\n\n", "refs.tsv has no transcripts"),
])
def test_cli_bad_reference_files_exit_2(tmp_path, capsys, content, message):
    (tmp_path / "refs.tsv").write_text(content)
    hyps = _write_tsv(tmp_path / "hyps.tsv", {"a": "x", "b": "y"})
    assert eval_asr.main(["--refs", str(tmp_path / "refs.tsv"), "--hyps", hyps]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_jsonl_and_empty_references_exit_2(tmp_path, capsys):
    (tmp_path / "hyps.jsonl").write_text('{"key": "a", "text": "x"}\n{"key": "b"}\n')
    refs = _write_tsv(tmp_path / "refs.tsv", {"a": "", "b": "[noise]"})
    assert eval_asr.main(["--refs", refs, "--hyps", str(tmp_path / "hyps.jsonl")]) == 2
    assert "hyps.jsonl:2: expected an object with keys 'key' and 'text'" in capsys.readouterr().err
    hyps = _write_jsonl(tmp_path / "hyps.jsonl", {"a": "x", "b": None})
    assert eval_asr.main(["--refs", refs, "--hyps", hyps]) == 2
    assert "references hold zero words" in capsys.readouterr().err
