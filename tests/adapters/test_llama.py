"""The frozen Llama against transformers' LlamaForCausalLM (independent reference), both checkpoint layouts."""

import json

import pytest
import torch

from adapters.checkpoint import CheckpointError, load_llama, save_meta_checkpoint
from adapters.llama import build_llama, llama_config

import transformers  # noqa: E402  (dev dependency: the independent reference)

HF_CONFIG = dict(
    vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=2048,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**HF_CONFIG)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Non-trivial norm weights so a mis-mapped norm cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_llama")
    hf_model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")  # several shards + index
    return path


def _tokens(batch=2, T=40, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, T), generator=g)


def test_hf_checkpoint_is_sharded(hf_dir):
    assert (hf_dir / "model.safetensors.index.json").exists()
    assert len(list(hf_dir.glob("*.safetensors"))) > 1


def test_logits_match_transformers(hf_model, hf_dir):
    ours = load_llama(hf_dir).eval()
    # head_dim 16: wavelengths span all three regimes of the 3.1 scaling (kept, blended, divided by 8).
    tokens = _tokens(T=200)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        got = ours(tokens)
    assert (got - ref).abs().max().item() <= 1e-4


def test_tied_embeddings_checkpoint_matches_transformers(tmp_path):
    """Llama 3.2 1B / 3B layout: tie_word_embeddings, no lm_head.weight in the files."""
    torch.manual_seed(0)
    tied = transformers.LlamaConfig(**dict(HF_CONFIG, tie_word_embeddings=True))
    hf = transformers.LlamaForCausalLM(tied).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    ours = load_llama(tmp_path).eval()
    assert ours.output.weight is ours.tok_embeddings.weight
    tokens = _tokens(T=50)
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_meta_layout_with_two_shards_gives_identical_logits(hf_dir, tmp_path):
    ours = load_llama(hf_dir).eval()
    meta_dir = save_meta_checkpoint(ours, tmp_path / "meta", n_shards=2)
    assert sorted(p.name for p in meta_dir.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    shard = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)  # row-parallel: split on dim 1
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)  # column-parallel: split on dim 0
    meta = load_llama(meta_dir).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(meta(tokens), ours(tokens))


def test_kv_cached_decoding_equals_full_forward(hf_dir):
    model = load_llama(hf_dir).eval()
    tokens = _tokens(T=24)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch=2, max_len=32)
        steps = [model(tokens[:, :10], start_pos=0, cache=cache)]
        steps.append(model(tokens[:, 10:16], start_pos=10, cache=cache))  # a multi-token chunk
        for t in range(16, 24):
            steps.append(model(tokens[:, t : t + 1], start_pos=t, cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_document_mask_isolates_packed_documents():
    torch.manual_seed(0)
    model = build_llama(llama_config("tiny")).eval()
    a, b = _tokens(1, 12, 512, 2), _tokens(1, 9, 512, 3)
    packed = torch.cat([a, b], 1)
    doc_ids = torch.tensor([[0] * 12 + [1] * 9])
    positions = torch.cat([torch.arange(12), torch.arange(9)])[None]
    with torch.no_grad():
        got = model(packed, doc_ids=doc_ids, positions=positions)
        torch.testing.assert_close(got[:, :12], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:, 12:], model(b), atol=1e-5, rtol=0)


def test_freeze_removes_gradients_and_stays_in_eval():
    model = build_llama("tiny").freeze()
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training


def test_unknown_and_missing_keys_are_named(hf_model, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    extra = dict(sd, **{"model.layers.0.self_attn.extra_proj.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="extra_proj"):
        load_llama(tmp_path)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w3"):
        load_llama(tmp_path)


def test_bad_directories_raise_named_errors(tmp_path):
    with pytest.raises(CheckpointError, match="neither params.json"):
        load_llama(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 10,
                                                      "typo_key": 1}))
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_llama(tmp_path)
    torch.save({}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="typo_key"):
        load_llama(tmp_path)


def test_presets_and_strict_overrides():
    assert llama_config("8B").ffn_dim == 14336 and llama_config("70B").n_layers == 80
    with pytest.raises(TypeError):
        llama_config("tiny", n_layer=3)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_llama("8B").parameters())
    assert 8.0e9 <= n <= 8.1e9
