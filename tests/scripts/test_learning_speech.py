"""The speech road's own pieces (scripts/learning_speech.py); the road itself runs in tests/speech/test_learning.py."""

from pathlib import Path

import pytest
import torch

from adapters.tokenizer import build_tiny_tokenizer
from scripts import learning_speech
from scripts._road import RoadError, export_untrained, run_stage
from scripts.learning_speech import SPEECH_CONFIG, TEXT_CONFIG, Road
from speech.model_io import load_speech_checkpoint
from speech.adapter import build_speech_llama
from training.config import load_run_config
from tests.speech.corpus import asr_corpus_text
from tests.tiny import tiny_asr_config


def test_the_configs_chain_into_one_road_rooted_at_the_work_dir(tmp_path):
    text, speech = load_run_config(TEXT_CONFIG), load_run_config(SPEECH_CONFIG)
    out = Path(text.model.tokenizer).parent  # make_synthetic's OUT
    assert (text.kind, text.data.format, speech.kind) == ("text", "conversation", "speech")
    assert Path(text.data.shards).parent == out / "lm" and Path(speech.data.shards).parent == out / "shards"
    # The speech run's frozen LM and tokenizer are the text run's export.
    assert Path(speech.model.lm) == Path(text.train.run_dir) / "export"
    assert Path(speech.model.tokenizer) == Path(speech.model.lm) / "tokenizer.model"
    road = Road(tmp_path)
    assert road.data == tmp_path / out and road.shards == tmp_path / out / "shards"
    assert road.speech_run == tmp_path / speech.train.run_dir
    rooted = load_run_config(SPEECH_CONFIG, road.path_overrides(SPEECH_CONFIG))
    assert rooted.model.lm == str(tmp_path / speech.model.lm)
    assert rooted.data.shards == str(tmp_path / speech.data.shards)
    assert rooted.train.run_dir == str(tmp_path / speech.train.run_dir)


def test_a_stage_gives_its_last_stdout_line_as_json_and_a_failure_names_its_command():
    def chatty(argv):
        print("a log line on stdout")
        print('{"ok": true}')
        return 0

    stage = run_stage("chatty", chatty, [])
    assert stage.summary == {"ok": True} and stage.seconds >= 0
    assert run_stage("quiet", lambda argv: 0, []).summary is None
    with pytest.raises(RoadError, match=r"python -m scripts.train --config x.yaml exited with status 2"):
        run_stage("train", lambda argv: 2, ["--config", "x.yaml"])


def test_the_no_audio_baseline_is_the_untrained_speech_model_the_run_starts_from(tmp_path):
    tok = build_tiny_tokenizer(tmp_path, asr_corpus_text())
    overrides = [f"model.tokenizer={tok.path}", "model.lm=null", "model.seed=3"]
    out = export_untrained(SPEECH_CONFIG, overrides, tmp_path / "untrained")
    loaded = load_speech_checkpoint(out)
    torch.manual_seed(3)  # what training.spec.build_speech_model seeds with model.seed
    fresh = build_speech_llama(tiny_asr_config(tok))
    assert loaded.cfg == fresh.cfg and (out / "tokenizer.model").exists()
    for (name, a), b in zip(loaded.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_summary_shows_transcripts_right_or_wrong_and_the_wers():
    m = {"seed": 0, "n_test": 2, "heldout_wer": 0.1, "heldout_cer": 0.05, "heldout_exact_match": 0.5,
         "no_audio_wer": 0.9, "checkpoint": "ckpt",
         "examples": [{"ref": "one two", "hyp": "one two", "right": True},
                      {"ref": "three", "hyp": "tree", "right": False}]}
    text = learning_speech.summary(m)
    assert "'one two'" in text and "right" in text and "wrong" in text
    assert "WER 0.100" in text and "no audio (the frozen LM alone): WER 0.900" in text
