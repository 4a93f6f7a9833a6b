"""The speech adapter and the speech model: adapter lengths and padding invariance, the 8B parameter
count, the <|audio|> splice (embeddings, labels, padding, no truncation), the frozen LM under training,
cached greedy generation against full recompute, and exact frozen-LM logits without audio.

Tiny sizes throughout: the "tiny" Conformer (64 wide) and LM (64 wide), a byte-level BPE tokenizer.
"""

from dataclasses import replace

import pytest
import torch

from adapters.chat import IGNORE_INDEX, encode_header
from adapters.generation import SamplingConfig, collect_ids
from speech.adapter import (SpeechAdapter, adapter_param_count, asr_prompt, ast_prompt, audio_input_id,
                            build_speech_llama, encode_speech_dialog, encode_speech_training_example,
                            speech_adapter_config, speech_decode, speech_llama_config)
from tests.tiny import build_tiny_tokenizer, pad_examples

TEXTS = ["Repeat after me in English:", "Translate the audio into French:", "the cat sat on the mat",
         "hello world", "a quick brown fox"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("speech_tok"), n_merges=40, texts=TEXTS)


def _cfg(tok, **kw):
    cfg = speech_llama_config("tiny", **kw)
    return replace(cfg, lm=replace(cfg.lm, vocab_size=tok.n_words))


def _model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    return build_speech_llama(_cfg(tok, **kw)).eval()


def _waves(lengths, seed=0):
    """Right-padded noise clips (N, max_len) with garbage (not zeros) in the padding."""
    g = torch.Generator().manual_seed(seed)
    waves = 0.1 * torch.randn(len(lengths), max(lengths), generator=g)
    return waves, torch.tensor(lengths)


def _batch(tok, answers=("the cat sat on the mat", "hello")):
    rows = [encode_speech_training_example(tok, asr_prompt(), a) for a in answers]
    return pad_examples(tok, rows), torch.tensor([len(t) for t, _ in rows])


# ---------------------------------------------------------------- adapter


@pytest.mark.parametrize("L", [1, 2, 3, 4, 7, 8, 13])
def test_adapter_out_lengths_odd_and_even(L):
    torch.manual_seed(0)
    adapter = SpeechAdapter(speech_adapter_config("tiny")).eval()
    out, out_lengths = adapter(torch.randn(1, L, 64), torch.tensor([L]))
    assert out_lengths.tolist() == [(L + 1) // 2] and out.shape == (1, (L + 1) // 2, 64)  # ceil(L / 2)
    assert torch.isfinite(out).all()


def test_adapter_padding_invariance():
    torch.manual_seed(0)
    adapter = SpeechAdapter(speech_adapter_config("tiny")).eval()
    lengths = [7, 12, 4, 0]
    x = torch.randn(4, 12, 64) * 5  # padding holds garbage, not zeros
    out, out_lengths = adapter(x, torch.tensor(lengths))
    assert out_lengths.tolist() == [4, 6, 2, 0] and out.shape == (4, 6, 64)
    for b, L in enumerate(lengths):
        n = (L + 1) // 2
        if L:
            alone, _ = adapter(x[b : b + 1, :L], torch.tensor([L]))
            torch.testing.assert_close(out[b, :n], alone[0], rtol=0, atol=1e-6)
        assert out[b, n:].abs().sum() == 0
    assert torch.isfinite(out).all()


def test_adapter_param_counts():
    n8 = adapter_param_count("8B")
    assert 0.08e9 <= n8 <= 0.12e9, n8  # paper: "about 100M"
    assert adapter_param_count("70B") - n8 == 3072 * 4096 + 4096  # only the output projection grows


def test_config_errors():
    with pytest.raises(ValueError):
        speech_adapter_config("nope")
    with pytest.raises(TypeError):
        speech_adapter_config("tiny", bogus=1)
    with pytest.raises(ValueError):
        speech_adapter_config("tiny", n_heads=3)
    with pytest.raises(ValueError):
        speech_llama_config("tiny", adapter=speech_adapter_config("tiny", lm_dim=32))


# ---------------------------------------------------------------- prompts


def test_prompts_and_dialog(tok):
    assert asr_prompt() == "Repeat after me in English:"
    assert ast_prompt("French") == "Translate the audio into French:"
    ids = encode_speech_dialog(tok, asr_prompt(), n_audio=2)
    aid = audio_input_id(tok)
    assert aid == tok.n_words + 2 and ids[0] == tok.bos_id and ids.count(aid) == 2
    user, header = ids.index(aid), encode_header(tok, "user")
    assert ids[user - len(header) : user] == header and ids[user + 2] == tok.eot_id  # audio, then (no) text
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Repeat after me in English:" in tok.decode(ids)
    tokens, labels = encode_speech_training_example(tok, asr_prompt(), "hello world")
    n = len(encode_speech_dialog(tok, asr_prompt()))
    assert tokens[:n] == encode_speech_dialog(tok, asr_prompt()) and labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == tokens[n:] == [*tok.encode("hello world"), tok.eot_id]


# ---------------------------------------------------------------- splice


@pytest.mark.parametrize("with_lengths", [False, True])
def test_splice_embeddings_and_labels(tok, with_lengths):
    model = _model(tok)
    (tokens, labels), token_lengths = _batch(tok)
    audio_lengths = torch.tensor([5, 3])
    audio = torch.randn(2, 5, 64)
    inputs = model.prepare_inputs(tokens, labels, audio, audio_lengths,
                                  token_lengths=token_lengths if with_lengths else None)
    table = model.lm.tok_embeddings.weight
    aid = model.cfg.audio_token_id
    row_len = token_lengths if with_lengths else torch.full((2,), tokens.shape[1])
    assert inputs.lengths.tolist() == (row_len + audio_lengths - 1).tolist()
    assert inputs.embeds.shape[1] == int(inputs.lengths.max())
    for b in range(2):
        T, N = int(row_len[b]), int(audio_lengths[b])
        p = int((tokens[b] == aid).nonzero())
        e, lab = inputs.embeds[b], inputs.labels[b]
        assert torch.equal(e[:p], table[tokens[b, :p]])
        assert torch.equal(e[p : p + N], audio[b, :N])
        assert torch.equal(e[p + N : T + N - 1], table[tokens[b, p + 1 : T]])
        assert torch.equal(lab[:p], labels[b, :p])
        assert (lab[p : p + N] == IGNORE_INDEX).all()
        assert torch.equal(lab[p + N : T + N - 1], labels[b, p + 1 : T])  # shifted by N - 1
        assert (lab[T + N - 1 :] == IGNORE_INDEX).all() and e[T + N - 1 :].abs().sum() == 0
        assert (labels[b] != IGNORE_INDEX).sum() == (lab != IGNORE_INDEX).sum()  # none dropped
        assert inputs.valid[b].sum() == T + N - 1 and bool(inputs.valid[b, : T + N - 1].all())
    assert inputs.attention_mask() is None
    assert torch.equal(inputs.positions, torch.arange(inputs.embeds.shape[1]).expand(2, -1))


def test_splice_left_padding_for_generation(tok):
    model = _model(tok)
    prompt = torch.tensor([encode_speech_dialog(tok, asr_prompt())] * 2)
    audio = torch.randn(2, 6, 64)
    inputs = model.prepare_inputs(prompt, None, audio, torch.tensor([6, 2]), left_pad=True)
    S, T = inputs.embeds.shape[1], prompt.shape[1]
    assert S == T + 5 and inputs.lengths.tolist() == [T + 5, T + 1]
    assert not inputs.valid[1, :4].any() and inputs.valid[1, 4:].all()
    assert inputs.positions[1, 4:].tolist() == list(range(T + 1))
    assert inputs.positions[0].tolist() == list(range(S))
    mask = inputs.attention_mask()[:, 0]
    assert not mask[1, 4:, :4].any()  # real queries never see pad keys
    assert mask[1].any(-1).all()  # no fully masked row
    p = int((prompt[0] == model.cfg.audio_token_id).nonzero())
    suffix = T - p - 1  # the text after the audio ends both rows
    assert inputs.embeds[1, :4].abs().sum() == 0
    assert torch.equal(inputs.embeds[1, -suffix:], inputs.embeds[0, -suffix:])
    assert torch.equal(inputs.embeds[1, 4 + p : 4 + p + 2], audio[1, :2])


def test_splice_never_truncates(tok):
    (tokens, labels), token_lengths = _batch(tok)
    T = tokens.shape[1]
    model = _model(tok, max_seq_len=T + 10)
    model.prepare_inputs(tokens, labels, torch.randn(2, 11, 64), torch.tensor([11, 3]))  # T + 10: fits
    with pytest.raises(ValueError, match="never truncated"):
        model.prepare_inputs(tokens, labels, torch.randn(2, 12, 64), torch.tensor([12, 3]))


def test_splice_rejects_mismatch(tok):
    model = _model(tok)
    (tokens, labels), _ = _batch(tok)
    with pytest.raises(ValueError, match="placeholders"):
        model.prepare_inputs(tokens, labels, torch.randn(1, 5, 64), torch.tensor([5]))
    bad = labels.clone()
    bad[tokens == model.cfg.audio_token_id] = 7
    with pytest.raises(ValueError, match="label"):
        model.prepare_inputs(tokens, bad, torch.randn(2, 5, 64), torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="token ids"):
        model.prepare_inputs(tokens + model.cfg.audio_token_id + 1, None)


# ---------------------------------------------------------------- model


def test_no_audio_logits_equal_frozen_lm(tok):
    model = _model(tok)
    tokens = torch.randint(0, tok.n_words, (2, 12))
    out = model(tokens)
    assert torch.equal(out.logits, model.lm(tokens))


def test_training_step_leaves_lm_untouched(tok):
    model = _model(tok).train()
    assert not model.lm.training and model.encoder.training and model.adapter.training
    assert not any(p.requires_grad for p in model.lm.parameters())
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    (tokens, labels), token_lengths = _batch(tok)
    waves, wave_lengths = _waves([8000, 5000])
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-3)
    out = model(tokens, labels, waves, wave_lengths, token_lengths=token_lengths, return_logits=False)
    assert out.logits is None and out.n_tokens == (labels != IGNORE_INDEX).sum()  # every answer token
    assert torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.lm.parameters())
    after = model.lm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for name, p in [*model.encoder.named_parameters(), *model.adapter.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.adapter.output.weight.grad.abs().sum() > 0
    assert model.encoder.stacker.proj.weight.grad.abs().sum() > 0
    assert {n.split(".")[0] for n, _ in model.trainable_named_parameters()} == {"encoder", "adapter"}


def test_loss_is_mean_ce_over_answer_tokens(tok):
    model = _model(tok)
    (tokens, labels), token_lengths = _batch(tok)
    waves, wave_lengths = _waves([6000, 9000])
    out = model(tokens, labels, waves, wave_lengths, token_lengths=token_lengths)
    lab = out.inputs.labels
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(),
                                            ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref)


def test_greedy_generation_matches_full_recompute(tok):
    model = _model(tok)
    prompt = torch.tensor([encode_speech_dialog(tok, asr_prompt())] * 2)
    waves, wave_lengths = _waves([8000, 3000], seed=1)
    rows = collect_ids(speech_decode(model, prompt, waves, wave_lengths, SamplingConfig(max_new_tokens=4)))
    assert [len(r) for r in rows] == [4, 4] and all(0 <= t < tok.n_words for r in rows for t in r)
    with torch.no_grad():
        for b in range(2):  # each row alone, no cache, no padding
            seq = prompt[b : b + 1]
            for t in rows[b]:
                logits = model(seq, waves=waves[b : b + 1, : wave_lengths[b]]).logits
                assert int(logits[0, -1].argmax()) == t
                seq = torch.cat([seq, torch.tensor([[t]])], 1)
    first = rows[0][0]
    steps = speech_decode(model, prompt[:1], waves[:1], wave_lengths[:1], SamplingConfig(max_new_tokens=4), {first})
    assert collect_ids(steps, {first}) == [[]]


def test_generation_without_audio_runs(tok):
    model = _model(tok)
    prompt = torch.randint(0, tok.n_words, (1, 6))
    rows = collect_ids(speech_decode(model, prompt, None, None, SamplingConfig(max_new_tokens=3)))
    with torch.no_grad():
        seq = prompt
        for t in rows[0]:
            assert int(model.lm(seq)[0, -1].argmax()) == t
            seq = torch.cat([seq, torch.tensor([[t]])], 1)


def test_model_batch_invariance_and_audio_positions(tok):
    """End to end (log-mel, Conformer, adapter, splice, LM): a row's logits do not depend on its batch-mate,
    and the spliced audio positions hold exactly the adapter outputs."""
    model = _model(tok)
    (tokens, labels), token_lengths = _batch(tok)
    waves, wave_lengths = _waves([9000, 4000], seed=2)
    with torch.no_grad():
        out = model(tokens, labels, waves, wave_lengths, token_lengths=token_lengths)
        emb, emb_lengths = model.encode_audio(waves, wave_lengths)
        aid = model.cfg.audio_token_id
        for b in range(2):
            T, N = int(token_lengths[b]), int(emb_lengths[b])
            p = int((tokens[b] == aid).nonzero())
            assert torch.equal(out.inputs.embeds[b, p : p + N], emb[b, :N])
            alone = model(tokens[b : b + 1, :T], labels[b : b + 1, :T], waves[b : b + 1, : wave_lengths[b]])
            L = T + N - 1
            assert alone.logits.shape[1] == L
            torch.testing.assert_close(out.logits[b, :L], alone.logits[0], rtol=0, atol=1e-5)
