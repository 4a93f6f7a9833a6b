"""Checkpoints refuse what they cannot use with a named error: bad config values (types, bounds, shape of
the file), foreign tensors (dtypes), shard names that leave the folder; exports find their LM anywhere."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.checkpoint import CheckpointError, load_llama, save_meta_checkpoint
from common.config import MAX_COUNT, MAX_SIZE, dataclass_from_dict
from adapters.llama import LlamaConfig, build_llama
from adapters.model_io import LMMismatchError, load_checkpoint, save_checkpoint
from adapters.multimodal import build_multimodal, multimodal_config


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny multimodal export holding its LM."""
    torch.manual_seed(0)
    model = build_multimodal(multimodal_config("tiny"))
    return save_checkpoint(model, tmp_path_factory.mktemp("export") / "ckpt")


def _edit_config(src, dst, edit):
    out = shutil.copytree(src, dst)
    meta = json.loads((out / "config.json").read_text())
    meta = edit(meta)
    (out / "config.json").write_text(json.dumps(meta))
    return out


def _set(path, value):
    def edit(meta):
        d = meta
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
        return meta
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set(["config", "lm", "dim"], "64"), "config.json: lm.dim: expected an integer, got str '64'"),
    (_set(["config", "lm", "n_heads"], -4), f"lm.n_heads: -4 is outside [1, {MAX_COUNT}]"),
    (_set(["config", "lm", "n_layers"], 200000), f"lm.n_layers: 200000 is outside [1, {MAX_COUNT}]"),
    (_set(["config", "lm", "vocab_size"], MAX_SIZE + 1), f"lm.vocab_size: {MAX_SIZE + 1} is outside"),
    (_set(["config", "lm", "norm_eps"], "1e-5"), "lm.norm_eps: expected a number, got str"),
    (_set(["config", "lm", "tie_embeddings"], 0), "lm.tie_embeddings: expected true or false, got 0"),
    (_set(["config", "vision", "taps"], [1, "x"]), "vision.taps[1]: expected an integer"),
    (_set(["config", "vision", "layers"], 8.0), "vision.layers: expected an integer, got float 8.0"),
    (_set(["config", "lm", "rope_scaling"], [8.0]), "lm.rope_scaling: expected an object, got list"),
    (_set(["config", "xattn_every"], 0), "config.json: xattn_every: 0 is outside [1, "),
    (_set(["extra_key"], 1), "config.json: unknown keys ['extra_key']"),
    (_set(["lm_path"], 3), "lm_path must be a string"),
    (lambda meta: [meta], "config.json: expected an object, got list"),
])
def test_bad_export_config_is_refused_by_name(export, tmp_path, edit, message):
    ckpt = _edit_config(export, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert message in str(e.value)


def test_absurd_layer_count_fails_before_building(export, tmp_path):
    ckpt = _edit_config(export, tmp_path / "bad", _set(["config", "lm", "n_layers"], 200000))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="n_layers"):
        load_checkpoint(ckpt)
    assert time.perf_counter() - start < 2.0  # building 200k meta layers takes minutes


def test_a_405b_sized_config_is_within_bounds():
    cfg = dataclass_from_dict(LlamaConfig, {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8,
                                            "ffn_dim": 53248, "vocab_size": 128256, "max_seq_len": 131072},
                              "405B")
    assert cfg.n_layers == 126 and cfg.rope_scaling is not None


def _rewrite_weights(ckpt, edit):
    sd = load_file(ckpt / "model.safetensors")
    edit(sd)
    save_file(sd, str(ckpt / "model.safetensors"))


def test_tensor_of_another_float_dtype_is_refused(export, tmp_path):
    ckpt = shutil.copytree(export, tmp_path / "fp16")
    _rewrite_weights(ckpt, lambda sd: sd.update({"projector.weight": sd["projector.weight"].half()}))
    with pytest.raises(CheckpointError, match=r"several float dtypes: torch.float32 .*torch.float16 \(proj"):
        load_checkpoint(ckpt)
    # An explicit dtype casts every tensor: the model then has one dtype.
    assert load_checkpoint(ckpt, dtype=torch.bfloat16).projector.weight.dtype == torch.bfloat16


def test_tensor_of_a_non_float_dtype_is_refused(export, tmp_path):
    ckpt = shutil.copytree(export, tmp_path / "int")
    _rewrite_weights(ckpt, lambda sd: sd.update({"projector.weight": sd["projector.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"projector.weight has dtype torch.int32, the model expects"):
        load_checkpoint(ckpt, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Meta params.json and HF config.json go through the same reader


@pytest.fixture(scope="module")
def meta_lm(tmp_path_factory):
    torch.manual_seed(0)
    return save_meta_checkpoint(build_llama("tiny"), tmp_path_factory.mktemp("meta") / "lm")


@pytest.mark.parametrize("key, value, message", [
    ("dim", "64", "params.json: dim: expected an integer, got str '64'"),
    ("n_heads", -4, "params.json: n_heads: -4 is outside [1, "),
    ("n_layers", 200000, f"params.json: n_layers: 200000 is outside [1, {MAX_COUNT}]"),
    ("use_scaled_rope", "yes", "params.json: use_scaled_rope: expected true or false"),
    ("ffn_dim_multiplier", float("inf"), "params.json: ffn_dim_multiplier: inf is not finite"),
    ("typo_key", 1, "params.json: unknown key typo_key (known in the top level: ['dim', "),
])
def test_bad_meta_params_are_refused_by_name(meta_lm, tmp_path, key, value, message):
    lm = shutil.copytree(meta_lm, tmp_path / "lm")
    params = json.loads((lm / "params.json").read_text())
    (lm / "params.json").write_text(json.dumps({**params, key: value}))
    with pytest.raises(CheckpointError) as e:
        load_llama(lm)
    assert message in str(e.value)


def _hf_dir(tmp_path, **overrides):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **overrides)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "32", "config.json: hidden_size: expected an integer, got str '32'"),
    ("num_hidden_layers", 200000, f"num_hidden_layers: 200000 is outside [1, {MAX_COUNT}]"),
    ("num_attention_heads", 0, "num_attention_heads: 0 is outside [1, "),
    ("tie_word_embeddings", "true", "tie_word_embeddings: expected true or false"),
    ("rope_scaling", {"rope_type": "llama3", "factor": "8"},
     "config.json: missing keys rope_scaling.low_freq_factor, rope_scaling.high_freq_factor"),
])
def test_bad_hf_config_is_refused_by_name(tmp_path, key, value, message):
    path = _hf_dir(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError) as e:
        load_llama(path)
    assert message in str(e.value)


def test_hf_config_that_is_not_an_object(tmp_path):
    path = _hf_dir(tmp_path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: expected an object, got list"):
        load_llama(path)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/abs/outside.safetensors", "sub/x.safetensors",
                                  ".."])
def test_index_shard_names_must_stay_in_the_folder(tmp_path, name):
    path = _hf_dir(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    shutil.copyfile(weights, tmp_path / "outside.safetensors")  # would load, were it read
    keys = load_file(weights).keys()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    with pytest.raises(CheckpointError, match=r"shard file .* is not a file name inside"):
        load_llama(path)


# ----------------------------------------------------------------------------------------------
# Exports without their LM: relocatable, and refuse an LM that is not theirs


@pytest.fixture()
def lm_run(tmp_path, monkeypatch):
    """A run directory with the LM under lm/ and an export (without the LM) under out/, saved as the
    trainer does: ``lm_path`` relative to the directory training ran in."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = build_multimodal(multimodal_config("tiny"))
    with torch.no_grad():
        for blk in model.cross_attention_layers:
            blk.gate_attn.fill_(0.5)  # the LM's weights matter to the logits
    save_meta_checkpoint(model.lm, run / "lm")
    monkeypatch.chdir(run)
    save_checkpoint(model, run / "out", lm_path="lm")
    monkeypatch.chdir(tmp_path)
    return model, run


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_export_records_absolute_and_relative_lm_paths(lm_run):
    _, run = lm_run
    meta = json.loads((run / "out" / "config.json").read_text())
    assert meta["lm_path"] == str((run / "lm").resolve())
    assert meta["lm_path_relative"] == "../lm" and len(meta["lm_fingerprint"]) == 64
    assert "lm.tok_embeddings.weight" not in load_file(run / "out" / "model.safetensors")


def test_export_loads_from_another_directory_and_after_a_move(lm_run, tmp_path):
    model, run = lm_run
    assert _same_weights(load_checkpoint(run / "out"), model)  # cwd is not the run directory
    moved = shutil.move(str(run), str(tmp_path / "moved"))  # the absolute path is gone: the relative one
    assert _same_weights(load_checkpoint(f"{moved}/out"), model)


def test_explicit_lm_path_is_used_alone(lm_run, tmp_path):
    model, run = lm_run
    lm_copy = shutil.copytree(run / "lm", tmp_path / "elsewhere")
    shutil.rmtree(run / "lm")
    with pytest.raises(LMMismatchError, match="pass --lm PATH"):
        load_checkpoint(run / "out")
    assert _same_weights(load_checkpoint(run / "out", lm_path=lm_copy), model)


def test_an_lm_of_another_config_is_refused_with_the_difference(lm_run, tmp_path):
    _, run = lm_run
    other = build_llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512,
                                    max_seq_len=512))
    wrong = save_meta_checkpoint(other, tmp_path / "wrong")
    with pytest.raises(LMMismatchError) as e:
        load_checkpoint(run / "out", lm_path=wrong)
    assert str(wrong) in str(e.value) and "n_layers 4 (recorded) vs 2" in str(e.value)


def test_an_lm_with_the_same_shapes_but_other_weights_is_refused(lm_run, tmp_path):
    _, run = lm_run
    torch.manual_seed(1)
    sibling = build_llama("tiny")  # same config and shapes, other weights (as base vs instruct)
    wrong = save_meta_checkpoint(sibling, tmp_path / "sibling")
    with pytest.raises(LMMismatchError, match=r"sibling: same config, but .* differ \(fingerprint"):
        load_checkpoint(run / "out", lm_path=wrong)


def test_an_export_made_from_the_float32_copy_of_a_bf16_lm_loads_that_lm(tmp_path):
    """The trainer exports ``model.float()``; the LM it points at stays bf16 on disk (real sizes): the
    fingerprint is of the values, not of the dtype in memory, so the export finds its LM."""
    torch.manual_seed(0)
    model = build_multimodal(multimodal_config("tiny"))
    lm_dir = save_meta_checkpoint(model.lm.to(torch.bfloat16), tmp_path / "lm")  # rounds model.lm in place
    save_checkpoint(model.float(), tmp_path / "out", lm_path=lm_dir)
    loaded = load_checkpoint(tmp_path / "out")  # found, not "fingerprint differs"
    assert _same_weights(loaded.lm.float(), model.lm)


def test_an_export_with_the_earlier_dtype_aware_fingerprint_still_finds_its_lm(lm_run):
    from adapters.model_io import _fingerprint

    model, run = lm_run
    meta = json.loads((run / "out" / "config.json").read_text())
    legacy = _fingerprint(model.lm, legacy=True)
    assert legacy != meta["lm_fingerprint"]
    (run / "out" / "config.json").write_text(json.dumps({**meta, "lm_fingerprint": legacy}))
    assert _same_weights(load_checkpoint(run / "out"), model)


def test_export_written_before_fingerprints_loads_with_its_config_checked(lm_run, monkeypatch):
    model, run = lm_run
    meta = json.loads((run / "out" / "config.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("lm_path_relative", "lm_fingerprint")}
    (run / "out" / "config.json").write_text(json.dumps({**old, "lm_path": "lm"}))  # relative to the run dir
    monkeypatch.chdir(run)
    assert _same_weights(load_checkpoint("out"), model)


def test_lm_path_for_an_export_holding_its_lm_is_refused(export, meta_lm):
    with pytest.raises(CheckpointError, match="this export holds its LM"):
        load_checkpoint(export, lm_path=meta_lm)


def test_export_of_a_tied_lm_round_trips(tmp_path):
    """An export holding a tied LM (Llama 3.2 1B / 3B) stores the shared tensor once and loads it tied."""
    from dataclasses import replace

    torch.manual_seed(0)
    cfg = multimodal_config("tiny")
    model = build_multimodal(replace(cfg, lm=replace(cfg.lm, tie_embeddings=True)))
    out = save_checkpoint(model, tmp_path / "tied")
    assert "lm.output.weight" not in load_file(out / "model.safetensors")
    loaded = load_checkpoint(out)
    assert loaded.lm.output.weight is loaded.lm.tok_embeddings.weight
    tokens = torch.randint(0, cfg.lm.vocab_size, (1, 5))
    torch.testing.assert_close(loaded.lm(tokens), model.lm(tokens), rtol=0, atol=0)
