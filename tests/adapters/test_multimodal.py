"""Invariants of the composed model: identity at init, frozen LM, masks, mixed batches, cached decoding."""

import pytest
import torch

from adapters.cross_attention import fusion_schedule, image_intervals, xattn_schedule
from adapters.generation import SamplingConfig, collect_ids, generate, sample_next
from adapters.multimodal import ImageBatch, build_multimodal, multimodal_config
from adapters.task import ImageTextTask, build_param_groups, shift_targets

IMG = 512  # tiny LM vocab: the image token enters as id 512 (first learnable row)


def _images(B, I, n_real, seed=0, layouts=((1, 2),)):
    cfg = multimodal_config("tiny").vision
    g = torch.Generator().manual_seed(seed)
    S, tiles = cfg.tile_size, cfg.max_tiles
    tile_mask = torch.zeros(B, I, tiles, dtype=torch.bool)
    lay = torch.ones(B, I, 2, dtype=torch.long)
    image_mask = torch.zeros(B, I, dtype=torch.bool)
    for b in range(B):
        for i in range(n_real[b]):
            r, c = layouts[(b + i) % len(layouts)]
            lay[b, i] = torch.tensor([r, c])
            tile_mask[b, i, : r * c] = True
            image_mask[b, i] = True
    return ImageBatch(torch.randn(B, I, tiles, 3, S, S, generator=g), lay, tile_mask, image_mask)


def _perturb_gates(model, value=0.7):
    with torch.no_grad():
        for blk in model.cross_attention_layers:
            blk.gate_attn.fill_(value)
            blk.gate_ffwd.fill_(-value)
        for name, p in model.vision.named_parameters():
            if "gate" in name:
                p.fill_(0.5)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_multimodal("tiny")


def _tokens(rows, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 500, (len(rows), T), generator=g)
    for b, positions in enumerate(rows):
        for p in positions:
            t[b, p] = IMG
    return t


def test_fresh_model_gives_exactly_the_frozen_lm_logits(model):
    text = _tokens([[], []])
    with torch.no_grad():
        assert torch.equal(model(text), model.lm(text))
        tokens = _tokens([[2], [0, 9]])
        images = _images(2, 2, [1, 2])
        # Zero gates: the whole adapter path adds exactly nothing.
        assert torch.equal(model(tokens, images), model(tokens))


def test_schedule_reproduces_release():
    assert fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert fusion_schedule(80, 20) == list(range(3, 80, 4))
    assert xattn_schedule(32, 4) == fusion_schedule(32, 8) and xattn_schedule(80, 4) == fusion_schedule(80, 20)
    assert xattn_schedule(126, 4) == list(range(5, 126, 4))  # 405B: 31 blocks
    m = multimodal_config("11B")
    assert m.n_xattn == 8 and multimodal_config("90B").n_xattn == 20


def test_image_intervals_match_meta_rules():
    assert image_intervals([5, IMG, 1, 2], IMG) == [(1, 4)]
    assert image_intervals([IMG, 1, IMG, 2, 3], IMG) == [(0, 2), (2, 5)]
    # a run of consecutive images is seen by the text after the run
    assert image_intervals([IMG, IMG, 1, 2, IMG, 3], IMG) == [(0, 4), (1, 4), (4, 6)]


def test_text_before_first_image_gets_exactly_zero(model):
    _perturb_gates(model)
    tokens = _tokens([[6]])
    images = _images(1, 1, [1])
    with torch.no_grad():
        with_img = model(tokens, images)
        without = model(tokens)
    # rows 0..5 precede the image token: bitwise identical to the LM (HF leaks here, #39379)
    assert torch.equal(with_img[:, :6], without[:, :6])
    assert not torch.allclose(with_img[:, 6:], without[:, 6:])


def test_mixed_batch_text_rows_unaffected_and_image_rows_independent(model):
    _perturb_gates(model)
    tokens = _tokens([[], [3], [1, 8]], seed=3)
    images = _images(3, 2, [0, 1, 2], seed=4, layouts=((1, 2), (2, 2), (1, 1)))
    with torch.no_grad():
        batch = model(tokens, images)
        alone = model(tokens[2:3], ImageBatch(images.tiles[2:3], images.layouts[2:3], images.tile_mask[2:3],
                                              images.image_mask[2:3]))
        text_alone = model.lm(tokens[:1])
    assert torch.equal(batch[0:1], text_alone)  # text-only row in a mixed batch: exactly the LM
    torch.testing.assert_close(batch[2:3], alone, atol=1e-5, rtol=0)


def test_padded_tiles_are_invisible_to_cross_attention(model):
    _perturb_gates(model)
    tokens = _tokens([[2]])
    images = _images(1, 1, [1], layouts=((1, 2),))
    ctx = model.vision_context(tokens, images)
    n = ctx.tokens_per_tile
    # Overwrite the cached K/V of the padded tiles (slots 2, 3) with noise: the output must not move.
    noisy = []
    for k, v in ctx.kv:
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 2 * n :] = torch.randn_like(k2[:, :, 2 * n :]) * 10
        v2[:, :, 2 * n :] = torch.randn_like(v2[:, :, 2 * n :]) * 10
        noisy.append((k2, v2))
    with torch.no_grad():
        ref = model(tokens, context=ctx)
        ctx.kv = noisy
        torch.testing.assert_close(model(tokens, context=ctx), ref, atol=1e-5, rtol=0)


def test_image_count_mismatch_is_an_error(model):
    with pytest.raises(ValueError, match="row 0"):
        model(_tokens([[2, 5]]), _images(1, 1, [1]))


def test_training_keeps_lm_bitwise_frozen_and_gradient_free(model):
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    task = ImageTextTask(model).train()
    opt = torch.optim.AdamW(build_param_groups(model, lr=1e-2), lr=1e-2)
    tokens = _tokens([[1], [2]])
    labels = tokens.clone()
    labels[:, :8] = -100
    images = _images(2, 1, [1, 1])
    for _ in range(3):
        loss = task(tokens, labels, images)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None and not p.requires_grad for p in model.lm.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.lm.state_dict().items())
    assert any(blk.gate_attn.item() != 0 for blk in model.cross_attention_layers)
    assert not model.lm.training


def test_param_groups_cover_trainables_once_and_freeze_switch():
    m = build_multimodal(multimodal_config("tiny", train_vision=False))
    groups = build_param_groups(m, lr=1e-3)
    names = {id(p): n for n, p in m.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert not any(n.startswith(("lm.", "vision.")) for n in grouped)
    assert any(n.startswith("cross_attention_layers") for n in grouped)
    assert any(n.startswith("projector") for n in grouped) and "learnable_embedding.weight" in grouped


@pytest.mark.parametrize("train_rows", [True, False])
def test_frozen_image_rows_stop_backward_at_the_first_cross_attention_block(train_rows):
    torch.manual_seed(0)
    m = build_multimodal(multimodal_config("tiny", train_image_token_rows=train_rows))
    assert m.schedule[0] >= 1  # an LM layer sits below the first cross-attention block
    _perturb_gates(m)
    below = []
    m.lm.layers[0].register_full_backward_hook(lambda *_: below.append(1))
    tokens = _tokens([[1]])
    labels = tokens.clone()
    labels[:, :8] = -100
    ImageTextTask(m)(tokens, labels, _images(1, 1, [1]))["loss"].backward()
    assert (m.learnable_embedding.weight.grad is not None) == train_rows
    assert bool(below) == train_rows  # frozen rows: nothing below the first block needs a gradient
    assert m.cross_attention_layers[0].gate_attn.grad is not None


def test_encoder_lr_scale_applies_to_vision_parameters_only():
    m = build_multimodal(multimodal_config("tiny"))
    names = {id(p): n for n, p in m.named_parameters()}
    groups = build_param_groups(m, lr=1e-3, weight_decay=0.1, encoder_lr_scale=0.1)
    for g in groups:
        in_vision = {names[id(p)].startswith("vision.") for p in g["params"]}
        assert len(in_vision) == 1  # a group never mixes encoder and adapter parameters
        assert g["lr"] == pytest.approx(1e-4 if in_vision.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())


def test_labels_never_target_the_image_token():
    labels = torch.tensor([[1, IMG, 3, 4]])
    assert shift_targets(labels, vocab_size=IMG).tolist() == [[-100, 3, 4, -100]]


def test_cached_decoding_equals_full_forward(model):
    _perturb_gates(model)
    prompt = _tokens([[1], [1]], T=10)
    images = _images(2, 1, [1, 1], layouts=((2, 2), (1, 3)))
    steps = list(generate(model, prompt, images, SamplingConfig(max_new_tokens=6)))
    full_seq = torch.cat([prompt, torch.stack(steps, 1)], 1)
    with torch.no_grad():
        full = model(full_seq, images)
    # greedy choices from the cached path equal argmax of the full forward at each position
    assert torch.equal(full[:, 9:-1].argmax(-1), torch.stack(steps, 1))


def test_vision_kv_cache_is_at_kv_head_count(model):
    ctx = model.vision_context(_tokens([[1]]), _images(1, 1, [1]))
    k, v = ctx.kv[0]
    assert k.shape[1] == model.cfg.lm.n_kv_heads < model.cfg.lm.n_heads


def test_top_p_sampling_only_picks_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 0.8, g).item() for _ in range(200)}
    assert picks == {0, 1}
    assert sample_next(logits, 0.0, 1.0, None).item() == 0


def test_generation_stops_on_eot(model):
    ids = collect_ids(generate(model, _tokens([[]], T=5), None, SamplingConfig(max_new_tokens=5), stop_ids=range(512)),
                      range(512))
    assert ids == [[]]


def test_packed_documents_compute_what_each_document_computes_alone(model):
    """One row holding three documents (image + text, image + text, text only) with doc_ids gives, at
    every position, the logits of that document run alone: no text, image or position leaks across."""
    _perturb_gates(model)
    model.eval()
    lens, img_at = [7, 6, 5], [1, 1, None]
    docs = [_tokens([[p] if p is not None else []], T=n, seed=10 + i)[0] for i, (n, p) in enumerate(zip(lens, img_at))]
    both = _images(1, 2, [2], seed=3, layouts=((1, 2), (2, 1)))
    alone = [ImageBatch(both.tiles[:, i : i + 1], both.layouts[:, i : i + 1], both.tile_mask[:, i : i + 1],
                        both.image_mask[:, i : i + 1]) for i in range(2)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    with torch.no_grad():
        out = model(packed, both, doc_ids=doc_ids)[0]
        ref = torch.cat([model(docs[0][None], alone[0])[0], model(docs[1][None], alone[1])[0], model(docs[2][None])[0]])
        unmasked = model(packed, both)[0]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[lens[0]:], ref[lens[0]:], atol=1e-3)  # without doc_ids they leak
    with pytest.raises(ValueError, match="not cached decoding"):
        model(packed, both, doc_ids=doc_ids, start_pos=3)
