"""Rotary position embeddings (RoPE), shared by the Llama LM (`adapters.llama`) and the Conformer speech
encoder (`speech.conformer`): inverse frequencies with the Llama 3.1 long-context scaling, complex rotation
tables, and their application to interleaved (real, imag) pairs as in Meta's code."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling for long context (HF ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies (head_dim/2,), with the Llama 3.1 scaling rule applied when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones kept; in between, blended.
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled)


def rope_table(inv_freq: Tensor, positions: Tensor) -> Tensor:
    """Unit complex rotations e^{i * pos * freq} for integer positions (T,) or (B, T) -> (..., T, head_dim/2)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by ``rope`` (T, hd/2) or (B, T, hd/2).

    As Meta's ``apply_rotary_emb``: pairs viewed as complex numbers and multiplied, in fp32, cast back
    (three kernels instead of the eight of the real-valued cos/sin form).
    """
    rope = rope[None, :, None, :] if rope.dim() == 2 else rope[:, :, None, :]
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope).flatten(-2).type_as(x)
