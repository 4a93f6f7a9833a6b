"""The speech encoder: 4-frame stacking of 80-d log-mel features, then a rotary Conformer.

Llama 3 paper, sec. 8.1: 80-dim mel-spectrogram, a stacking layer with stride 4 plus a linear
projection (40 ms frames), then a Conformer of about 1B parameters: 24 layers, latent dim 1536,
two Macaron-style FFNs of dim 4096, a convolution module with kernel 7, rotary attention with 24 heads.

Block (Gulati et al. 2020 ordering, shared by torchaudio, ESPnet, NeMo and lucidrains):

    x = x + 0.5 * FFN1(LN x)
    x = x + MHSA(LN x)                  # RoPE on q/k, key padding mask
    x = x + Conv(LN x)                  # PW -> GLU -> DW conv -> LN -> SiLU -> PW
    x = x + 0.5 * FFN2(LN x)
    x = LN(x)

Padding is the main Conformer bug class (pytorch/audio#4205, espnet#6660, wenet#223; NeMo SALM runs
its encoder at batch size 1 for that reason), so here padded frames never leak into attention,
convolution or normalisation statistics, and a sequence's output does not depend on its batch-mates:

* stacking zeroes mel frames past each sample's length, so a sample's last partial stack is padded with
  zeros exactly as if it were alone, and lengths are ``ceil(len / 4)`` per sample (NeMo's
  ``StackingSubsampling`` uses the batch-level pad size, giving floor for shorter samples);
* the projection's bias makes padded stacks non-zero, so its output is zeroed past each length;
* attention masks padded keys; padded query rows still see the valid keys, so they stay finite;
* padded frames are zeroed right before the depthwise convolution, the only op mixing neighbours;
* every norm is a per-frame LayerNorm: no statistic is taken over time or batch (no BatchNorm);
* the residual stream is zeroed at padded frames after every block, so the output there is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.presets import preset_config
from common.rope import apply_rope, rope_frequencies, rope_table


@dataclass(frozen=True, kw_only=True)
class ConformerConfig:
    n_mels: int = 80
    stack: int = 4  # mel frames per encoder frame: 10 ms -> 40 ms (paper, sec. 8.1)
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    conv_kernel: int = 7
    dropout: float = 0.0
    rope_theta: float = 10000.0  # HF Wav2Vec2Conformer's rotary default

    def __post_init__(self) -> None:
        for name in ("n_mels", "stack", "dim", "n_layers", "n_heads", "ffn_dim", "conv_kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ConformerConfig.{name} must be an int >= 1, got {value!r}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"ConformerConfig.conv_kernel must be odd, got {self.conv_kernel}")
        if self.dim % self.n_heads:
            raise ValueError(f"ConformerConfig.n_heads {self.n_heads} must divide dim {self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"ConformerConfig: head dim (dim / n_heads) {self.head_dim} must be even")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ConformerConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ConformerConfig.rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


CONFORMER_PRESETS: dict[str, ConformerConfig] = {
    "tiny": ConformerConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128),
    # Paper, sec. 8.1: "about 1B parameters", 24 layers, dim 1536, FFN 4096, kernel 7, 24 heads.
    "1B": ConformerConfig(dim=1536, n_layers=24, n_heads=24, ffn_dim=4096),
}


def conformer_config(name: str, **overrides) -> ConformerConfig:
    """A preset with overrides; an unknown preset raises ``ValueError``, an unknown field ``TypeError``."""
    return preset_config(CONFORMER_PRESETS, name, "Conformer", **overrides)


def length_mask(lengths: Tensor, T: int) -> Tensor:
    """(B,) lengths -> (B, T) bool, True at valid frames."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


class FrameStacker(nn.Module):
    """(B, T, n_mels) mel + (B,) lengths -> (B, ceil(T / stack), dim) + (B,) ceil(len / stack) per sample."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.stack = cfg.stack
        self.proj = nn.Linear(cfg.stack * cfg.n_mels, cfg.dim)

    def forward(self, mel: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        B, T, n_mels = mel.shape
        # Zero past each length first: a sample's last partial stack is then padded with zeros, as alone.
        mel = mel.masked_fill(~length_mask(lengths, T)[..., None], 0.0)
        pad = -T % self.stack
        mel = F.pad(mel, (0, 0, 0, pad))
        x = self.proj(mel.reshape(B, (T + pad) // self.stack, self.stack * n_mels).to(self.proj.weight.dtype))
        out_lengths = torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")
        # The bias makes padded stacks non-zero.
        return x.masked_fill(~length_mask(out_lengths, x.shape[1])[..., None], 0.0), out_lengths


class ConformerFeedForward(nn.Sequential):
    """LN -> Linear(dim, ffn) -> SiLU -> dropout -> Linear(ffn, dim); the block scales it by 0.5 (Macaron)."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.ffn_dim), nn.SiLU(),
                         nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_dim, cfg.dim))


class ConformerAttention(nn.Module):
    """LN -> multi-head self-attention with RoPE on q/k (interleaved pairs, as the LM: `common.rope`)."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.norm = nn.LayerNorm(cfg.dim)
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, rope: Tensor, key_mask: Tensor) -> Tensor:
        """x (B, T, D); rope (T, head_dim/2) complex; key_mask (B, T) bool, True for keys to attend to.

        Every row of ``key_mask`` must hold a True, else SDPA returns NaN for that sample.
        """
        B, T, _ = x.shape
        h = self.norm(x)
        q = apply_rope(self.wq(h).view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(self.wk(h).view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
        v = self.wv(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class ConformerConvModule(nn.Module):
    """LN -> PW Linear(D, 2D) -> GLU -> DW Conv1d(k, "same") -> LN -> SiLU -> PW Linear(D, D)."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.pw1 = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.dw = nn.Conv1d(cfg.dim, cfg.dim, cfg.conv_kernel, padding=cfg.conv_kernel // 2, groups=cfg.dim)
        # LayerNorm over channels, not the usual BatchNorm: BatchNorm statistics span the batch and time,
        # padded frames included, so a sample's output would depend on its batch-mates and padding.
        self.conv_norm = nn.LayerNorm(cfg.dim)
        self.pw2 = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, T, D); valid (B, T) bool -> (B, T, D)."""
        h = F.glu(self.pw1(self.norm(x)), dim=-1)
        # The depthwise conv reads k // 2 neighbours: padded frames (non-zero after LN and the biases)
        # must be zero here, as the conv's own zero padding is, or they leak into the last valid frames.
        h = h.masked_fill(~valid[..., None], 0.0)
        h = self.dw(h.transpose(1, 2)).transpose(1, 2)
        return self.pw2(F.silu(self.conv_norm(h)))


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.ffn1 = ConformerFeedForward(cfg)
        self.attention = ConformerAttention(cfg)
        self.conv = ConformerConvModule(cfg)
        self.ffn2 = ConformerFeedForward(cfg)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope: Tensor, valid: Tensor, key_mask: Tensor) -> Tensor:
        """x (B, T, D); valid (B, T) real frames; key_mask (B, T) keys to attend -> (B, T, D), 0 at pads."""
        x = x + 0.5 * self.drop(self.ffn1(x))
        x = x + self.drop(self.attention(x, rope, key_mask))
        x = x + self.drop(self.conv(x, valid))
        x = x + 0.5 * self.drop(self.ffn2(x))
        # masked_fill, not a multiply: a non-finite padded value would survive "* 0".
        return self.norm(x).masked_fill(~valid[..., None], 0.0)


class ConformerEncoder(nn.Module):
    """mel (B, T, n_mels) + lengths (B,) -> (B, ceil(T / stack), dim) + out lengths (B,); 0 at padding."""

    def __init__(self, cfg: ConformerConfig):
        super().__init__()
        self.cfg = cfg
        self.stacker = FrameStacker(cfg)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, mel: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        B, T, n_mels = mel.shape
        if n_mels != self.cfg.n_mels:
            raise ValueError(f"mel has {n_mels} bins, ConformerConfig.n_mels is {self.cfg.n_mels}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths shape {tuple(lengths.shape)} should be ({B},)")
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"lengths must lie in [0, {T}], got {lengths.tolist()}")
        x, out_lengths = self.stacker(mel, lengths)
        valid = length_mask(out_lengths, x.shape[1])
        # An empty sample would have no key to attend to (NaN from SDPA): let it attend to its padding;
        # its output is zeroed anyway and no other sample sees it.
        key_mask = valid | ~valid.any(-1, keepdim=True)
        # Rebuilt per call in fp32 (cast at use in apply_rope), not a buffer: no cache keyed by length
        # only to go stale on a dtype/device change (HF's rotary pitfall), nothing for .to(bf16) to round.
        inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, None)
        rope = rope_table(inv_freq, torch.arange(x.shape[1], device=mel.device))
        for layer in self.layers:
            x = layer(x, rope, valid, key_mask)
        return x, out_lengths

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_count(name: str) -> int:
    """Parameters of a preset, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return ConformerEncoder(conformer_config(name)).num_params()
