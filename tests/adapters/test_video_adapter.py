"""The video adapter: identity at init, schedule, aggregator masking, batch padding invariance, frozen
image model, precomputed frame features, cached generation with a video, short clips, config errors.

Tiny sizes throughout (the "tiny" multimodal preset: 64-wide LM, 56 px tiles of 17 tokens). The tiny LM
has only 2 image cross-attention blocks, so the video config uses ``every=1`` (as `tests.tiny.tiny_video_config`
does): with the paper's ``every=4`` it would get no video block at all, and building it is an error.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from adapters.aggregator import AggregatorConfig, TemporalAggregator
from adapters.chat import Message, encode_dialog, video_input_id
from adapters.cross_attention import xattn_schedule
from adapters.generation import SamplingConfig, collect_ids, generate
from adapters.llama import build_llama
from adapters.multimodal import build_multimodal, multimodal_config
from adapters.task import ImageTextTask, build_param_groups
from adapters.video_adapter import VideoAdapterConfig, VideoBatch, frame_token_mask, video_schedule
from media.video import VideoReader
from synthetic.motion import make_motion_clips
from tests.adapters.test_multimodal import _images
from vision.frames import TiledVideo, collate_videos, tile_frames, video_tiling

IMG, VID = 512, 513  # tiny LM vocab 512: <|image|> enters as 512, <|video|> as 513
TOKENS = 17  # tokens per tile of the tiny encoder (4 x 4 patches + CLS)


# ---------------------------------------------------------------- helpers


def _cfg(max_frames=64, every=1, **kw):
    return multimodal_config("tiny", video=VideoAdapterConfig(max_frames=max_frames, every=every, **kw))


def _model(cfg=None, seed=0):
    torch.manual_seed(seed)
    return build_multimodal(cfg or _cfg()).eval()


def _clip(n_frames, seed, repeats=()):
    """A TiledVideo of random one-tile frames; frames in ``repeats`` are masked (their tiles zero)."""
    S = multimodal_config("tiny").vision.tile_size
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randn(n_frames, 1, 3, S, S, generator=g)
    frame_mask = torch.ones(n_frames, dtype=torch.bool)
    for i in repeats:
        frame_mask[i] = False
        tiles[i] = 0
    return TiledVideo(tiles, torch.ones(n_frames, 2, dtype=torch.long), torch.ones(n_frames, 1, dtype=torch.bool),
                      frame_mask)


def _videos(rows, max_videos=None):
    return VideoBatch.from_collated(collate_videos(rows, max_videos)).trimmed()


def _tokens(rows, T=16, seed=0):
    """rows: per batch row, {position: media token}; the rest random text ids."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 500, (len(rows), T), generator=g)
    for b, media in enumerate(rows):
        for p, tok in media.items():
            t[b, p] = tok
    return t


def _perturb_gates(model, value=0.7, image=True):
    with torch.no_grad():
        for blk in model.video.cross_attention_layers:
            blk.gate_attn.fill_(value)
            blk.gate_ffwd.fill_(-value)
        if image:
            for blk in model.cross_attention_layers:
                blk.gate_attn.fill_(-value)
                blk.gate_ffwd.fill_(value)


# ---------------------------------------------------------------- 1. zero gates


def test_fresh_video_adapter_gives_exactly_the_image_models_logits():
    cfg = _cfg(max_frames=16)
    torch.manual_seed(0)
    lm = build_llama(cfg.lm)
    image_model = build_multimodal(replace(cfg, video=None), lm).eval()
    with torch.no_grad():  # a trained image model: its own cross-attention does something
        for blk in image_model.cross_attention_layers:
            blk.gate_attn.fill_(0.6)
            blk.gate_ffwd.fill_(-0.4)
    torch.manual_seed(1)
    video_model = build_multimodal(cfg, lm).eval()
    missing, unexpected = video_model.load_state_dict(image_model.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("video.") for k in missing)
    assert len(video_model.video.cross_attention_layers) == 2  # every=1 on the tiny 2-block schedule

    videos = _videos([[_clip(5, 1)], [_clip(12, 2, repeats=(3, 4))]])
    tokens = _tokens([{2: VID}, {0: VID}])
    with torch.no_grad():
        assert torch.equal(video_model(tokens, videos=videos), image_model(tokens))
        # images and a video in the same prompts
        both = _tokens([{1: VID, 3: IMG}, {0: VID, 5: IMG, 9: IMG}], seed=1)
        images = _images(2, 2, [1, 2])
        ref = image_model(both, images)
        assert torch.equal(video_model(both, images, videos), ref)
        # the check can fail: open the video gates and the rows after the video token move, not those before
        _perturb_gates(video_model, image=False)
        out = video_model(tokens, videos=videos)
    ref = image_model(tokens)
    assert torch.equal(out[0, :2], ref[0, :2])
    assert not torch.allclose(out[0, 2:], ref[0, 2:])


# ---------------------------------------------------------------- 2. schedule


def test_video_schedule_every_fourth_image_block():
    assert video_schedule(list(range(3, 32, 4)), 4) == [15, 31]
    assert video_schedule(list(range(3, 80, 4)), 4) == [15, 31, 47, 63, 79]
    every = VideoAdapterConfig().every
    assert every == 4
    for name, n_video in (("11B", 2), ("90B", 5)):
        cfg = multimodal_config(name)  # config only: no big model is built
        sched = xattn_schedule(cfg.lm.n_layers, cfg.xattn_every)
        vs = video_schedule(sched, every)
        assert len(vs) == n_video and set(vs) <= set(sched)
    assert video_schedule(xattn_schedule(32, 4), 4) == [15, 31]
    # the model wires one video block per scheduled layer
    m = _model(_cfg(max_frames=4, every=2))
    assert m.video_schedule == [3] and len(m.video.cross_attention_layers) == 1


# ---------------------------------------------------------------- 3. aggregator


@pytest.fixture(scope="module")
def aggregator():
    torch.manual_seed(0)
    return TemporalAggregator(AggregatorConfig(dim=32, n_latents=5, n_heads=4, n_kv_heads=2, depth=2)).eval()


def _frames(n, F, P=6, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, F, P, D, generator=g)


def test_aggregator_shapes_and_chunk_mask(aggregator):
    with torch.no_grad():
        out, chunks = aggregator(_frames(2, 64), torch.ones(2, 64, 6, dtype=torch.bool))
        assert out.shape == (2, 2, 5, 32) and chunks.tolist() == [[True, True]] * 2
        out, chunks = aggregator(_frames(3, 16), torch.ones(3, 16, 6, dtype=torch.bool))
        assert out.shape == (3, 1, 5, 32) and chunks.tolist() == [[True]] * 3
        out, chunks = aggregator(_frames(1, 33), torch.ones(1, 33, 6, dtype=torch.bool))
        assert out.shape == (1, 2, 5, 32) and chunks.tolist() == [[True, True]]
    with pytest.raises(ValueError, match="token_mask"):
        aggregator(_frames(1, 16), torch.ones(1, 15, 6, dtype=torch.bool))


def test_aggregator_output_does_not_depend_on_padding(aggregator):
    frames16 = _frames(2, 16)
    mask16 = torch.ones(2, 16, 6, dtype=torch.bool)
    with torch.no_grad():
        ref, _ = aggregator(frames16, mask16)
        for F_ in (32, 48):
            garbage = 100 * _frames(2, F_ - 16, seed=F_)
            frames = torch.cat([frames16, garbage], 1)
            mask = torch.cat([mask16, torch.zeros(2, F_ - 16, 6, dtype=torch.bool)], 1)
            out, chunks = aggregator(frames, mask)
            torch.testing.assert_close(out[:, :1], ref, atol=1e-5, rtol=0)
            if F_ == 48:  # the second chunk holds padding only: invalid, but finite
                assert chunks.tolist() == [[True, False]] * 2
                assert torch.isfinite(out[:, 1]).all()
            else:
                assert chunks.tolist() == [[True]] * 2
        # a real frame in the padding does change the output (the check above can fail)
        mask = torch.cat([mask16, torch.zeros(2, 16, 6, dtype=torch.bool)], 1)
        mask[:, 20] = True
        out, _ = aggregator(torch.cat([frames16, _frames(2, 16, seed=5)], 1), mask)
    assert not torch.allclose(out, ref, atol=1e-3)


def test_aggregator_ignores_the_content_of_masked_frames_and_tokens(aggregator):
    frames = _frames(2, 64, seed=1)
    mask = torch.ones(2, 64, 6, dtype=torch.bool)
    mask[0, 1::3] = False  # repeated frames
    mask[1, 40:] = False  # a short video: frames past its end
    mask[:, :, 4:] = False  # padded tile tokens
    noisy = frames.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), 32)
    with torch.no_grad():
        ref, ref_chunks = aggregator(frames, mask)
        out, chunks = aggregator(noisy, mask)
        all_pad = mask.clone()
        all_pad[:, 32:] = False
        out_pad, pad_chunks = aggregator(noisy, all_pad)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(chunks, ref_chunks) and chunks.all()
    assert pad_chunks.tolist() == [[True, False]] * 2 and torch.isfinite(out_pad).all()


# ---------------------------------------------------------------- 4. batch padding invariance


def test_encode_videos_is_independent_of_batch_padding():
    model = _model()
    a, b = _clip(6, 1, repeats=(2,)), _clip(40, 2)
    with torch.no_grad():
        alone, alone_chunks = model.encode_videos(_videos([[a]]))
        b_alone, _ = model.encode_videos(_videos([[b]]))
        out, chunks = model.encode_videos(_videos([[a], [b]], max_videos=2))  # slot 1 of each row: padding
    L, D = TOKENS, model.cfg.lm.dim
    assert alone.shape == (1, L, D) and alone_chunks.tolist() == [[[True]]]
    assert out.shape == (2, 2 * 2 * L, D)
    out = out.view(2, 2, 2, L, D)  # (B, V, K, L, D)
    assert chunks.tolist() == [[[True, False], [False, False]], [[True, True], [False, False]]]
    torch.testing.assert_close(out[0, 0, 0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 0], b_alone[0].view(2, L, D), atol=1e-5, rtol=0)
    assert torch.isfinite(out[0, 0, 1]).all()
    assert not out[:, 1].any()  # padded video slots are zero (and masked)


# ---------------------------------------------------------------- 5. frozen image model


def test_only_the_video_adapter_trains_and_the_image_model_stays_bitwise_frozen():
    model = _model(_cfg(max_frames=16))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    video = {n for n, _ in model.named_parameters() if n.startswith("video.")}
    # The video adapter, plus the learnable token rows (<|video|> is row 1 of learnable_embedding).
    assert trainable == video | {"learnable_embedding.weight"}
    assert any(".cross_attention_layers." in n for n in video) and any(".aggregator." in n for n in video)

    _perturb_gates(model)  # open gates: gradients reach the aggregator and the video K/V projections
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("video.", "learnable_"))}
    video_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("video.")}
    task = ImageTextTask(model).train()
    assert not model.lm.training and not model.vision.training  # frozen towers stay in eval mode
    opt = torch.optim.AdamW(build_param_groups(model, lr=1e-2), lr=1e-2)
    tokens = _tokens([{1: VID}, {2: VID, 4: IMG}], seed=2)
    labels = tokens.clone()
    labels[:, :6] = -100
    loss = task(tokens, labels, _images(2, 1, [0, 1]), _videos([[_clip(7, 3)], [_clip(16, 4, repeats=(5,))]]))["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()

    for n, p in model.named_parameters():
        if n.startswith("video."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p.detach(), video_before[n]), n
        elif n != "learnable_embedding.weight":
            assert p.grad is None and not p.requires_grad, n
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


# ---------------------------------------------------------------- 6. precomputed frame features


def test_frame_features_path_equals_the_tiles_path_and_is_validated():
    model = _model(_cfg(max_frames=16))
    videos = _videos([[_clip(5, 1, repeats=(1,)), _clip(9, 2)], [_clip(3, 3)]])
    with torch.no_grad():
        feats = model.encode_frames(videos)
        assert feats.shape == (2, 2, 9, TOKENS, model.cfg.lm.dim)
        real = videos.frame_mask & videos.video_mask[..., None]
        assert not feats[~real].any() and feats[real].abs().sum(-1).gt(0).all()
        ref = model.encode_videos(videos)
        got = model.encode_videos(replace(videos, frame_features=feats))
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
    assert torch.equal(got[1], ref[1])

    # The frozen-encoder (default) model accepts features in train mode: that is what they are for.
    model.train()
    model.encode_videos(replace(videos, frame_features=feats))
    # Wrong frame count or a token count that does not fit the tile slots.
    with pytest.raises(ValueError):
        model.encode_videos(replace(videos, frame_features=feats[:, :, :8]))
    two_slots = replace(videos, tiles=torch.cat([videos.tiles, torch.zeros_like(videos.tiles)], 3),
                        tile_mask=torch.cat([videos.tile_mask, torch.zeros_like(videos.tile_mask)], 3))
    with pytest.raises(ValueError, match="tokens per frame"):  # 17 tokens (one tile's) on 2 tile slots
        model.encode_videos(replace(two_slots, frame_features=feats))

    # A trainable encoder/projector would get no gradient through precomputed features: refused in training.
    trainable = _model(_cfg(max_frames=16, train_image_adapter=True))
    assert any(p.requires_grad for p in trainable.projector.parameters())
    trainable.train()
    with pytest.raises(ValueError, match="frame_features"):
        trainable.encode_videos(replace(videos, frame_features=feats))
    trainable.eval()  # inference with the same features is fine
    with torch.no_grad():
        trainable.encode_videos(replace(videos, frame_features=feats))


def test_frame_features_from_an_untrimmed_batch_are_refused():
    model = _model(_cfg(max_frames=8))
    S, T = model.cfg.vision.tile_size, model.cfg.vision.max_tiles
    tile_mask = torch.zeros(1, 1, 3, T, dtype=torch.bool)
    tile_mask[..., :2] = True  # 1 x 2 frames in 4 tile slots
    videos = VideoBatch(torch.randn(1, 1, 3, T, 3, S, S), torch.tensor([1, 2]).expand(1, 1, 3, 2).clone(), tile_mask,
                        torch.ones(1, 1, 3, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool))
    with torch.no_grad():
        feats = model.encode_frames(videos)  # 4 slots x 17 tokens
        with pytest.raises(ValueError):  # 68 tokens on a 2-slot batch: 4 tiles' tokens read as 2 tiles of 34
            model.encode_videos(replace(videos.trimmed(), frame_features=feats))


# ---------------------------------------------------------------- 7. generation


class _StubTokenizer:
    """Just enough of `adapters.tokenizer.Tokenizer` for `encode_dialog`, over the tiny LM's 512 ids."""

    n_words, bos_id, start_header_id, end_header_id, eot_id = 512, 500, 501, 502, 503

    def encode(self, text):
        return [ord(c) % 400 for c in text]


def test_generation_with_a_video_matches_the_full_forward():
    model = _model(_cfg(max_frames=16))
    _perturb_gates(model)
    tok = _StubTokenizer()
    assert video_input_id(tok) == model.cfg.video_token_id == VID
    prompts = [encode_dialog(tok, [Message("user", "Which way?", n_videos=1)]),
               encode_dialog(tok, [Message("user", "Where?!", n_videos=1, n_images=1)])]
    T = max(map(len, prompts))
    prompt = torch.tensor([[tok.bos_id] * (T - len(p)) + p for p in prompts])  # left-padded to one length
    assert (prompt == VID).sum(1).tolist() == [1, 1] and (prompt == IMG).sum(1).tolist() == [0, 1]
    videos = _videos([[_clip(9, 1, repeats=(4,))], [_clip(16, 2)]])
    images = _images(2, 1, [0, 1])
    n = 6

    ids = collect_ids(generate(model, prompt, images, SamplingConfig(max_new_tokens=n), videos=videos))
    assert [len(r) for r in ids] == [n, n] and all(0 <= t < tok.n_words for r in ids for t in r)
    steps = torch.stack(list(generate(model, prompt, images, SamplingConfig(max_new_tokens=n), videos=videos)), 1)
    assert steps.tolist() == ids
    seq = torch.cat([prompt, steps], 1)
    with torch.no_grad():
        full = model(seq, images, videos)
        assert not torch.allclose(full, model(seq, images), atol=1e-3)  # the video matters
        assert torch.equal(full[:, T - 1 : -1].argmax(-1), steps)
        # cached decoding: logits of every step equal the full forward's
        cache = model.lm.new_cache(2, seq.shape[1])
        ctx, vctx = model.vision_context(prompt, images), model.video_context(prompt, videos)
        cached = [model(prompt, context=ctx, video_context=vctx, cache=cache)[:, -1]]
        for i in range(n):
            cached.append(model(seq[:, T + i : T + i + 1], context=ctx, video_context=vctx, start_pos=T + i,
                                cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(cached, 1), full[:, T - 1 :], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- 8. short videos


@pytest.fixture(scope="module")
def short_clip():
    clip = make_motion_clips(1, seed=3, min_frames=9, max_frames=9)[0]
    return clip, VideoReader(timeout_s=None).sample(clip.video, 16, name="clip.mp4")


def test_short_video_repeats_are_masked_and_ignored(short_clip):
    clip, got = short_clip
    assert clip.n_frames == 9 and got.frames.shape[0] == 16
    # the reader repeats frames in place and masks every repeat
    assert got.frame_mask.sum() == 9 and sorted(set(got.indices.tolist())) == list(range(9))
    assert np.array_equal(got.frame_mask[1:], got.indices[1:] != got.indices[:-1])
    for i in np.flatnonzero(~got.frame_mask):
        assert np.array_equal(got.frames[i], got.frames[i - 1])

    model = _model(_cfg(max_frames=16))
    tiling = video_tiling(model.cfg.vision.tile_size)
    tiled = tile_frames(got, tiling)
    assert torch.equal(tiled.frame_mask, torch.from_numpy(got.frame_mask))
    assert not tiled.tiles[~tiled.frame_mask].any()  # repeats are not tiled
    # the same slots filled with the repeated frames' pixels, still masked
    filled = tile_frames(got.frames, tiling)
    filled.frame_mask = tiled.frame_mask.clone()
    assert filled.tiles[~filled.frame_mask].any()
    unique = tile_frames(got.frames[got.frame_mask], tiling)
    with torch.no_grad():
        out, chunks = model.encode_videos(_videos([[tiled]]))
        out_filled, _ = model.encode_videos(_videos([[filled]]))
        # Repeated frames are ignored, but the unique frames keep their slots (and frame_pos) in the
        # sampled timeline: with frame_pos zeroed the short clip equals its 9 unique frames alone.
        model.video.aggregator.frame_pos.zero_()
        out_nopos, _ = model.encode_videos(_videos([[tiled]]))
        out_unique, _ = model.encode_videos(_videos([[unique]]))
    assert chunks.tolist() == [[[True]]]
    torch.testing.assert_close(out_filled, out, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_nopos, out_unique, atol=1e-5, rtol=0)
    token_mask = frame_token_mask(tiled.frame_mask[None], tiled.tile_mask[None], TOKENS)
    assert token_mask.shape == (1, 16, TOKENS) and token_mask.sum() == 9 * TOKENS


# ---------------------------------------------------------------- 9. config errors


@pytest.mark.parametrize("kw", [dict(max_frames=65), dict(max_frames=0), dict(every=0), dict(chunk_frames=0)])
def test_video_adapter_config_errors(kw):
    with pytest.raises(ValueError):
        VideoAdapterConfig(**kw)


@pytest.mark.parametrize("kw", [dict(dim=30), dict(n_kv_heads=3), dict(n_latents=0), dict(depth=0), dict(dim=0),
                                dict(chunk_frames=0), dict(ff_mult=0)])
def test_aggregator_config_errors(kw):
    base = dict(dim=32, n_latents=4, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError):
        AggregatorConfig(**{**base, **kw})


def test_model_input_errors():
    model = _model(_cfg(max_frames=8))
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_videos(_videos([[_clip(9, 1)]]))
    with pytest.raises(ValueError, match="video"):  # two <|video|> tokens, one video
        model(_tokens([{1: VID, 3: VID}]), videos=_videos([[_clip(4, 1)]]))
    with pytest.raises(ValueError, match="no video adapter"):
        build_multimodal("tiny").encode_videos(_videos([[_clip(4, 1)]]))
    with pytest.raises(ValueError, match="leaves no video cross-attention block"):
        build_multimodal(_cfg(max_frames=8, every=4))
