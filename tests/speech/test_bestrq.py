"""BEST-RQ: frozen quantizer, span masks, loss on masked valid frames only, and a short training run."""

import math
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speech.bestrq import BestRQ, BestRQConfig, RandomProjectionQuantizer, span_mask, stack_frames
from speech.conformer import ConformerEncoder, conformer_config
from speech.features import LogMel, normalize_features
from tests.system_deps import require_binary

SMALL = BestRQConfig(n_codebooks=4, codebook_size=256)  # paper values elsewhere; fewer codes for speed


class StackEncoder(nn.Module):
    """Stacking + linear, the encoder interface without a Conformer; records its last input."""

    def __init__(self, dim: int = 32, stack: int = 4, n_mels: int = 80):
        super().__init__()
        self.stack = stack
        self.proj = nn.Linear(stack * n_mels, dim)
        self.last_input = None

    def forward(self, mel, lengths):
        self.last_input = mel.detach().clone()
        out_lengths = torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")
        h = self.proj(stack_frames(mel, self.stack))
        valid = torch.arange(h.shape[1])[None, :] < out_lengths[:, None]
        return h.masked_fill(~valid[..., None], 0.0), out_lengths


def random_batch(lengths, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    T = T or int(lengths.max())
    mel = torch.randn(len(lengths), T, 80, generator=g) * 3.0 - 5.0  # log-mel-like offset and scale
    mel[torch.arange(T)[None, :] >= lengths[:, None]] = 0.0
    return mel, lengths


# --- config ----------------------------------------------------------------------------------------

def test_config_defaults_are_the_papers_and_mask_units_are_consistent():
    cfg = BestRQConfig()
    assert (cfg.stack, cfg.codebook_dim, cfg.n_codebooks, cfg.codebook_size) == (4, 16, 16, 8192)
    assert (cfg.mask_prob, cfg.mask_span, cfg.noise_std) == (0.025, 32, 0.1)
    assert cfg.stacked_mask_span == 8
    # Drawing on the 40 ms grid keeps the paper's expected masked fraction: 1 - 0.975^32 = 55.5%.
    assert cfg.expected_masked_fraction == pytest.approx(0.5545, abs=1e-3)
    stacked_fraction = 1 - (1 - cfg.stacked_mask_prob) ** cfg.stacked_mask_span
    assert stacked_fraction == pytest.approx(cfg.expected_masked_fraction)


@pytest.mark.parametrize("field, value", [
    ("n_codebooks", 0), ("codebook_size", -1), ("mask_prob", 0.0), ("mask_prob", 1.5), ("mask_span", 30),
    ("noise_std", -0.1), ("stack", 2.0), ("seed", -1),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BestRQConfig(**{field: value})


# --- quantizer -------------------------------------------------------------------------------------

def test_quantizer_buffers_are_frozen_seeded_and_saved(tmp_path):
    torch.manual_seed(1)
    q = RandomProjectionQuantizer(BestRQConfig())
    torch.manual_seed(2)  # the global RNG plays no part
    same = RandomProjectionQuantizer(BestRQConfig())
    other = RandomProjectionQuantizer(BestRQConfig(seed=1))
    sd = q.state_dict()
    assert set(sd) == {"projection", "codebooks"}
    assert sd["projection"].shape == (16, 320, 16) and sd["codebooks"].shape == (16, 8192, 16)
    assert list(q.parameters()) == [] and not any(b.requires_grad for b in q.buffers())
    assert torch.allclose(q.codebooks.norm(dim=-1), torch.ones(16, 8192))
    # Xavier normal for a 320 -> 16 map: std sqrt(2 / (320 + 16)).
    assert q.projection.std().item() == pytest.approx(math.sqrt(2 / 336), rel=0.02)
    assert torch.equal(q.projection, same.projection) and torch.equal(q.codebooks, same.codebooks)
    assert not torch.equal(q.projection, other.projection) and not torch.equal(q.codebooks, other.codebooks)
    # The projections of different codebooks are independent draws.
    assert not torch.equal(q.projection[0], q.projection[1])

    torch.save(q.state_dict(), tmp_path / "q.pt")
    other.load_state_dict(torch.load(tmp_path / "q.pt"))
    assert torch.equal(other.projection, q.projection) and torch.equal(other.codebooks, q.codebooks)
    x = torch.randn(2, 5, 320)
    assert torch.equal(other.targets(x), q.targets(x))


def test_quantizer_targets_match_numpy_cosine_nearest_neighbour():
    q = RandomProjectionQuantizer(BestRQConfig())
    x = torch.randn(3, 40, 320, generator=torch.Generator().manual_seed(0))
    got = q.targets(x)
    assert got.shape == (3, 40, 16) and got.dtype == torch.long

    A = q.projection.double().numpy()
    C = q.codebooks.double().numpy()
    xs = x.double().numpy().reshape(-1, 320)
    for k in range(16):
        y = xs @ A[k]
        y /= np.linalg.norm(y, axis=-1, keepdims=True)
        cos = y @ C[k].T / np.linalg.norm(C[k], axis=-1)  # (N, 8192) cosine similarity
        ref = cos.argmax(-1)
        mine = got[..., k].numpy().reshape(-1)
        # fp32 vs fp64 may only disagree on a near tie.
        rows = np.arange(len(ref))
        assert np.all((mine == ref) | (cos[rows, ref] - cos[rows, mine] < 1e-5))
        assert (mine == ref).mean() > 0.99


def test_quantizer_is_fp32_under_bf16_inputs_autocast_and_model_casts():
    q = RandomProjectionQuantizer(BestRQConfig())
    x = torch.randn(2, 30, 320).bfloat16()
    ref = q.targets(x.float())
    assert torch.equal(q.targets(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.targets(x.float()), ref)
    before = q.codebooks.clone()
    q.to(torch.bfloat16)  # e.g. a bf16 training engine casting the whole model
    assert q.codebooks.dtype == torch.float32 and torch.equal(q.codebooks, before)
    assert torch.equal(q.targets(x), ref)


# --- span masks ------------------------------------------------------------------------------------

def test_span_mask_respects_lengths_and_always_masks_something():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([0, 1, 2, 3, 7, 50, 200, 13])
    for _ in range(50):
        m = span_mask(lengths, 0.001, 8, g, total=210)
        assert m.shape == (8, 210)
        assert not (m & (torch.arange(210)[None, :] >= lengths[:, None])).any()
        assert torch.equal(m.any(-1), lengths > 0)


def test_span_mask_fraction_and_span_shape():
    g = torch.Generator().manual_seed(0)
    p, span, T = 0.025, 32, 4000
    m = span_mask(torch.full((256,), T), p, span, g)
    # Past the first span - 1 frames every frame is masked with probability 1 - (1 - p)^span. Masked runs
    # are ~70 frames long, so this is ~15k independent draws: std ~0.004.
    assert m[:, span:].float().mean().item() == pytest.approx(1 - (1 - p) ** span, abs=0.015)
    # Runs of masked frames are at least one span long unless clipped at the end.
    runs = torch.diff(F.pad(m.int(), (1, 1)), dim=-1)
    starts, ends = (runs == 1).nonzero(), (runs == -1).nonzero()
    lengths = ends[:, 1] - starts[:, 1]
    assert (lengths[ends[:, 1] < T] >= span).all()
    # Same generator state -> same mask.
    assert torch.equal(span_mask(torch.tensor([100]), p, span, torch.Generator().manual_seed(3)),
                       span_mask(torch.tensor([100]), p, span, torch.Generator().manual_seed(3)))


# --- the task module -------------------------------------------------------------------------------

def test_masking_in_the_input_is_noise_on_whole_stacked_frames_and_never_padding():
    enc = StackEncoder()
    model = BestRQ(enc, dim=32, cfg=SMALL)
    mel, lengths = random_batch([1000, 613, 2], T=1003)
    out = model(mel, lengths, generator=torch.Generator().manual_seed(0))
    x, mask = enc.last_input, out["mask"]
    valid = torch.arange(1003)[None, :] < lengths[:, None]
    mel_mask = mask.repeat_interleave(4, dim=1)[:, :1003]
    feats = normalize_features(mel, lengths)
    assert torch.equal(x[valid & ~mel_mask], feats[valid & ~mel_mask])  # unmasked: normalised features
    assert (x[~valid] == 0).all()  # padding: untouched zeros, no noise
    noise = x[valid & mel_mask]
    assert noise.mean().abs() < 0.01 and noise.std().item() == pytest.approx(0.1, rel=0.05)
    assert mask[2, 0] and mask[2].sum() == 1  # a 2-frame utterance still gets its masked frame
    assert out["masked_fraction"].item() == pytest.approx(0.5, abs=0.1)


def test_loss_only_sees_masked_valid_frames():
    torch.manual_seed(0)
    enc = StackEncoder()
    model = BestRQ(enc, dim=32, cfg=SMALL)
    mel, lengths = random_batch([400, 250, 37], T=402)
    ref = model(mel, lengths, generator=torch.Generator().manual_seed(5))
    mask = ref["mask"]  # (B, 101), padding never masked

    def perturbed(where):
        def hook(module, inputs, output):
            h, out_lengths = output
            return h + 100.0 * torch.randn_like(h) * where[..., None], out_lengths
        handle = enc.register_forward_hook(hook)
        try:
            return model(mel, lengths, generator=torch.Generator().manual_seed(5))
        finally:
            handle.remove()

    out = perturbed(~mask)  # unmasked valid frames and all padded frames
    assert torch.equal(out["mask"], mask)
    assert torch.equal(out["loss"], ref["loss"]) and torch.equal(out["accuracy"], ref["accuracy"])
    one = torch.zeros_like(mask)
    one[mask.nonzero()[0].unbind()] = True
    assert not torch.allclose(perturbed(one)["loss"], ref["loss"])  # a masked frame does count

    # The loss is the mean over codebooks of the cross-entropy against the unmasked features' codes.
    feats = normalize_features(mel, lengths)
    targets = model.quantizer.targets(stack_frames(feats, 4))
    assert torch.equal(ref["targets"], targets)
    h, _ = enc(enc.last_input, lengths)
    manual = torch.stack([F.cross_entropy(head(h[mask]), targets[mask][:, k])
                          for k, head in enumerate(model.heads)]).mean()
    assert torch.allclose(ref["loss"], manual, atol=1e-5)
    assert ref["loss"].item() == pytest.approx(math.log(256), rel=0.2)


def test_quantizer_is_outside_the_optimizer_and_gets_no_grad():
    model = BestRQ(StackEncoder(), dim=32, cfg=SMALL)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("quantizer") for n in names)
    assert {"quantizer.projection", "quantizer.codebooks"} <= set(model.state_dict())
    mel, lengths = random_batch([120, 80])
    model(mel, lengths)["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert model.quantizer.projection.grad is None and model.quantizer.codebooks.grad is None


def test_bad_inputs_raise():
    model = BestRQ(StackEncoder(), dim=32, cfg=SMALL)
    mel, lengths = random_batch([40, 20])
    with pytest.raises(ValueError, match="bins"):
        model(mel[..., :40], lengths)
    with pytest.raises(ValueError, match="lengths"):
        model(mel, torch.tensor([41, 20]))
    with pytest.raises(ValueError, match="lengths"):
        model(mel, torch.tensor([0, 0]))


# --- learning --------------------------------------------------------------------------------------

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "how much wood would a woodchuck chuck",
    "peter piper picked a peck of pickled peppers",
]


def speech_batch(tmp_path):
    """(wave (B, T) at 16 kHz, lengths): espeak-ng speech."""
    from media.audio import load_audio  # soundfile read + soxr resample 22050 -> 16000

    espeak = require_binary("espeak-ng")
    waves = []
    for i, text in enumerate(SENTENCES):
        path = tmp_path / f"{i}.wav"
        subprocess.run([espeak, "-w", str(path), text], check=True, capture_output=True)
        waves.append(torch.from_numpy(load_audio(path).samples))
    lengths = torch.tensor([len(w) for w in waves])
    return nn.utils.rnn.pad_sequence(waves, batch_first=True), lengths


def test_loss_falls_with_the_tiny_conformer(tmp_path):
    wave, lengths = speech_batch(tmp_path)
    mel, frame_lengths = LogMel()(wave, lengths)
    torch.manual_seed(0)
    cfg = conformer_config("tiny")
    # 16 codebooks as the paper, of 1,024 codes instead of 8,192: the paper's size costs ~0.6 s a step on
    # one CPU thread (the (frames, 8192) similarities and logits per codebook), 10x this whole test.
    model = BestRQ(ConformerEncoder(cfg), dim=cfg.dim, cfg=BestRQConfig(codebook_size=1024))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = model(mel, frame_lengths, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[0] == pytest.approx(math.log(1024), rel=0.1)
    assert out["target_perplexity"].item() > 20  # normalised speech spreads over many codes
    assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:5]), losses
