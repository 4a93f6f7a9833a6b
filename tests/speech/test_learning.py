"""The speech encoder + adapter learn to transcribe unseen spoken digits (a few minutes on 2 CPU cores)."""

import json

from scripts import bench_learning


def test_speech_adapter_transcribes_heldout_digits(tmp_path, capsys):
    argv = ["speech", "--seed", "0", "--json", "--work-dir", str(tmp_path), "--save", str(tmp_path / "out")]
    assert bench_learning.main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    # The frozen LM alone (the clip withheld) can only guess a digit string: nearly every word wrong.
    assert m["no_audio_wer"] >= 0.7, m
    # With the clip, unseen utterances (new digit strings, speeds and pitches) are mostly transcribed.
    assert m["heldout_wer"] <= 0.2, m
    assert m["heldout_cer"] < m["no_audio_cer"] / 2, m
    records = (tmp_path / "out" / "heldout" / "records.jsonl").read_text().splitlines()
    assert len(records) == m["n_test"] and (tmp_path / "out" / "checkpoint" / "model.safetensors").exists()
