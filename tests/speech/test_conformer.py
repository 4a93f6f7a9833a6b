import pytest
import torch

from common.rope import apply_rope, rope_frequencies, rope_table
from speech.conformer import (ConformerAttention, ConformerConfig, ConformerConvModule, ConformerEncoder,
                              FrameStacker, conformer_config, length_mask, param_count)


def _encoder(seed: int = 0, **overrides) -> ConformerEncoder:
    torch.manual_seed(seed)
    return ConformerEncoder(conformer_config("tiny", **overrides)).eval()


def test_shapes_and_per_sample_ceil_lengths():
    enc = _encoder()
    mel = torch.randn(2, 101, 80)  # T not a multiple of 4
    out, out_lengths = enc(mel, torch.tensor([37, 101]))
    assert out.shape == (2, 26, 64)
    assert out_lengths.tolist() == [10, 26]  # ceil(37 / 4), ceil(101 / 4); NeMo's floor would give 9
    assert torch.isfinite(out).all()
    assert out[0, 10:].abs().max() == 0 and out[0, 9].abs().max() > 0

    out, out_lengths = enc(torch.randn(2, 100, 80), torch.tensor([37, 100]))
    assert out.shape == (2, 25, 64) and out_lengths.tolist() == [10, 25]


def test_stacker_last_partial_stack_is_zero_padded():
    torch.manual_seed(0)
    stacker = FrameStacker(conformer_config("tiny"))
    mel = torch.randn(1, 37, 80)
    alone, _ = stacker(mel, torch.tensor([37]))
    garbage = torch.cat([mel, 1e3 * torch.randn(1, 63, 80)], dim=1)
    batched, lens = stacker(garbage, torch.tensor([37]))
    assert lens.tolist() == [10]
    # 1e-5: the two lengths take different matmul blockings (summation order); leaked 1e3 garbage would be ~1e2
    torch.testing.assert_close(batched[:, :10], alone, atol=1e-5, rtol=0)
    assert batched[:, 10:].abs().max() == 0  # the projection bias does not survive at padding


@torch.no_grad()
def test_padding_invariance_batch_and_garbage():
    enc = _encoder()
    short = torch.randn(1, 37, 80)
    alone, _ = enc(short, torch.tensor([37]))

    long = torch.randn(1, 400, 80)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 363, 80)], dim=1), long])
    out, lens = enc(batch, torch.tensor([37, 400]))
    torch.testing.assert_close(out[:1, :10], alone, atol=1e-5, rtol=0)
    # And the long sample is unaffected by sharing a batch with the short one.
    torch.testing.assert_close(out[1:], enc(long, torch.tensor([400]))[0], atol=1e-5, rtol=0)

    garbage = torch.cat([short, 1e3 * torch.randn(1, 63, 80)], dim=1)
    out, _ = enc(garbage, torch.tensor([37]))
    torch.testing.assert_close(out[:, :10], alone, atol=1e-5, rtol=0)
    assert out[:, 10:].abs().max() == 0


@torch.no_grad()
def test_conv_module_does_not_leak_padding():
    torch.manual_seed(0)
    conv = ConformerConvModule(conformer_config("tiny")).eval()
    x = torch.randn(1, 20, 64)
    valid = length_mask(torch.tensor([12]), 20)
    ref = conv(x, valid)[:, :12]

    perturbed = x.clone()
    perturbed[:, 12:] += 1e3 * torch.randn(1, 8, 64)
    torch.testing.assert_close(conv(perturbed, valid)[:, :12], ref, atol=1e-6, rtol=0)
    # The mask is what protects: told the padding is valid, the conv reads it into the last k // 2 frames.
    assert not torch.allclose(conv(perturbed, torch.ones_like(valid))[:, :12], ref, atol=1e-3)

    control = x.clone()
    control[:, 11] += torch.randn(64)  # the last valid frame (not a constant: LN would remove it)
    changed = (conv(control, valid)[0, :12] - ref[0]).abs().amax(-1) > 1e-4
    assert changed[8:12].all() and not changed[:8].any()  # kernel 7: frames 8..11 see frame 11


def test_rope_scores_depend_on_relative_position_only():
    hd = 16
    rope = rope_table(rope_frequencies(hd, 10000.0, None), torch.arange(64))
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rope(q, rope[m : m + 1]) * apply_rope(k, rope[n : n + 1])).sum()

    for m, n in [(3, 0), (5, 9), (0, 0)]:
        for shift in (1, 17, 40):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 0), score(5, 0))  # the rotation is really applied


@torch.no_grad()
def test_attention_is_translation_invariant():
    torch.manual_seed(0)
    cfg = conformer_config("tiny")
    attn = ConformerAttention(cfg).eval()
    x = torch.randn(2, 9, 64)
    key_mask = length_mask(torch.tensor([9, 6]), 9)
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, None)
    at0 = attn(x, rope_table(inv_freq, torch.arange(9)), key_mask)
    at100 = attn(x, rope_table(inv_freq, torch.arange(100, 109)), key_mask)
    torch.testing.assert_close(at100, at0, atol=1e-5, rtol=1e-5)
    # Positions matter (a permutation-invariant attention would pass the shift test too).
    reversed_ = attn(x, rope_table(inv_freq, torch.arange(8, -1, -1)), key_mask)
    assert not torch.allclose(reversed_, at0, atol=1e-3)


def test_empty_sample_stays_finite():
    out, lens = _encoder()(torch.randn(2, 16, 80), torch.tensor([0, 16]))
    assert lens.tolist() == [0, 4] and torch.isfinite(out).all() and out[0].abs().max() == 0


def test_1b_param_count():
    n = param_count("1B")
    print(f"Conformer 1B preset: {n:,} parameters")
    assert 0.95e9 <= n <= 1.1e9


def test_tiny_builds_runs_and_trains():
    enc = ConformerEncoder(conformer_config("tiny", dropout=0.1)).train()
    out, _ = enc(torch.randn(2, 30, 80), torch.tensor([30, 17]))
    out.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())
    assert enc.num_params() == param_count("tiny")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(dim=0), "dim"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=3), "n_heads"),
        (dict(n_heads=64), "head dim"),  # head dim 1: odd, RoPE needs pairs
        (dict(ffn_dim=-1), "ffn_dim"),
        (dict(conv_kernel=6), "conv_kernel"),
        (dict(stack=0), "stack"),
        (dict(n_mels=2.5), "n_mels"),
        (dict(dropout=1.0), "dropout"),
        (dict(rope_theta=0.0), "rope_theta"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        conformer_config("tiny", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match=r"'1B'.*'tiny'"):
        conformer_config("2B")
    with pytest.raises(TypeError, match="d_model"):
        conformer_config("tiny", d_model=8)
    with pytest.raises(TypeError):
        ConformerConfig(dim=64, n_layers=2, n_heads=4)  # ffn_dim is required


def test_bad_inputs_raise():
    enc = _encoder()
    with pytest.raises(ValueError, match="n_mels"):
        enc(torch.randn(1, 8, 40), torch.tensor([8]))
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.randn(1, 8, 80), torch.tensor([9]))
