"""The speech encoder + adapter learn to transcribe unseen spoken digits, on the production road: make_synthetic
-> build_audio_shards -> text LM -> speech adapter -> export -> demo_asr -> score (a few minutes on 2 CPU cores)."""

import json

from scripts import bench_learning
from tests.system_deps import require_binary


def test_speech_road_transcribes_heldout_digits(tmp_path, capsys, road_threads):
    require_binary("espeak-ng")
    assert bench_learning.main(["speech", "--seed", "0", "--json", "--work-dir", str(tmp_path)]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(json.dumps(m))  # the figures, for `pytest -rP`
    # The frozen LM alone (behind an untrained encoder + adapter) hears nothing: nearly every word wrong.
    assert m["no_audio_wer"] >= 0.7, m
    # With the clip, unseen utterances (new digit strings, speeds and pitches) are mostly transcribed.
    assert m["heldout_wer"] <= 0.2, m
    assert m["heldout_cer"] < m["no_audio_cer"] / 2, m
    predictions = (tmp_path / "runs" / "synthetic" / "speech" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == m["n_test"] == 100 and m["kept_clips"] == m["n_train"] == 2000
    assert (tmp_path / "runs" / "synthetic" / "speech" / "export" / "model.safetensors").exists()
