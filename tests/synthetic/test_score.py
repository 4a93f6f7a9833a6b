"""The held-out scorer: exact match overall / per kind / per answer, WER and CER for transcripts, and named
errors for prediction files that do not match the answer key."""

import json

import pytest

from common.metrics import cer, wer
from scripts import make_synthetic
from synthetic.score import ScoreError, score

ANSWERS = [
    {"id": "a-colour", "answer": "red", "kind": "colour"},
    {"id": "a-side", "answer": "left", "kind": "side"},
    {"id": "b-colour", "answer": "blue", "kind": "colour"},
    {"id": "b-side", "answer": "left", "kind": "side"},
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def key(tmp_path):
    return _write(tmp_path / "answers.jsonl", ANSWERS)


def test_exact_match_overall_per_kind_and_per_answer(tmp_path, key):
    said = {"a-colour": " Red.", "b-side": "left", "b-colour": "red", "a-side": "right"}
    preds = _write(tmp_path / "p.jsonl", [{"id": i, "answer": a} for i, a in said.items()])
    m = score(key, preds)
    assert m["n"] == 4 and m["accuracy"] == 0.5 and "wer" not in m
    by_answer = {"blue": {"n": 1, "accuracy": 0.0}, "red": {"n": 1, "accuracy": 1.0}}
    assert m["by_kind"]["colour"] == {"n": 2, "accuracy": 0.5, "by_answer": by_answer}
    assert m["by_kind"]["side"]["by_answer"] == {"left": {"n": 2, "accuracy": 0.5}}


def test_transcripts_get_corpus_wer_and_cer(tmp_path):
    refs, hyps = ["one two three", "four five six seven"], ["one two three", "four nine six"]
    key = _write(tmp_path / "a.jsonl",
                 [{"id": str(i), "answer": r, "kind": "transcript"} for i, r in enumerate(refs)])
    preds = _write(tmp_path / "p.jsonl", [{"id": str(i), "answer": h} for i, h in enumerate(hyps)])
    m = score(key, preds)
    assert m["wer"] == m["by_kind"]["transcript"]["wer"] == wer(refs, hyps).rate == 2 / 7
    assert m["cer"] == cer(refs, hyps).rate and m["accuracy"] == 0.5


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a-colour", "answer": "red"}], r"no prediction for ids 'a-side', 'b-colour', 'b-side'"),
    ([*({"id": a["id"], "answer": "x"} for a in ANSWERS), {"id": "zzz", "answer": "x"}],
     r"ids not in .*'zzz'"),
    ([{"id": "a-colour", "answer": "red"}, {"id": "a-colour", "answer": "blue"}],
     r"p.jsonl:2: id 'a-colour' appears twice"),
    ([{"id": "a-colour"}], r"p.jsonl:1: 'answer' is missing or not a string"),
    ([{"id": "a-colour", "answer": 3}], r"p.jsonl:1: 'answer' is missing"),
])
def test_prediction_files_that_do_not_match_are_named_errors(tmp_path, key, rows, message):
    with pytest.raises(ScoreError, match=message):
        score(key, _write(tmp_path / "p.jsonl", rows))


def test_unreadable_files_are_named(tmp_path, key):
    (tmp_path / "p.jsonl").write_text('{"id": "a-colour", "answer": "red"}\n{oops\n')
    with pytest.raises(ScoreError, match=r"p.jsonl:2: not valid JSON"):
        score(key, tmp_path / "p.jsonl")
    with pytest.raises(ScoreError, match=r"file not found: .*nope.jsonl"):
        score(tmp_path / "nope.jsonl", tmp_path / "p.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ScoreError, match=r"empty.jsonl: no rows"):
        score(tmp_path / "empty.jsonl", key)


def test_score_cli(tmp_path, key, capsys):
    preds = _write(tmp_path / "p.jsonl", [{"id": a["id"], "answer": a["answer"]} for a in ANSWERS])
    assert make_synthetic.main(["score", str(key), str(preds), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    assert make_synthetic.main(["score", str(key), str(_write(tmp_path / "q.jsonl", ANSWERS[:1]))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("make_synthetic: ") and "'a-side'" in err and err.count("\n") == 1
