"""The speech export (`speech.model_io`): round trip and strict errors on its config and weights."""

import json

import pytest
import torch

from adapters.checkpoint import CheckpointError
from adapters.tokenizer import Tokenizer, build_tiny_tokenizer
from speech import model_io
from speech.adapter import asr_prompt, build_speech_llama, encode_speech_training_example
from tests.speech.corpus import asr_corpus_text
from tests.tiny import tiny_asr_config


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("asr_tok"), texts=asr_corpus_text())


def test_checkpoint_round_trip_and_strict_errors(tok, tmp_path):
    torch.manual_seed(0)
    model = build_speech_llama(tiny_asr_config(tok)).eval()
    ckpt = model_io.save_speech_checkpoint(model, tmp_path / "ckpt", tok.path)
    loaded = model_io.load_speech_checkpoint(ckpt)
    assert loaded.cfg == model.cfg and (ckpt / "tokenizer.model").exists()
    assert not any(p.requires_grad for p in loaded.lm.parameters())
    tokens, labels = encode_speech_training_example(tok, asr_prompt(), "one two three")
    batch = dict(tokens=torch.tensor([tokens] * 2), labels=torch.tensor([labels] * 2),
                 waves=torch.randn(2, 8000) * 0.1, wave_lengths=torch.tensor([8000, 6000]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)

    meta = json.loads((ckpt / "config.json").read_text())
    bad = dict(meta, format="llama3-mm/speech/0")
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError,
                       match="format 'llama3-mm/speech/0', expected format 'llama3-mm/speech/1'"):
        model_io.load_speech_checkpoint(ckpt)
    bad = json.loads(json.dumps(meta))
    bad["config"]["encoder"]["n_heads_typo"] = 4
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"config.json: unknown key encoder.n_heads_typo \(known in encoder: \["):
        model_io.load_speech_checkpoint(ckpt)


@pytest.mark.parametrize("section, key, value, message", [
    ("encoder", "dim", "64", "config.json: encoder.dim: expected an integer, got str '64'"),
    ("lm", "n_layers", 200000, "config.json: lm.n_layers: 200000 is outside [1, 4096]"),
    ("adapter", "n_heads", -4, "config.json: adapter.n_heads: -4 is outside [1, 4096]"),
    (None, "max_seq_len", 0, "config.json: max_seq_len: 0 is outside [1, "),
    ("features", "center", "yes", "config.json: features.center: expected true or false"),
])
def test_speech_checkpoint_config_types_and_bounds(tok, tmp_path, section, key, value, message):
    torch.manual_seed(0)
    model = build_speech_llama(tiny_asr_config(tok))
    ckpt = model_io.save_speech_checkpoint(model, tmp_path / "ckpt", tok.path)
    meta = json.loads((ckpt / "config.json").read_text())
    (meta["config"][section] if section else meta["config"])[key] = value
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        model_io.load_speech_checkpoint(ckpt)
    assert message in str(e.value)


def test_speech_checkpoint_that_is_not_an_object_or_mixes_dtypes(tok, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = build_speech_llama(tiny_asr_config(tok))
    ckpt = model_io.save_speech_checkpoint(model, tmp_path / "ckpt", tok.path)
    sd = load_file(ckpt / "model.safetensors")
    sd["adapter.output.weight"] = sd["adapter.output.weight"].half()
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensors of several float dtypes"):
        model_io.load_speech_checkpoint(ckpt)
    (ckpt / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json: expected an object, got list"):
        model_io.load_speech_checkpoint(ckpt)
