"""Llama 3.2 Vision checkpoints (adapters.mllama) against transformers 4.54.1's Mllama on a tiny random model.

The HF model is built from a config shaped like the release (4 self-attention layers with 2 cross-attention
layers unrolled in between, ViT with taps and gated global layers, 4 tiles), saved with ``save_pretrained``
and loaded with our loader; logits are compared on the same prompts and images.

Two things make the random HF model look like a released checkpoint rather than a fresh one:
* every gate is non-zero (fresh HF gates are 0 or tiny, which would hide the adapters and the vision
  tables from the comparison);
* the precomputed tile tables are *consistent*: HF's converter writes row i+1 of each table as
  ``grid[:h, :w]`` of one (4, 4, ...) grid for the i-th aspect ratio, zeros in the unused tile slots
  and row 0 (``pre_compute_positional_embedding``). A randomly initialised HF table has 9 unrelated
  rows, which no per-cell grid (Meta's and our parameterisation) can express; our loader refuses it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file


from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor  # noqa: E402
from transformers.models.mllama.image_processing_mllama import get_all_supported_aspect_ratios  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from adapters.checkpoint import CheckpointError, read_safetensors_dir  # noqa: E402
from tests.hf_reference import precompute_tile_table  # noqa: E402
from adapters.mllama import grid_to_tile_table, load_mllama, mllama_config_from_hf, tile_table_to_grid  # noqa: E402
from adapters.mllama_meta import load_meta_vision, mllama_config_from_meta, save_meta_vision  # noqa: E402
from adapters.model_io import load_multimodal_checkpoint  # noqa: E402
from adapters.multimodal import ImageBatch, MultimodalConfig, build_multimodal, multimodal_config  # noqa: E402
from vision.encoder import vision_config
from vision.tiling import CLIP_MEAN, CLIP_STD, TilingConfig, collate_tiled, tile_image  # noqa: E402

V = 300  # text vocab; <|image|> enters as id V = first learnable row (128256 in the release)
S = 56  # tile size: 4x4 patches of 14 px + CLS = 17 tokens, padded to 24 (1601 -> 1608 at 560 px)
TOL = 1e-4


def _hf_config() -> MllamaConfig:
    # 4 self-attention layers, 2 cross-attention layers; release formula range(freq-1, total, freq+1)
    # with freq = ceil(4 / 2) = 2 over 6 unrolled layers -> [1, 4].
    text = dict(
        vocab_size=V, hidden_size=64, num_hidden_layers=6, cross_attention_layers=[1, 4],
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        pad_token_id=0, initializer_range=0.05,
    )
    vision = dict(
        image_size=S, patch_size=14, hidden_size=32, num_hidden_layers=4, num_global_layers=2,
        attention_heads=2, intermediate_size=64, intermediate_layers_indices=[1, 3], vision_output_dim=32 * 3,
        max_num_tiles=4, initializer_range=0.05,
    )
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=V)


def _make_release_like(model: MllamaForConditionalGeneration) -> None:
    g = torch.Generator().manual_seed(1)
    vm = model.model.vision_model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn", "_attn_gate", "_mlp_gate")):
                sign = 1.0 if torch.rand(1, generator=g) > 0.5 else -1.0
                p.fill_(sign * (0.4 + 0.5 * torch.rand(1, generator=g).item()))
            elif p.dim() == 1:  # norms, biases, class embedding: move off their 1/0 init
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        N, W = vm.num_patches, vm.hidden_size
        for module, tokens in ((vm.gated_positional_embedding.tile_embedding, N),
                               (vm.pre_tile_positional_embedding.embedding, 1),
                               (vm.post_tile_positional_embedding.embedding, 1)):
            grid = torch.randn(4, 4, tokens, W, generator=g) * 0.5
            module.weight.copy_(precompute_tile_table(grid))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> tuple[MllamaForConditionalGeneration, Path]:
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(_hf_config()).eval()
    _make_release_like(model)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, max_shard_size="200KB")  # several shards + index, legacy hub key names
    return model, path


@pytest.fixture(scope="module")
def ours(hf):
    return load_mllama(hf[1]).eval()


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _inputs(prompts: list[list[int]], images: list[list[Image.Image]]):
    """HF inputs (their image processor and processor mask helpers) and ours (our tiling) for one batch."""
    proc = MllamaImageProcessor(size={"height": S, "width": S}, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD), max_image_tiles=4)
    hf_img = proc(images, return_tensors="pt")
    T = len(prompts[0])
    token_masks = [get_cross_attention_token_mask(p, V) for p in prompts]
    xmask = convert_sparse_cross_attention_mask_to_dense(token_masks, hf_img["num_tiles"], 4, T)
    tokens = torch.tensor(prompts)
    hf_inputs = dict(
        input_ids=tokens,
        pixel_values=hf_img["pixel_values"],
        aspect_ratio_ids=hf_img["aspect_ratio_ids"],
        aspect_ratio_mask=hf_img["aspect_ratio_mask"],
        cross_attention_mask=torch.from_numpy(xmask),
    )
    cfg = TilingConfig(tile_size=S, max_tiles=4)
    batch = collate_tiled([[tile_image(im, cfg) for im in row] for row in images])
    # Our tiling is the released transform: same pixels as HF's processor.
    real = batch["image_mask"]
    assert torch.allclose(batch["tiles"][real], hf_img["pixel_values"][real], atol=1e-6)
    assert torch.equal(batch["layout_ids"], hf_img["aspect_ratio_ids"])
    return tokens, ImageBatch.from_collated(batch), hf_inputs


def _prompt(image_positions: list[int], T: int = 20, seed: int = 0) -> list[int]:
    """Random text ids with <|image|> at the given positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (T,), generator=g).tolist()
    for p in image_positions:
        ids[p] = V
    return ids


CASES = {
    # Prompts start with <|image|> (the HF processor's layout for base-model prompts:
    # "<|image|><|begin_of_text|>..."), so every row sees an image and HF's cross-attention leak
    # (test_text_before_the_first_image) cannot occur.
    # (a) one image, 100x50 -> a 1x2 layout (2 real tiles of 4)
    "one_image_2_tiles": ([_prompt([0])], [[(100, 50, 0)]]),
    # (b) two images in one prompt: 1x2 and 3x1 layouts (different grid cells, a padded tile)
    "two_images": ([_prompt([0, 9])], [[(100, 50, 0), (60, 130, 1)]]),
    # (c) a batch: row 0 gets a padding image slot (HF encodes it, we skip it; masked anyway); row 1 has a
    # run of two image tokens, both seen by the text after the run
    "batch": ([_prompt([0]), _prompt([0, 1, 12], seed=1)],
              [[(100, 50, 0)], [(60, 130, 2), (90, 90, 3), (40, 200, 4)]]),
}


def _case(prompts: list[list[int]], sizes: list[list[tuple[int, int, int]]]):
    """Inputs for prompts and per-row (width, height, seed) random images."""
    return _inputs(prompts, [[_image(w, h, seed) for (w, h, seed) in row] for row in sizes])


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(hf, ours, name):
    model, _ = hf
    tokens, images, hf_inputs = _case(*CASES[name])
    with torch.no_grad():
        ref = model(**hf_inputs).logits
        ref_text = model(input_ids=tokens).logits  # text-only: HF skips its cross-attention layers
        out = ours(tokens, images)
    assert out.shape == ref.shape == (tokens.shape[0], tokens.shape[1], V)
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, f"max |ours - HF| = {diff:.2e}"
    # The images matter (the comparison is not vacuous).
    assert (ref - ref_text).abs().max() > 1000 * TOL


def _apply_meta_row_mask(model: MllamaForConditionalGeneration, row_mask: torch.Tensor) -> list:
    """Hooks that zero HF's cross-attention output on rows that see no image, as Meta does before wo."""
    def hook(module, args, output):
        return (output[0] * row_mask, *output[1:])

    return [layer.cross_attn.register_forward_hook(hook)
            for layer in model.model.language_model.layers if hasattr(layer, "cross_attn")]


def test_text_before_the_first_image(hf, ours):
    """Rows before the first <|image|> (BOS and the chat header in practice) see no image.

    Ours (= Meta): the whole cross-attention block adds exactly 0 there, so those rows equal the frozen LM.
    HF (4.46 .. 5.x, huggingface/transformers#39379) applies the "no image" row mask only to the MLP branch:
    those rows get tanh(gate_attn) * (uniform attention over all vision tokens, padded tiles included), and
    through causal self-attention this also shifts every later row. With the row mask applied to HF's
    cross-attention output (a test-only hook), HF agrees with ours on every row.
    """
    model, _ = hf
    tokens, images, hf_inputs = _case([_prompt([5, 12])], [[(100, 50, 0), (60, 130, 1)]])
    first = 5
    with torch.no_grad():
        ref = model(**hf_inputs).logits
        ref_text = model(input_ids=tokens).logits
        out = ours(tokens, images)
        out_text = ours(tokens)
        sees_an_image = (tokens != V).cumprod(-1).eq(0)  # from the first <|image|> on
        handles = _apply_meta_row_mask(model, sees_an_image[..., None].float())
        try:
            ref_masked = model(**hf_inputs).logits
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(out[:, :first], out_text[:, :first])  # exactly the frozen LM
    assert (out_text[:, :first] - ref_text[:, :first]).abs().max() <= TOL
    assert (ref[:, :first] - ref_text[:, :first]).abs().max() > 1000 * TOL  # HF's leak ...
    assert (ref[:, first:] - out[:, first:]).abs().max() > 1000 * TOL  # ... reaches the later rows too
    assert (ref_masked - out).abs().max() <= TOL  # and is the only difference


def test_loaded_config(ours):
    cfg = ours.cfg
    assert (cfg.lm.n_layers, cfg.n_xattn, ours.schedule) == (4, 2, [1, 3])
    assert (cfg.lm.vocab_size, cfg.n_learnable_embeddings, cfg.image_token_id) == (V, 8, V)
    v = cfg.vision
    assert v.open_clip_model is None  # not the ViT-H/14 sizes
    assert (v.width, v.layers, v.heads, v.tile_size, v.taps, v.n_global_layers, v.mlp_ratio) == (
        32, 4, 2, S, (1, 3), 2, 2.0)
    assert not any(p.requires_grad for p in ours.lm.parameters())


def test_release_configs_map_to_our_presets():
    """The hub's 11B/90B config.json and Meta's 11B params.json (values from notes/mllama.md sec. 1.8)."""
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    text = dict(rope_scaling=rope, max_position_embeddings=131072)  # MllamaTextConfig defaults are 11B's
    hf_11b = MllamaConfig(text_config=text, vision_config=dict(image_size=560)).to_dict()
    assert hf_11b["text_config"]["cross_attention_layers"] == [3, 8, 13, 18, 23, 28, 33, 38]
    assert mllama_config_from_hf(hf_11b) == _no_attn_bias(multimodal_config("11B"))
    text_90b = dict(text, hidden_size=8192, num_hidden_layers=100, num_attention_heads=64,
                    intermediate_size=28672, cross_attention_layers=list(range(3, 100, 5)))
    hf_90b = MllamaConfig(text_config=text_90b, vision_config=dict(image_size=560)).to_dict()
    assert mllama_config_from_hf(hf_90b) == _no_attn_bias(multimodal_config("90B"))
    meta_11b = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                    ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                    vision_chunk_size=560, vision_max_num_chunks=4, vision_num_cross_attention_layers=8)
    assert mllama_config_from_meta(meta_11b) == _no_attn_bias(multimodal_config("11B"))
    # A vision config passed for the sizes gets the layout's attn_bias: Meta's tower has no attention biases.
    assert mllama_config_from_meta(meta_11b, vision_config("vit_h14", tile_size=560)).vision.attn_bias is False
    base = mllama_config_from_meta(dict(meta_11b, vision_chunk_size=448))  # the base 11B uses 448 px tiles
    assert base.vision.tile_size == 448 and base.vision.n_tokens == 1025


def _no_attn_bias(cfg: MultimodalConfig) -> MultimodalConfig:
    """A preset as our Mllama loaders build it: the open_clip tower's shape without attention biases."""
    return replace(cfg, vision=replace(cfg.vision, attn_bias=False))


def test_loaded_vision_tower_has_no_attention_biases_and_the_same_logits(hf, ours, tmp_path):
    """No bias parameters (nothing can train them); the forward is that of the zero biases loaded before."""
    blocks = [*ours.vision.transformer.resblocks, *ours.vision.global_transformer.resblocks]
    assert ours.cfg.vision.attn_bias is False and len(blocks) == 4 + 2
    assert all(b.attn.in_proj_bias is None and b.attn.out_proj.bias is None for b in blocks)
    assert not [k for k in ours.state_dict() if k.endswith(("attn.in_proj_bias", "attn.out_proj.bias"))]
    before = build_multimodal(replace(ours.cfg, vision=replace(ours.cfg.vision, attn_bias=True)), ours.lm).eval()
    missing, unexpected = before.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and len(missing) == 2 * len(blocks)  # the biases, zeros as the loader gave them
    with torch.no_grad():
        for key in missing:
            before.get_parameter(key).zero_()
    tokens, images, hf_inputs = _case(*CASES["two_images"])
    with torch.no_grad():
        out = ours(tokens, images)
        torch.testing.assert_close(out, before(tokens, images), atol=1e-6, rtol=0)
        assert (out - hf[0](**hf_inputs).logits).abs().max() <= TOL
    loaded_meta = load_meta_vision(save_meta_vision(ours, tmp_path / "meta"),
                                   vision_config=replace(ours.cfg.vision, attn_bias=True))
    assert loaded_meta.cfg == ours.cfg and loaded_meta.state_dict().keys() == ours.state_dict().keys()


def _write_hf(path: Path, src: Path, sd: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    if config is None:
        shutil.copy(src / "config.json", path / "config.json")
    else:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_new_key_layout_loads_the_same(hf, ours, tmp_path):
    """transformers >= 4.52 names (model.language_model.*, lm_head.*, ...) in one unsharded file."""
    _, src = hf
    renames = (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_model.", "model.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )
    sd = {}
    for key, value in read_safetensors_dir(src).items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        sd[key] = value
    assert "lm_head.weight" in sd and "model.language_model.embed_tokens.weight" in sd
    loaded = load_mllama(_write_hf(tmp_path / "new", src, sd)).eval()
    expected = ours.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    tokens, images, _ = _case(*CASES["two_images"])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, images), ours(tokens, images))


def test_meta_layout_round_trip_through_two_shards(ours, tmp_path):
    path = save_meta_vision(ours, tmp_path / "meta", n_shards=2)
    shards = [torch.load(path / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(2)]
    params = json.loads((path / "params.json").read_text())
    vision_fields = ("vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers")
    assert [params[k] for k in vision_fields] == [S, 4, 2]
    s0 = shards[0]
    vis = "vision_model.vision_encoder."
    # Meta's names and model-parallel splits (row-parallel on dim 1, column-parallel on dim 0).
    assert s0[vis + "conv1._linear.weight"].shape == (32 // 2, 3 * 14 * 14)
    assert s0["text_model.layers.0.attention.wo.weight"].shape == (64, 64 // 2)
    assert s0["text_model.cross_attention_layers.1.attention.wk.weight"].shape == (32 // 2, 64)
    assert s0[vis + "transformer.resblocks.0.attn.wq.weight"].shape == (16, 32)
    assert s0[vis + "global_transformer.resblocks.1.mlp.c_proj.weight"].shape == (32, 32)
    assert s0[vis + "gated_positional_embedding"].shape == (4, 4, 17, 32)
    assert s0["text_model.learnable_embedding.weight"].shape == (4, 64)
    assert not any("in_proj" in k or ("attn." in k and "bias" in k) for k in s0)  # no attention biases

    loaded = load_meta_vision(path, vision_config=ours.cfg.vision).eval()
    assert loaded.cfg == ours.cfg
    expected, got = ours.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    tokens, images, _ = _case(*CASES["two_images"])
    with torch.no_grad():
        assert torch.equal(loaded(tokens, images), ours(tokens, images))
    # The dispatcher picks the layout from the files.
    assert load_multimodal_checkpoint(path, vision_config=ours.cfg.vision).cfg == ours.cfg


def test_dispatcher_reads_hf(hf, ours):
    assert load_multimodal_checkpoint(hf[1]).cfg == ours.cfg


def test_tile_table_inversion():
    grid = torch.randn(4, 4, 3, 5)
    table = precompute_tile_table(grid)
    assert torch.equal(grid_to_tile_table(grid), table)
    back = tile_table_to_grid(table, 4, 3, 5, "t")
    reachable = torch.zeros(4, 4, dtype=torch.bool)
    for h, w in get_all_supported_aspect_ratios(4):
        reachable[:h, :w] = True
    assert torch.equal(back[reachable], grid[reachable]) and not back[~reachable].any()
    bad = table.clone().view(9, 4, 3, 5)
    bad[6, 0] += 1.0  # layout 2x2 (id 6) disagrees with the others on cell (0, 0)
    with pytest.raises(CheckpointError, match=r"cell \(0, 0\) differs"):
        tile_table_to_grid(bad.flatten(1), 4, 3, 5, "t")
    bad = table.clone().view(9, 4, 3, 5)
    bad[2, 3] = 1.0  # layout 1x2 (id 2) has something in tile slot 3
    with pytest.raises(CheckpointError, match="padding tile slots"):
        tile_table_to_grid(bad.flatten(1), 4, 3, 5, "t")


def test_missing_and_unknown_keys_are_named(hf, tmp_path):
    _, src = hf
    sd = read_safetensors_dir(src)
    del sd["language_model.model.layers.2.mlp.up_proj.weight"]
    sd["vision_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_mllama(_write_hf(tmp_path / "bad", src, sd))
    assert "language_model.model.layers.2.mlp.up_proj.weight" in str(e.value)
    assert "vision_model.extra.weight" in str(e.value)


def test_random_tile_table_is_refused(hf, tmp_path):
    _, src = hf
    sd = read_safetensors_dir(src)
    sd["vision_model.pre_tile_positional_embedding.embedding.weight"] = torch.randn(9, 4 * 32)
    with pytest.raises(CheckpointError, match="pre_tile_positional_embedding"):
        load_mllama(_write_hf(tmp_path / "bad", src, sd))


def test_wrong_cross_attention_schedule_is_named(hf, tmp_path):
    _, src = hf
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["cross_attention_layers"] = [2, 4]
    with pytest.raises(CheckpointError, match=r"cross_attention_layers \[2, 4\].*\[1, 4\]"):
        load_mllama(_write_hf(tmp_path / "bad", src, read_safetensors_dir(src), config))


def test_meta_missing_key_is_named(ours, tmp_path):
    path = save_meta_vision(ours, tmp_path / "meta", n_shards=1)
    shard = torch.load(path / "consolidated.00.pth", weights_only=True)
    del shard["vision_model.vision_encoder.class_embedding"]
    torch.save(shard, path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="vision_model.vision_encoder.class_embedding"):
        load_meta_vision(path, vision_config=ours.cfg.vision)
