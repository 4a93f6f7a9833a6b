"""The generation API: top-k / top-p / temperature sampling, stop strings streamed as text, ragged batches of
image, text-only and 2-image rows, the `stream` iterator and the model steps it takes."""

import pytest
import torch

from adapters.generation import (GenerationLengthError, SamplingConfig, TextStreamer, collect_ids, generate,
                                 sample_next, sampling_probs, stream, stream_text)
from adapters.multimodal import ImageBatch, build_multimodal
from tests.adapters.test_multimodal import _images as multimodal_images

IMG = 512  # the tiny LM's image token (first learnable row)


class ScriptTokenizer:
    """Ids -> fixed byte strings (a character may span ids); ``stop_ids`` as a real tokenizer has them."""

    def __init__(self, vocab: dict[int, bytes], stop_ids=()):
        self.vocab, self.stop_ids = vocab, set(stop_ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.vocab[i] for i in ids)


E_ACUTE, ARROW = "é".encode(), "→".encode()
VOCAB = {0: b"Hel", 1: b"lo", 2: b" wo", 3: b"rld", 4: b"E", 5: b"N", 6: b"D", 7: E_ACUTE[:1], 8: E_ACUTE[1:],
         9: b"!", 10: ARROW[:2], 11: ARROW[2:], 99: b"<eot>"}
SCRIPT = ScriptTokenizer(VOCAB, stop_ids={99})


class NumberTokenizer:
    """Every id of the tiny LM's vocabulary as "<id>": multi-character pieces, no stop id."""

    stop_ids = frozenset()

    def decode_bytes(self, ids: list[int]) -> bytes:
        return "".join(f"<{i}>" for i in ids).encode()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_multimodal("tiny").eval()
    with torch.no_grad():  # open the gates: the images must matter
        for blk in m.cross_attention_layers:
            blk.gate_attn.fill_(0.7)
            blk.gate_ffwd.fill_(-0.7)
    return m


def _row(n: int, image_at: list[int], seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (n,), generator=g).tolist()
    for p in image_at:
        ids[p] = IMG
    return ids


def _images(n_real: list[int]) -> ImageBatch:
    """Up to 2 images per row, of 2, 4 and 2 tiles."""
    return multimodal_images(len(n_real), 2, n_real, layouts=((1, 2), (2, 2), (2, 1)))


def _row_of(images: ImageBatch, b: int) -> ImageBatch:
    return ImageBatch(images.tiles[b : b + 1], images.layouts[b : b + 1], images.tile_mask[b : b + 1],
                      images.image_mask[b : b + 1])


# an image row, a text-only row and a 2-image row of three different lengths
ROWS = [_row(9, [1], seed=1), _row(5, [], seed=2), _row(13, [0, 6], seed=3)]
N_IMAGES = [1, 0, 2]


def _logged_generate(model, prompt, images, sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, n) and the logits each step sampled from (B, n, V), read at the LM head."""
    logits = []  # the prefill's last position (B, V), then one (B, 1, V) per step
    hook = model.lm.output.register_forward_hook(lambda m, i, o: logits.append(o if o.dim() == 2 else o[:, -1]))
    try:
        tokens = torch.stack(list(generate(model, prompt, images, sampling)), 1)
    finally:
        hook.remove()
    return tokens, torch.stack(logits, 1)


# ---------------------------------------------------------------- sampling: temperature, top-k, top-p


def _brute_force_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The same distribution, token by token in plain Python."""
    import math
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if top_k else order
    z = sum(math.exp(logits[i] / temperature) for i in kept)
    p = {i: math.exp(logits[i] / temperature) / z for i in kept}
    nucleus, mass = [], 0.0
    for i in kept:
        nucleus.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    total = sum(p[i] for i in nucleus)
    return [p[i] / total if i in nucleus else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.7, 8, 0.8), (1.3, 0, 0.6), (1.0, 3, 0.5),
                                                       (2.0, 40, 0.95)])
def test_top_k_then_top_p_equals_a_brute_force_distribution(temperature, top_k, top_p):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2
    got = sampling_probs(logits, temperature, top_p, top_k)
    want = torch.tensor([_brute_force_probs(row, temperature, top_k, top_p) for row in logits.tolist()])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 8, 0.8), (1.0, 3, 1.0), (1.5, 0, 0.7)])
def test_same_distribution_as_the_hf_warpers(temperature, top_k, top_p):
    import transformers  # a dev dependency: the reference, never skipped
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3
    hf = transformers.TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        hf = transformers.TopKLogitsWarper(top_k)(None, hf)
    hf = transformers.TopPLogitsWarper(top_p)(None, hf)
    torch.testing.assert_close(sampling_probs(logits, temperature, top_p, top_k), torch.softmax(hf, -1),
                               atol=1e-6, rtol=1e-5)


def test_sampled_ids_never_leave_the_top_k_set():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    top = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(4)]
    for _ in range(300):
        for b, t in enumerate(sample_next(logits, 1.5, 1.0, g, top_k=5).tolist()):
            seen[b].add(t)
    for b in range(4):
        assert seen[b] <= set(top[b].tolist()) and len(seen[b]) > 1  # sampled, within the set


def test_top_k_1_is_greedy(model):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, 1.0, 1.0, g, top_k=1), logits.argmax(-1))
    prompt = torch.tensor([ROWS[0][:5], ROWS[1]])
    greedy = torch.stack(list(generate(model, prompt, sampling=SamplingConfig(max_new_tokens=5))), 1)
    top1 = torch.stack(list(generate(model, prompt, sampling=SamplingConfig(5, temperature=1.3, top_k=1, seed=4))), 1)
    assert torch.equal(top1, greedy)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": -1}, r"top_k must be an integer >= 0 \(0 = off\), got -1"),
    ({"top_k": 2.5}, r"top_k must be an integer >= 0 \(0 = off\), got 2.5"),
    ({"stop": ("ok", 3)}, "stop strings must be non-empty strings, got 3"),
    ({"stop": ("ok", "")}, "stop strings must be non-empty strings, got ''"),
])
def test_sampling_config_names_the_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
    assert SamplingConfig(stop=["a", "b"]).stop == ("a", "b") and SamplingConfig(stop="END").stop == ("END",)


def test_generate_refuses_stop_strings_it_cannot_see(model):
    with pytest.raises(ValueError, match="SamplingConfig.stop: stop strings are matched on text"):
        next(generate(model, [ROWS[1]], sampling=SamplingConfig(stop=("x",))))


# ---------------------------------------------------------------- stop strings on text


def _pieces(ids, stops):
    streamer = TextStreamer(SCRIPT, SCRIPT.stop_ids, stops)
    pieces = [streamer.push(t) for t in ids]
    return pieces, streamer


def test_a_stop_string_spread_over_tokens_is_held_back_and_cut():
    pieces, s = _pieces([0, 1, 4, 5, 6, 9], ("END",))
    assert pieces == ["Hel", "lo", "", "", "", ""] and s.done and s.text == "Hello"
    rest = iter([0, 1, 4, 5, 6, 9, 3])
    assert "".join(stream_text(SCRIPT, rest, stop_strings=("END",))) == "Hello"
    assert next(rest) == 9  # stream_text stopped pulling tokens at the stop
    pieces, s = _pieces([0, 1, 2], ("lo w", "o"))  # the earliest of several, inside a token; "l" may begin "lo w"
    assert pieces == ["He", "ll", ""] and s.text == "Hell"


def test_a_stop_string_that_never_completes_is_flushed():
    pieces, s = _pieces([0, 4, 5], ("END",))
    assert pieces == ["Hel", "", ""] and not s.done
    assert s.finish() == "EN" and s.done and s.text == "HelEN"
    pieces, s = _pieces([0, 4, 5, 9], ("END",))  # broken off: released at once
    assert pieces == ["Hel", "", "", "EN!"]
    pieces, s = _pieces([0, 4, 99, 6], ("END",))  # a stop id releases what was held
    assert pieces == ["Hel", "", "E", ""] and s.text == "HelE"
    assert list(stream_text(SCRIPT, [0, 4, 5], stop_strings=("END",))) == ["Hel", "EN"]


def test_multibyte_characters_stay_whole():
    pieces, s = _pieces([0, 7, 8, 10, 11, 9], ())
    assert pieces == ["Hel", "", "é", "", "→", "!"]
    pieces, s = _pieces([0, 7, 8, 9], ("é!",))
    assert pieces == ["Hel", "", "", ""] and s.text == "Hel"
    pieces, s = _pieces([0, 10, 11, 1], ("→",))  # a stop string inside one character split over tokens
    assert pieces == ["Hel", "", "", ""] and s.done and s.text == "Hel"
    pieces, s = _pieces([0, 7, 8, 1], ("éX",))
    assert pieces == ["Hel", "", "", "élo"]
    assert list(stream_text(SCRIPT, [0, 7])) == ["Hel", "\ufffd"]  # a cut-off character at the very end


def _expected(texts: list[str], stops: tuple[str, ...]) -> tuple[str, int]:
    """A row's text cut before its first stop string, and the token (1-based) that completed it (0: none)."""
    for k in range(1, len(texts) + 1):
        text = "".join(texts[:k])
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], k
    return "".join(texts), 0


def test_stream_stops_the_model_at_the_stop_strings(model):
    """Batched stream with a stop string per row: each row's text is cut before it, and the model takes no step
    after the last row's stop completes (forward calls: the prefill and one per further token)."""
    tok, n = NumberTokenizer(), 12
    prompt = [ROWS[0], ROWS[1]]
    tokens = torch.stack(list(generate(model, prompt, _images([1, 0]), SamplingConfig(n))), 1)
    texts = [[f"<{t}>" for t in row] for row in tokens.tolist()]
    stops = tuple("".join(row)[5:5 + 12] for row in texts)  # each spans >= 3 tokens (pieces are <= 5 characters)
    want = [_expected(row, stops) for row in texts]
    assert all(0 < k < n for _, k in want)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        steps = list(stream(model, tok, prompt, SamplingConfig(n, stop=stops), _images([1, 0])))
    finally:
        hook.remove()
    assert ["".join(p[b] for p in steps) for b in range(2)] == [text for text, _ in want]
    last = max(k for _, k in want)
    assert len(steps) == last and len(calls) == last  # 0 steps after the stop


def test_stream_without_stop_strings_equals_the_token_loop(model):
    tok = NumberTokenizer()
    sampling = SamplingConfig(6, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    ids = collect_ids(generate(model, ROWS, _images(N_IMAGES), sampling))
    steps = list(stream(model, tok, ROWS, sampling, _images(N_IMAGES)))
    assert len(steps) == 6 and all(len(p) == 3 for p in steps)
    assert ["".join(p[b] for p in steps) for b in range(3)] == ["".join(f"<{t}>" for t in row) for row in ids]
    it = stream(model, tok, ROWS, sampling, _images(N_IMAGES))
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        next(it), next(it)
        it.close()  # a consumer that closes early stops the model too
    finally:
        hook.remove()
    assert len(calls) == 2


# ---------------------------------------------------------------- ragged batches, mixed image / text-only rows


def test_ragged_mixed_batch_equals_each_row_alone(model):
    images = _images(N_IMAGES)
    sampling = SamplingConfig(max_new_tokens=6)
    tokens, logits = _logged_generate(model, ROWS, images, sampling)
    assert logits.shape == (3, 6, model.cfg.lm.vocab_size)
    for b, row in enumerate(ROWS):
        alone = _row_of(images, b) if N_IMAGES[b] else None
        t, lg = _logged_generate(model, torch.tensor([row]), alone, sampling)
        assert torch.equal(tokens[b], t[0]), b
        torch.testing.assert_close(logits[b], lg[0], atol=1e-5, rtol=0)
    # the images matter (gates open), so the equality above is not a text-only coincidence
    _, blind = _logged_generate(model, torch.tensor([ROWS[2]]), None, sampling)
    assert (blind[0, 0] - logits[2, 0]).abs().max() > 1e-3


def test_seeded_sampling_of_a_ragged_batch_is_reproducible(model):
    def run(seed):
        sampling = SamplingConfig(8, temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        return torch.stack(list(generate(model, ROWS, _images(N_IMAGES), sampling)), 1)
    first = run(7)
    assert torch.equal(first, run(7)) and not torch.equal(first, run(8))


def test_no_mask_without_padding(model, monkeypatch):
    import adapters.multimodal as mm
    seen = []
    real = mm.build_attention_mask

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(mm, "build_attention_mask", spy)
    same = [ROWS[0][:5], ROWS[1]]
    list(generate(model, same, _images([1, 0]), SamplingConfig(3)))
    list(generate(model, torch.tensor(same), _images([1, 0]), SamplingConfig(3)))
    assert len(seen) == 6 and all(m is None for m in seen)
    list(generate(model, ROWS[:2], _images([1, 0]), SamplingConfig(3)))
    assert [tuple(m.shape) for m in seen[6:]] == [(2, 1, 9, 9), (2, 1, 1, 10), (2, 1, 1, 11)]


def test_the_longest_row_decides_the_length_check(model):
    limit = model.cfg.lm.max_seq_len
    rows = [[1, 2, 3], list(range(1, limit - 1))]
    with pytest.raises(GenerationLengthError, match=rf"prompt \({limit - 2} tokens\) plus max_new_tokens \(3\)"):
        next(generate(model, rows, sampling=SamplingConfig(3)))
    with pytest.raises(GenerationLengthError, match=rf"prompt \({limit - 2} tokens\)"):
        next(stream(model, NumberTokenizer(), rows, SamplingConfig(3)))
    assert len(list(generate(model, rows, sampling=SamplingConfig(2)))) == 2
    with pytest.raises(ValueError, match="every prompt row needs at least one token"):
        next(generate(model, [[1], []]))
