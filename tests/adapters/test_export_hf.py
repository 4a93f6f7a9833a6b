"""HF Mllama export (adapters.mllama_export, scripts.export_hf) against transformers 4.54.1.

A tiny image model with random weights and every gate non-zero (so the cross-attention layers, the gated
vision layers and the tile tables all change the logits) is saved as our export, written out by the CLI and
loaded by ``MllamaForConditionalGeneration.from_pretrained``: same logits and greedy tokens as ours on the
same tiled image and prompt; our own Mllama loader reads it back bitwise. That model has open_clip's vision
attention biases (``vision.attn_bias`` true), all zero; a model built with ``attn_bias`` false and trained by
the trainer exports too, and an export written before the field existed still loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, MllamaForConditionalGeneration, MllamaImageProcessor
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from adapters.llama import build_llama
from adapters.mllama import load_mllama
from adapters.mllama_export import HFExportError, HFExportWarning, hf_special_tokens, save_mllama_hf
from adapters.model_io import load_checkpoint, save_checkpoint
from adapters.multimodal import ImageBatch, MultimodalLlama, build_multimodal
from scripts.export_hf import main
from speech.adapter import build_speech_llama
from speech.model_io import save_speech_checkpoint
from tests.adapters.test_mllama import _image
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model, tiny_asr_config, tiny_video_config
from tests.training.test_data import caption_texts, make_image_shards
from tests.training.test_trainer import DS, run_config
from training.trainer import train
from vision.tiling import TilingConfig, collate_tiled, supported_layouts, tile_image

TOL = 1e-4
TILE_TABLES = ("vision.gated_positional_embedding", "vision.pre_tile_pos_embed.embedding",
               "vision.post_tile_pos_embed.embedding")
ATTN_BIASES = ("attn.in_proj_bias", "attn.out_proj.bias")


def _gates_on(model: MultimodalLlama, seed: int = 1) -> MultimodalLlama:
    """Every tanh gate at +-(0.4 .. 0.9): a fresh model's zero gates would hide the adapters from the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name.rsplit(".", 1)[-1] or name.endswith(".gate"):
                sign = 1.0 if torch.rand(1, generator=g) > 0.5 else -1.0
                p.fill_(sign * (0.4 + 0.5 * torch.rand(1, generator=g).item()))
    return model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """(our model, our export dir, the HF directory written by the CLI with 2+ shards)."""
    model = _gates_on(build_tiny_vqa_model(tok)).eval()
    gates = [p for n, p in model.named_parameters() if "gate" in n]
    assert len(gates) > 10 and all(p.abs().min() >= 0.4 for p in gates)
    root = tmp_path_factory.mktemp("export")
    save_checkpoint(model, root / "ours", tok.path)
    assert main([str(root / "ours"), str(root / "hf"), "--max-shard-size", "1MB"]) == 0
    return model, root / "ours", root / "hf"


def _inputs(model: MultimodalLlama, hf_dir: Path, tok, seed: int = 0):
    """Our (tokens, images) and HF's inputs for one prompt that starts with <|image|> (HF's base-prompt layout;
    rows before the first image differ in HF, see the module docstring of adapters.mllama_export)."""
    image = _image(100, 50, seed)  # a 1x2 layout: 2 real tiles of 4, padded tiles included as released
    vis = model.cfg.vision
    image_id = model.cfg.image_token_id
    tokens = torch.tensor([[image_id, tok.bos_id, *tok.encode("What shape is in the picture?")]])
    batch = collate_tiled([[tile_image(image, TilingConfig(tile_size=vis.tile_size, max_tiles=vis.max_tiles))]])
    proc = MllamaImageProcessor.from_pretrained(hf_dir)  # the exported preprocessor_config.json
    hf_img = proc([[image]], return_tensors="pt")
    assert torch.allclose(batch["tiles"], hf_img["pixel_values"], atol=1e-6)  # our tiling = their processor
    assert torch.equal(batch["layout_ids"], hf_img["aspect_ratio_ids"])
    xmask = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(tokens[0].tolist(), image_id)], hf_img["num_tiles"], vis.max_tiles,
        tokens.shape[1])
    hf_inputs = {"input_ids": tokens, "cross_attention_mask": torch.from_numpy(xmask),
                 **{k: hf_img[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}}
    return tokens, ImageBatch.from_collated(batch), hf_inputs


def test_transformers_gives_our_logits_and_greedy_tokens(exported, tok):
    model, _, hf_dir = exported
    hf = MllamaForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokens, images, hf_inputs = _inputs(model, hf_dir, tok)
    with torch.no_grad():
        ref = hf(**hf_inputs).logits
        ref_text = hf(input_ids=tokens).logits
        out = model(tokens, images)
    assert out.shape == ref.shape == (1, tokens.shape[1], tok.n_words)
    assert (out - ref).abs().max().item() <= TOL
    assert (ref - ref_text).abs().max() > 1000 * TOL  # the image matters: the comparison is not vacuous

    _same_greedy_tokens(model, hf, tokens, images, hf_inputs, tok)


def _same_greedy_tokens(model, hf, tokens, images, hf_inputs, tok, n: int = 4) -> None:
    """HF's ``generate`` and our decoding loop (`adapters.generation.generate`, KV cache and cached vision K/V)
    give the same ``n`` greedy tokens; the exported stop ids are ours, and both run past them here so that all
    ``n`` are compared (a trained model may well answer with a stop id first)."""
    from adapters.generation import SamplingConfig, collect_ids, generate

    assert sorted(hf.generation_config.eos_token_id) == sorted(tok.stop_ids)
    with torch.no_grad():
        hf_ids = hf.generate(**hf_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, tokens.shape[1]:].tolist()
    ours = collect_ids(generate(model, tokens, images, SamplingConfig(max_new_tokens=n)))
    assert ours == [hf_ids] and len(hf_ids) == n


def test_tokenizer_files(exported, tok):
    _, _, hf_dir = exported
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "What shape is in the picture? A red circle, 3 of them."
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.encode(text)[0] == tok.bos_id  # BOS first, as the hub's Llama 3 tokenizer
    assert hf_tok.convert_tokens_to_ids("<|image|>") == tok.n_words  # = image_token_index = vocab_size
    for name, i in tok.special.items():
        if name != "<|image|>":
            assert hf_tok.convert_tokens_to_ids(name) == i
    assert hf_special_tokens(tok.n_base)[tok.image_id - tok.n_base] == "<|reserved_special_token_246|>"
    assert hf_tok.decode(tok.encode(text)) == text


def _check_round_trip(model: MultimodalLlama, loaded: MultimodalLlama) -> None:
    """Every parameter bitwise equal; tile-grid cells no layout reaches come back as zero (never read); the
    (all-zero) vision attention biases of an ``attn_bias`` model come back as none."""
    reach = torch.zeros(4, 4, dtype=torch.bool)
    for h, w in supported_layouts(4):
        reach[:h, :w] = True
    want, got = model.state_dict(), loaded.state_dict()
    biases = [k for k in want if k.endswith(ATTN_BIASES)]
    assert loaded.cfg.vision.attn_bias is False and all(not want[k].any() for k in biases)
    assert got.keys() == want.keys() - set(biases)
    for key in got:
        assert got[key].dtype == want[key].dtype, key
        if key in TILE_TABLES:
            assert torch.equal(got[key][reach], want[key][reach]) and not got[key][~reach].any(), key
        else:
            assert torch.equal(got[key], want[key]), key


def test_our_loader_reads_it_back_bitwise(exported, tok):
    model, _, hf_dir = exported
    loaded = load_mllama(hf_dir).eval()
    assert model.cfg.vision.attn_bias  # open_clip's layout, biases all zero: exportable, read back without them
    assert loaded.cfg == replace(model.cfg, train_vision=loaded.cfg.train_vision,
                                 vision=replace(model.cfg.vision, attn_bias=False))
    _check_round_trip(model, loaded)
    tokens, images, _ = _inputs(model, hf_dir, tok, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, images), model(tokens, images))


def test_sharded_output_has_a_valid_index(exported):
    _, _, hf_dir = exported
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and not (hf_dir / "model.safetensors").exists()
    assert files == sorted(p.name for p in hf_dir.glob("*.safetensors"))
    keys, total = {}, 0
    for name in files:
        with safe_open(str(hf_dir / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                keys[key] = name
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert keys == index["weight_map"] and total == index["metadata"]["total_size"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "mllama" and config["transformers_version"] == "4.54.1"
    assert config["vision_config"]["intermediate_layers_indices"] == [1, 3, 5, 6, 7]  # Meta's meaning, as stored


def test_one_shard_when_it_fits(exported, tmp_path):
    model, _, _ = exported
    out = save_mllama_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "preprocessor_config.json"]  # no tokenizer given


def test_bf16_output(exported, tok, tmp_path):
    model, ours, _ = exported
    assert main([str(ours), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    out = tmp_path / "hf"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 == {torch.bfloat16}
    bf16 = build_tiny_vqa_model(tok)  # the same weights, cast: what the export must hold bitwise
    bf16.load_state_dict(model.state_dict())
    _check_round_trip(bf16.to(torch.bfloat16), load_mllama(out))
    hf = MllamaForConditionalGeneration.from_pretrained(out, torch_dtype="auto")
    assert hf.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Vision attention biases: a trained attn_bias-false model, old exports


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(start model, trained model, HF dir, tokenizer): a tiny ``attn_bias`` false model with every gate on,
    trained 4 optimiser steps by the trainer (its ``model.init_from`` road, as tests/training/test_trainer.py
    runs it: DeepSpeed ZeRO-1 bf16 on CPU), its export written out by the CLI."""
    root = tmp_path_factory.mktemp("trained")
    make_image_shards(root)
    tok = build_tiny_tokenizer(root, texts=caption_texts())
    (root / "ds.json").write_text(json.dumps(DS))
    start = _gates_on(_with(tok, vision={"attn_bias": False}))
    save_checkpoint(start, root / "start", tok.path)
    result = train(run_config(root, "run", f"model.init_from={root / 'start'}", "train.steps=4",
                              "train.save_every=4"))
    assert main([str(result.export_dir), str(root / "hf")]) == 0
    return start, load_checkpoint(result.export_dir).eval(), root / "hf", tok


def test_run_config_sets_attn_bias(trained, tmp_path):
    """``model.attn_bias: false`` builds a preset without vision attention biases; against an ``init_from`` export
    of the other layout it is a TrainError naming both, before anything trains."""
    from adapters.tokenizer import Tokenizer
    from training.spec import TrainError, build_multimodal_model

    start, _, _, tok = trained
    root = Path(tok.path).parent
    tokenizer = Tokenizer(tok.path)
    built = build_multimodal_model(run_config(root, "preset", "model.attn_bias=false"), tokenizer)
    assert built.cfg.vision.attn_bias is False and not [k for k in built.state_dict() if k.endswith(ATTN_BIASES)]
    assert build_multimodal_model(run_config(root, "preset"), tokenizer).cfg.vision.attn_bias is True
    with pytest.raises(TrainError, match="model.attn_bias: True but model.init_from .* vision.attn_bias False"):
        build_multimodal_model(run_config(root, "clash", f"model.init_from={root / 'start'}", "model.attn_bias=true"),
                               tokenizer)


def test_trained_attn_bias_false_model_exports_with_our_logits(trained):
    start, model, hf_dir, tok = trained
    assert model.cfg.vision.attn_bias is False
    assert not [k for k in model.state_dict() if k.endswith(ATTN_BIASES)]  # nothing there to train or check
    moved = [n for n, p in model.trainable_named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert any(n.startswith("vision.transformer.") for n in moved)  # the encoder trained, not only the adapters
    assert any(n.startswith("cross_attention_layers.") for n in moved)
    hf = MllamaForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    assert not [n for n, _ in hf.named_parameters() if "vision_model" in n and "self_attn" in n and "bias" in n]
    tokens, images, hf_inputs = _inputs(model, hf_dir, tok)
    with torch.no_grad():
        ref = hf(**hf_inputs).logits
        out = model(tokens, images)
        ref_text = hf(input_ids=tokens).logits
    assert (out - ref).abs().max().item() <= TOL
    assert (ref - ref_text).abs().max() > 1000 * TOL
    _same_greedy_tokens(model, hf, tokens, images, hf_inputs, tok)
    loaded = load_mllama(hf_dir)
    assert loaded.cfg == replace(model.cfg, train_vision=loaded.cfg.train_vision)
    _check_round_trip(model, loaded)


def test_export_without_the_attn_bias_field_loads_with_biases(exported, tmp_path):
    """Exports written before ``vision.attn_bias`` existed hold the biases and load as ``attn_bias`` true."""
    model, ours, _ = exported
    old = tmp_path / "old"
    shutil.copytree(ours, old)
    config = json.loads((old / "config.json").read_text())
    assert config["config"]["vision"].pop("attn_bias") is True
    (old / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(old)
    assert loaded.cfg == model.cfg
    want, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys() and any(k.endswith(ATTN_BIASES) for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert main([str(old), str(tmp_path / "hf")]) == 0  # its biases are zero: still exportable
    _check_round_trip(model, load_mllama(tmp_path / "hf"))


# ----------------------------------------------------------------------------------------------
# Refusals


def _with(tok, **changes) -> MultimodalLlama:
    base = build_tiny_vqa_model(tok).cfg
    lm = changes.pop("lm", {})
    vision = changes.pop("vision", {})
    cfg = replace(base, lm=replace(base.lm, **lm), vision=replace(base.vision, **vision), **changes)
    return build_multimodal(cfg, build_llama(cfg.lm))


def _on_meta(tok, **changes) -> MultimodalLlama:
    """`_with` without weights (a large tower): the refusal comes before any tensor is read."""
    with torch.device("meta"):
        return _with(tok, **changes)


def _vision_bias(tok) -> MultimodalLlama:
    model = build_tiny_vqa_model(tok)
    with torch.no_grad():
        model.vision.transformer.resblocks[2].attn.in_proj_bias[5] = 0.1
    return model


VIT_L = {"open_clip_model": "ViT-L-14", "width": 1024, "layers": 24, "heads": 16}
REFUSALS = {
    "video adapter": (lambda tok: MultimodalLlama(tiny_video_config(tok)), "video adapter"),
    "reward head": (lambda tok: _with(tok, reward_head=True), "reward head"),
    "speech model": (lambda tok: build_speech_llama(tiny_asr_config(tok)), "speech"),
    "learnable rows": (lambda tok: _with(tok, n_learnable_embeddings=4), r"vocab_size \+ 8"),
    # 5 layers, every 2nd: blocks before [2, 4]; the released rule puts 2 blocks before [1, 4]
    "schedule": (lambda tok: _with(tok, lm={"n_layers": 5}), r"schedule \[1, 4\]"),
    "vision attention bias": (_vision_bias, "in_proj_bias is non-zero.*train with vision.attn_bias: false"),
    "token padding": (lambda tok: _with(tok, vision={"pad_to_multiple": 4}), "pad_to_multiple 4"),
    "tied embeddings": (lambda tok: _with(tok, lm={"tie_embeddings": True}), "ties its input and output"),
    # any other config our reader does not give back is named field by field
    "open_clip tower": (lambda tok: _on_meta(tok, vision=VIT_L), "vision.open_clip_model 'ViT-L-14'"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_what_mllama_cannot_hold_is_refused_by_name(tok, tmp_path, name):
    build, reason = REFUSALS[name]
    with pytest.raises(HFExportError, match=reason):
        save_mllama_hf(build(tok), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusal of a bad argument
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_cli_refusals_are_one_line(tok, tmp_path, capsys, exported):
    _, ours, _ = exported
    save_checkpoint(MultimodalLlama(tiny_video_config(tok)), tmp_path / "video", tok.path)
    assert "video adapter" in _one_line_exit_2(capsys, [str(tmp_path / "video"), str(tmp_path / "a")])
    save_speech_checkpoint(build_speech_llama(tiny_asr_config(tok)), tmp_path / "speech", tok.path)
    assert "no speech part" in _one_line_exit_2(capsys, [str(tmp_path / "speech"), str(tmp_path / "b")])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert "not an empty directory" in _one_line_exit_2(capsys, [str(ours), str(tmp_path / "used")])
    assert "not a size" in _one_line_exit_2(capsys, [str(ours), str(tmp_path / "c"), "--max-shard-size", "big"])
    assert "ExportFormatError" not in _one_line_exit_2(capsys, [str(tmp_path), str(tmp_path / "d")])
    assert not any((tmp_path / n).exists() for n in "abcd")
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--max-shard-size" in capsys.readouterr().out


def test_transformers_outside_the_checked_range_is_warned(exported, tmp_path, capsys, monkeypatch):
    """The written file holds Meta's tap indices whatever is installed; 4.55+ would read them otherwise."""
    model, ours, _ = exported
    monkeypatch.setattr("adapters.mllama_export.metadata.version", lambda name: "4.56.1")
    with pytest.warns(HFExportWarning, match="4.56.1 is installed.*block inputs"):
        save_mllama_hf(model, tmp_path / "a")
    assert main([str(ours), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err.startswith("export_hf: warning: transformers 4.56.1 is installed")
    assert (json.loads((tmp_path / "b" / "config.json").read_text())["vision_config"]["intermediate_layers_indices"]
            == list(model.cfg.vision.taps))
