"""Image encoder: parity with open_clip (backbone, taps) and HF Mllama 4.54 (tiling, gates, mask, layout)."""

import json

import open_clip
import pytest
import torch

from tests.hf_reference import precompute_tile_table

from vision.encoder import VisionProjector, build_vision_encoder, vision_config
from vision.encoder_layers import encoder_attention_mask

TINY = vision_config("tiny")
D, N = TINY.width, TINY.n_tokens  # 64, 17 tokens per 56 px tile
LAYOUTS = [(1, 1), (1, 2), (2, 2), (4, 1)]


def _tiny_tower(tile_size=TINY.tile_size, seed=0):
    """An independent open_clip tower with the tiny shape, with non-trivial norms and biases."""
    torch.manual_seed(seed)
    vcfg = open_clip.CLIPVisionCfg(layers=TINY.layers, width=D, head_width=D // TINY.heads,
                                   patch_size=TINY.patch_size, image_size=tile_size)
    tower = open_clip.model._build_vision_tower(32, vcfg).eval()
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "ln" in name:
                p.uniform_(0.5, 1.5)
    return tower


@pytest.fixture(scope="module")
def tower_ckpt(tmp_path_factory):
    tower = _tiny_tower()
    path = tmp_path_factory.mktemp("tower") / "visual.pt"
    torch.save(tower.state_dict(), path)
    return tower, str(path)


def _inputs(layouts, T=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(layouts)
    tiles = torch.randn(B, T, 3, TINY.tile_size, TINY.tile_size, generator=g)
    layout = torch.tensor(layouts, dtype=torch.long)
    tile_mask = torch.arange(T)[None] < (layout[:, :1] * layout[:, 1:])
    tiles[~tile_mask] = 0  # what the tiling transform produces for padded slots
    return tiles, layout, tile_mask


def _gates(model):
    """The five kinds of tanh gate (scalars; not the gated_positional_embedding table)."""
    return {n: p for n, p in model.named_parameters() if "gate" in n and p.numel() == 1}


def _randomize_gates(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _gates(model).values():
            p.copy_(torch.rand(p.shape, generator=g) + 0.3)


def _split_taps(out, n_taps):
    """(B, T, N, D * (1 + k)) -> list of k (B, T, N, D) taps, undoing the interleaved layout."""
    return list(out[..., D:].unflatten(-1, (D, n_taps)).unbind(-1))


# ---------------------------------------------------------------------------------------------
# 1-2, 4: backbone and taps


def test_single_tile_matches_open_clip(tower_ckpt):
    """One tile, no padding, zero gates: final tokens (CLS included) and taps are open_clip's."""
    ref, path = tower_ckpt
    cfg = vision_config("tiny", pretrained=path, max_tiles=1, pad_to_multiple=1)
    model = build_vision_encoder(cfg).eval()
    tiles, layout, tile_mask = _inputs([(1, 1)], T=1)
    with torch.no_grad():
        out = model(tiles, layout, tile_mask)[:, 0]  # (1, N, out_dim)
        res = ref.forward_intermediates(tiles[:, 0], indices=list(range(TINY.layers)), output_fmt="NLC",
                                        output_extra_tokens=True, intermediates_only=True)
    # open_clip returns block OUTPUTS with the CLS token split off.
    block_out = [torch.cat([cls, x], 1)
                 for cls, x in zip(res["image_intermediates_prefix"], res["image_intermediates"])]
    torch.testing.assert_close(out[..., :D], ref.ln_post(block_out[-1]), atol=1e-5, rtol=1e-5)
    ref.output_tokens = True  # plain forward too: returns ln_post tokens without CLS
    with torch.no_grad():
        _, tokens = ref(tiles[:, 0])
    ref.output_tokens = False
    torch.testing.assert_close(out[:, 1:, :D], tokens, atol=1e-5, rtol=1e-5)
    for j, (k, tap) in enumerate(zip(TINY.taps, _split_taps(out, len(TINY.taps)))):
        torch.testing.assert_close(tap, block_out[k - 1], atol=1e-5, rtol=1e-5)  # input of block k
        assert not torch.allclose(tap, block_out[k], atol=1e-3), f"tap {j} looks like the output of block {k}"


def test_taps_are_block_inputs_with_padding():
    model = build_vision_encoder(TINY).eval()
    _randomize_gates(model)
    tiles, layout, tile_mask = _inputs(LAYOUTS)
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0]))
             for k, blk in enumerate(model.transformer.resblocks)]
    with torch.no_grad():
        out = model(tiles, layout, tile_mask)
    for h in hooks:
        h.remove()
    L = 24  # 17 tokens padded to a multiple of 8
    for k, tap in zip(TINY.taps, _split_taps(out, len(TINY.taps))):
        torch.testing.assert_close(tap, seen[k].view(len(LAYOUTS), 4, L, D)[:, :, :N], atol=0, rtol=0)
    # Channel layout as released: cat([final, stack(taps, -1).flatten(-2)]).
    stacked = torch.stack([seen[k].view(len(LAYOUTS), 4, L, D)[:, :, :N] for k in TINY.taps], -1).flatten(-2)
    torch.testing.assert_close(out[..., D:], stacked, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# 3: tiling, mask, batching


def test_mask_is_released_formula():
    """Meta's build_encoder_attention_mask: m = 1 on padding, mask = (m m^T) * finfo.min."""
    tile_mask = torch.tensor([[True, True, False, False]])
    got = encoder_attention_mask(tile_mask, n_tokens=5, n_pad=3, dtype=torch.float32)
    m = torch.ones(4, 8, 1)
    m[:2, :5] = 0
    m = m.view(32, 1)
    torch.testing.assert_close(got, (m @ m.T * torch.finfo(torch.float32).min)[None, None], atol=0, rtol=0)
    # Real queries see every key (the quirk); no mask at all when nothing is padding.
    assert (got[0, 0, :5] == 0).all()
    assert not encoder_attention_mask(torch.ones(1, 2, dtype=torch.bool), 5, 0, torch.float32).any()


def test_shapes_and_batch_independence():
    model = build_vision_encoder(TINY).eval()
    _randomize_gates(model)
    tiles, layout, tile_mask = _inputs(LAYOUTS * 2)  # B = 8
    with torch.no_grad():
        out = model(tiles, layout, tile_mask)
        assert out.shape == (8, 4, N, TINY.out_dim) and TINY.out_dim == 6 * D
        for b in (0, 2, 7):  # each image alone gives the same result as in the batch
            alone = model(tiles[b:b + 1], layout[b:b + 1], tile_mask[b:b + 1])
            torch.testing.assert_close(alone, out[b:b + 1], atol=1e-5, rtol=1e-5)


def test_real_tokens_see_padded_tiles():
    """Released semantics: real tokens attend to padded tiles, so their pixels change real outputs."""
    model = build_vision_encoder(TINY).eval()
    tiles, layout, tile_mask = _inputs([(1, 2)])
    with torch.no_grad():
        base = model(tiles, layout, tile_mask)
        tiles[0, 3] = 1.0
        changed = model(tiles, layout, tile_mask)
    assert not torch.allclose(base[:, :2], changed[:, :2], atol=1e-4)


def _to_hf_state_dict(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf = {
        "class_embedding": sd["class_embedding"],
        "patch_embedding.weight": sd["conv1.weight"],
        "gated_positional_embedding.embedding": sd["positional_embedding"],
        "gated_positional_embedding.gate": sd["gated_positional_embedding_gate"],
        "gated_positional_embedding.tile_embedding.weight": precompute_tile_table(sd["gated_positional_embedding"]),
        "layernorm_pre.weight": sd["ln_pre.weight"], "layernorm_pre.bias": sd["ln_pre.bias"],
        "layernorm_post.weight": sd["ln_post.weight"], "layernorm_post.bias": sd["ln_post.bias"],
    }
    for ours, theirs in [("pre_tile_pos_embed", "pre_tile_positional_embedding"),
                         ("post_tile_pos_embed", "post_tile_positional_embedding")]:
        hf[f"{theirs}.embedding.weight"] = precompute_tile_table(sd[f"{ours}.embedding"])
        hf[f"{theirs}.gate"] = sd[f"{ours}.gate"]
    for stack, n in [("transformer", TINY.layers), ("global_transformer", TINY.n_global_layers)]:
        for i in range(n):
            o, t = f"{stack}.resblocks.{i}.", f"{stack}.layers.{i}."
            q, k, v = sd[o + "attn.in_proj_weight"].chunk(3)
            hf.update({t + "self_attn.q_proj.weight": q, t + "self_attn.k_proj.weight": k,
                       t + "self_attn.v_proj.weight": v,
                       t + "self_attn.o_proj.weight": sd[o + "attn.out_proj.weight"]})
            for a, b in [("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("ln_1", "input_layernorm"),
                         ("ln_2", "post_attention_layernorm")]:
                hf[t + b + ".weight"], hf[t + b + ".bias"] = sd[o + a + ".weight"], sd[o + a + ".bias"]
            if stack == "global_transformer":
                hf[t + "gate_attn"], hf[t + "gate_ffn"] = sd[o + "gate_attn"], sd[o + "gate_ffn"]
    return hf


def test_matches_hf_mllama_vision_model(tower_ckpt):
    """Full released semantics (tile tables, gates, mask quirk, padding, taps, interleave) vs HF 4.54."""
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.image_processing_mllama import get_all_supported_aspect_ratios
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    model = build_vision_encoder(vision_config("tiny", pretrained=tower_ckpt[1])).eval()
    _randomize_gates(model)
    with torch.no_grad():  # Meta/HF attention has no biases
        for blk in [*model.transformer.resblocks, *model.global_transformer.resblocks]:
            blk.attn.in_proj_bias.zero_()
            blk.attn.out_proj.bias.zero_()
    hf_cfg = MllamaVisionConfig(
        hidden_size=D, num_hidden_layers=TINY.layers, num_global_layers=TINY.n_global_layers,
        num_attention_heads=TINY.heads, intermediate_size=4 * D, vision_output_dim=TINY.out_dim,
        image_size=TINY.tile_size, patch_size=TINY.patch_size, max_num_tiles=TINY.max_tiles,
        intermediate_layers_indices=list(TINY.taps),
    )
    hf = MllamaVisionModel(hf_cfg).eval()
    hf.load_state_dict(_to_hf_state_dict(model), strict=True)

    tiles, layout, tile_mask = _inputs(LAYOUTS)
    ratio_ids = torch.tensor([[get_all_supported_aspect_ratios(4).index(tuple(r)) + 1] for r in LAYOUTS])
    with torch.no_grad():
        ours = model(tiles, layout, tile_mask)
        theirs = hf(tiles[:, None], ratio_ids, tile_mask[:, None].long()).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5: gates


def test_gates_start_closed():
    model = build_vision_encoder(TINY).eval()
    tiles, layout, tile_mask = _inputs(LAYOUTS)
    x = torch.randn(4, 4 * 24, D)
    mask = encoder_attention_mask(tile_mask, N, 7, x.dtype)
    with torch.no_grad():
        assert torch.equal(model.global_transformer(x, mask), x)
        base = model(tiles, layout, tile_mask)
        gates = _gates(model)
        assert len(gates) == 3 + 2 * TINY.n_global_layers
        for name, p in gates.items():
            p.fill_(0.5)
            assert not torch.allclose(model(tiles, layout, tile_mask), base, atol=1e-4), name
            p.zero_()
        torch.testing.assert_close(model(tiles, layout, tile_mask), base, atol=0, rtol=0)


def test_backward_and_grad_checkpointing():
    model = build_vision_encoder(TINY)
    _randomize_gates(model)
    tiles, layout, tile_mask = _inputs(LAYOUTS[:2])
    out = model(tiles, layout, tile_mask)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(grads[n].abs().sum() > 0 for n in _gates(model))
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(tiles, layout, tile_mask)
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_freeze_and_projector():
    model = build_vision_encoder(TINY).freeze()
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.train().training  # stays in eval under a parent's .train()
    proj = VisionProjector(TINY.out_dim, 32)
    assert set(proj.state_dict()) == {"weight", "bias"}
    tiles, layout, tile_mask = _inputs([(2, 2)])
    assert proj(model(tiles, layout, tile_mask)).shape == (1, 4, N, 32)


# ---------------------------------------------------------------------------------------------
# 6: loading through open_clip


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    """A full tiny open_clip CLIP checkpoint plus a registered open_clip model config for it."""
    tmp = tmp_path_factory.mktemp("clip")
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": TINY.tile_size, "layers": TINY.layers, "width": D,
                       "head_width": D // TINY.heads, "patch_size": TINY.patch_size},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp / "llama3mm-tiny-vit-test.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp / "llama3mm-tiny-vit-test.json")
    torch.manual_seed(3)
    clip = open_clip.create_model("llama3mm-tiny-vit-test")
    torch.save(clip.state_dict(), tmp / "clip.pt")
    return clip, str(tmp / "clip.pt")


def test_loads_full_clip_checkpoint(clip_ckpt):
    clip, path = clip_ckpt
    model = build_vision_encoder(vision_config("tiny", pretrained=path))
    ours = model.state_dict()
    for key, value in clip.visual.state_dict().items():
        if key != "proj":
            assert torch.equal(ours[key], value), key
    assert "proj" not in ours


def test_other_tile_size_resizes_positional_embedding(clip_ckpt):
    """tile_size 84 from a 56 px checkpoint: same table as open_clip.create_model(force_image_size=84)."""
    _, path = clip_ckpt
    cfg = vision_config("tiny", open_clip_model="llama3mm-tiny-vit-test", pretrained=path, tile_size=84)
    model = build_vision_encoder(cfg).eval()
    ref = open_clip.create_model("llama3mm-tiny-vit-test", pretrained=path, force_image_size=84).visual
    assert model.positional_embedding.shape == (37, D)
    assert model.gated_positional_embedding.shape == (4, 4, 37, D)
    torch.testing.assert_close(model.positional_embedding, ref.positional_embedding, atol=0, rtol=0)
    tiles = torch.randn(1, 4, 3, 84, 84)
    with torch.no_grad():
        out = model(tiles, torch.tensor([[2, 2]]), torch.ones(1, 4, dtype=torch.bool))
    assert out.shape == (1, 4, 37, 6 * D)


# ---------------------------------------------------------------------------------------------
# 7: presets


def test_vit_h14_preset_on_meta():
    cfg = vision_config("vit_h14", tile_size=560)
    with torch.device("meta"):
        model = build_vision_encoder(cfg)
    counts = model.param_breakdown()
    # ViT-H/14 tower ~630M (paper); 8 gated blocks ~157M; tile tables 4*4*1601*1280 + 2*4*4*1280 + 3.
    assert 625e6 < counts["backbone"] < 640e6
    assert 155e6 < counts["global_layers"] < 160e6
    assert counts["tile_tables"] == 4 * 4 * 1601 * 1280 + 2 * 4 * 4 * 1280 + 3
    assert cfg.out_dim == 7680 and cfg.n_tokens == 1601


def test_config_is_strict():
    with pytest.raises(TypeError):
        vision_config("tiny", n_taps=3)
    with pytest.raises(KeyError):
        vision_config("vit_g14")
    with pytest.raises(ValueError):
        vision_config("tiny", taps=(1, 8))  # only 8 blocks
    with pytest.raises(ValueError), torch.device("meta"):
        build_vision_encoder(vision_config("vit_h14", width=1024))  # disagrees with open_clip's ViT-H-14
    with pytest.raises(RuntimeError, match="not a known tag"):  # open_clip rejects it before building
        build_vision_encoder(vision_config("vit_h14", pretrained="no-such-tag"))


# ---------------------------------------------------------------------------------------------
# 8: attention biases (open_clip's blocks have them, Mllama's have none)

ATTN_BIASES = ("attn.in_proj_bias", "attn.out_proj.bias")


def test_attn_bias_false_has_no_bias_parameters_and_equals_zero_biases():
    torch.manual_seed(0)
    plain = build_vision_encoder(vision_config("tiny", attn_bias=False)).eval()
    _randomize_gates(plain)
    blocks = [*plain.transformer.resblocks, *plain.global_transformer.resblocks]
    assert all(b.attn.in_proj_bias is None and b.attn.out_proj.bias is None for b in blocks)
    assert not any(k.endswith(ATTN_BIASES) for k in plain.state_dict())

    biased = build_vision_encoder(TINY).eval()
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and len(missing) == 2 * len(blocks) and all(k.endswith(ATTN_BIASES) for k in missing)
    assert biased.num_params() - plain.num_params() == len(blocks) * 4 * D  # 3 D (q, k, v) + D (out)
    with torch.no_grad():
        for k in missing:
            biased.get_parameter(k).zero_()
    tiles, layout, tile_mask = _inputs(LAYOUTS)
    with torch.no_grad():
        out = plain(tiles, layout, tile_mask)
        torch.testing.assert_close(out, biased(tiles, layout, tile_mask), atol=1e-6, rtol=0)
        biased.global_transformer.resblocks[0].attn.out_proj.bias.fill_(0.5)  # the biases are live there
        assert not torch.allclose(out, biased(tiles, layout, tile_mask), atol=1e-3)
    plain.train()
    plain(tiles, layout, tile_mask).square().mean().backward()
    assert all(p.grad is not None for p in plain.parameters())  # nothing dangling where the biases were


def test_attn_bias_false_refuses_a_pretrained_tower_with_biases(tower_ckpt, tmp_path):
    tower, path = tower_ckpt  # biases ~ N(0, 0.1)
    with pytest.raises(ValueError, match=r"transformer\.resblocks\.0\.attn\.in_proj_bias is non-zero"):
        build_vision_encoder(vision_config("tiny", pretrained=path, attn_bias=False))
    sd = {k: (torch.zeros_like(v) if k.endswith(ATTN_BIASES) else v) for k, v in tower.state_dict().items()}
    torch.save(sd, tmp_path / "zero_bias.pt")
    model = build_vision_encoder(vision_config("tiny", pretrained=str(tmp_path / "zero_bias.pt"), attn_bias=False))
    ours = model.transformer.state_dict()
    assert {f"transformer.{k}" for k in ours} == {k for k in sd if k.startswith("transformer.")} - {
        k for k in sd if k.endswith(ATTN_BIASES)}
    assert all(torch.equal(v, sd[f"transformer.{k}"]) for k, v in ours.items())
