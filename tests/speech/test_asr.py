"""The spoken-digit ASR recipe's parts: the LM's copy dialogs, batches, the checkpoint round trip."""

import json
import random

import numpy as np
import pytest
import torch

from adapters.checkpoint import CheckpointError
from adapters.task import IGNORE_INDEX
from adapters.tokenizer import Tokenizer
from adapters.vqa import build_tiny_tokenizer
from speech import asr
from speech.adapter import build_speech_llama

@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("asr_tok"), texts=asr.asr_corpus_text())


def test_copy_dialog_labels_only_the_answer(tok):
    rng = random.Random(0)
    pool = asr.noise_pool(tok)
    digit_ids = {i for w in asr.DIGITS for i in (*tok.encode(w), *tok.encode(" " + w))}
    assert pool and not digit_ids & set(pool)
    for _ in range(20):
        digits = asr.random_digit_string(rng)
        tokens, labels = asr.copy_dialog(tok, digits, rng, max_noise=3, pool=pool, max_repeat=4)
        target = [t for t, y in zip(tokens, labels) if y != IGNORE_INDEX]
        assert target == [*tok.encode(digits), tok.eot_id]
        assert [y for y in labels if y != IGNORE_INDEX] == target
        # The user turn holds the digits (each repeated, with noise between) and nothing else from DIGITS.
        prompt = tokens[: len(tokens) - len(target)]
        heard = tok.decode([t for t in prompt if t in digit_ids]).split()
        collapse = lambda ws: [w for i, w in enumerate(ws) if i == 0 or w != ws[i - 1]]  # noqa: E731
        assert len(heard) >= len(digits.split()) and collapse(heard) == collapse(digits.split())


def test_checkpoint_round_trip_and_strict_errors(tok, tmp_path):
    torch.manual_seed(0)
    model = build_speech_llama(asr.tiny_asr_config(tok)).eval()
    ckpt = asr.save_speech_checkpoint(model, tmp_path / "ckpt", tok.path)
    loaded = asr.load_speech_checkpoint(ckpt)
    assert loaded.cfg == model.cfg and (ckpt / "tokenizer.model").exists()
    assert not any(p.requires_grad for p in loaded.lm.parameters())
    waves = torch.randn(2, 8000) * 0.1
    utts = [asr.SpokenDigits("one two three", w.numpy(), "en-us", 175, 50) for w in waves]
    assert asr.transcribe(loaded, tok, utts, max_new_tokens=4) == asr.transcribe(model, tok, utts, max_new_tokens=4)

    meta = json.loads((ckpt / "config.json").read_text())
    bad = dict(meta, format="llama3-speech/0")
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="format"):
        asr.load_speech_checkpoint(ckpt)
    bad = json.loads(json.dumps(meta))
    bad["config"]["encoder"]["n_heads_typo"] = 4
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"config.json: encoder: unknown keys \['n_heads_typo'\]"):
        asr.load_speech_checkpoint(ckpt)


@pytest.mark.parametrize("section, key, value, message", [
    ("encoder", "dim", "64", "config.json: encoder.dim: expected an integer, got str '64'"),
    ("lm", "n_layers", 200000, "config.json: lm.n_layers: 200000 is outside [1, 4096]"),
    ("adapter", "n_heads", -4, "config.json: adapter.n_heads: -4 is outside [1, 4096]"),
    (None, "max_seq_len", 0, "config.json: max_seq_len: 0 is outside [1, "),
    ("features", "center", "yes", "config.json: features.center: expected true or false"),
])
def test_speech_checkpoint_config_types_and_bounds(tok, tmp_path, section, key, value, message):
    torch.manual_seed(0)
    model = build_speech_llama(asr.tiny_asr_config(tok))
    ckpt = asr.save_speech_checkpoint(model, tmp_path / "ckpt", tok.path)
    meta = json.loads((ckpt / "config.json").read_text())
    (meta["config"][section] if section else meta["config"])[key] = value
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        asr.load_speech_checkpoint(ckpt)
    assert message in str(e.value)


def test_speech_checkpoint_that_is_not_an_object_or_mixes_dtypes(tok, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = build_speech_llama(asr.tiny_asr_config(tok))
    ckpt = asr.save_speech_checkpoint(model, tmp_path / "ckpt", tok.path)
    sd = load_file(ckpt / "model.safetensors")
    sd["adapter.output.weight"] = sd["adapter.output.weight"].half()
    save_file(sd, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensors of several float dtypes"):
        asr.load_speech_checkpoint(ckpt)
    (ckpt / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json: expected an object, got list"):
        asr.load_speech_checkpoint(ckpt)


def test_no_audio_baseline_ignores_the_clip(tok):
    torch.manual_seed(0)
    model = build_speech_llama(asr.tiny_asr_config(tok)).eval()
    a = [asr.SpokenDigits("one", (torch.randn(6000) * 0.1).numpy(), "en-us", 175, 50)]
    b = [asr.SpokenDigits("one", np.zeros(9000, np.float32), "en-us", 175, 50)]
    assert asr.transcribe(model, tok, a, use_audio=False) == asr.transcribe(model, tok, b, use_audio=False)
