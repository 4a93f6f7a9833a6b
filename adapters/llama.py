"""The frozen Llama 3 / 3.1 decoder, in plain single-device PyTorch.

Parameter names follow Meta's checkpoints (``tok_embeddings``, ``layers.{i}.attention.wq``,
``feed_forward.w1``, ``attention_norm``, ``norm``, ``output``) so loading is strict and renaming-free.
RoPE (`common.rope`) is applied to interleaved (real, imag) pairs as in Meta's code; the Hugging Face
layout is converted at load time (``adapters.checkpoint``).

The multimodal model (``adapters.multimodal``) drives the same blocks layer by layer, so every piece
the layer loop needs (embedding, RoPE tables, masks, blocks, head) is public here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.presets import preset_config
from common.rope import RopeScaling, apply_rope, rope_frequencies, rope_table


@dataclass(frozen=True)
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even for RoPE")


# Sizes from the Llama 3 paper, table 3; all use 8 KV heads, RoPE theta 500,000 and 3.1 scaling.
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab_size=512, max_seq_len=512),
    "8B": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=131072),
    "70B": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, max_seq_len=131072),
    "405B": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, max_seq_len=131072),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """A preset with overrides; an unknown preset raises `UnknownPresetError` (a ``KeyError``), an unknown field
    ``TypeError`` (strict, unlike Meta's ModelArgs)."""
    return preset_config(LLAMA_PRESETS, name, "Llama", **overrides)


# ----------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class KVCache(nn.Module):
    """Pre-allocated self-attention cache for one layer: (B, kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, kv, T, hd) at [start, start+T) and return the cache up to start+T."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KVCache overflow: position {end} > cache length {self.k.shape[2]}")
        self.k[: k.shape[0], :, start:end] = k
        self.v[: v.shape[0], :, start:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]


class Attention(nn.Module):
    """Causal GQA self-attention with RoPE (Meta names wq/wk/wv/wo, no biases)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        """x (B, T, D); mask None means causal over the T new tokens (nothing to mask for one new token
        over a cache); else a bool (B|1, 1, T, S)."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        # SDPA broadcasts the KV heads itself (enable_gqa): the cache stays at n_kv_heads.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor | None, cache=None, start_pos=0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def build_attention_mask(
    T: int, start_pos: int = 0, doc_ids: Tensor | None = None, device=None, key_valid: Tensor | None = None
) -> Tensor | None:
    """Boolean attention mask (B|1, 1, T, start_pos+T), True = may attend; None = plain causal prefill,
    or one new token over a cache (it sees every cached position: nothing to mask).

    ``doc_ids`` (B, T) marks packed documents: a token sees only earlier tokens of its own document
    (the Llama 3 document mask). With a cache (start_pos > 0) the new tokens see the whole prefix.
    ``key_valid`` (B, start_pos+T) bool marks real tokens of padded generation rows: padding keys are masked
    for every query, and a padding query sees itself only (a row with no key would turn softmax into NaN).
    """
    if doc_ids is None and key_valid is None and (start_pos == 0 or T == 1):
        return None  # SDPA's is_causal path (prefill) or no mask (one decoding step)
    if doc_ids is not None and (start_pos or key_valid is not None):
        raise ValueError("document masks are for packed training sequences, not cached decoding")
    q_pos = torch.arange(start_pos, start_pos + T, device=device)
    k_pos = torch.arange(start_pos + T, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if key_valid is not None:
        return (mask & key_valid[:, None, None, :]) | (k_pos[None, :] == q_pos[:, None])
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        mask = mask & same_doc[:, None]
    return mask


def document_positions(doc_ids: Tensor) -> Tensor:
    """(B, T) RoPE positions that restart at 0 where ``doc_ids`` changes (packed documents)."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


class Llama(nn.Module):
    """Llama 3 decoder. ``forward(tokens) -> logits``; pieces are public for the multimodal layer loop."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "inv_freq", rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )

    def rope(self, T: int, start_pos: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotations for positions [start_pos, start_pos+T) or explicit ``positions`` (B, T)."""
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=self.inv_freq.device)
        return rope_table(self.inv_freq, positions)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        return [
            KVCache(batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim, dtype, device) for _ in self.layers
        ]

    def forward(
        self,
        tokens: Tensor,
        start_pos: int = 0,
        cache: list[KVCache] | None = None,
        doc_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in fp32.

        ``doc_ids`` (B, T) enables the document mask for packed sequences; ``positions`` (B, T)
        overrides RoPE positions (e.g. restarting at 0 for every packed document).
        """
        T = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        rope = self.rope(T, start_pos, positions)
        mask = build_attention_mask(T, start_pos, doc_ids, tokens.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, cache[i] if cache is not None else None, start_pos)
        return self.output(self.norm(h)).float()

    def freeze(self) -> "Llama":
        """The LM is frozen throughout the multimodal recipe (sec. 7): eval mode, no gradients."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Llama":
        # A frozen LM stays in eval mode even when a parent module calls .train().
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)


def build_llama(cfg: LlamaConfig | str, device: torch.device | str | None = None) -> Llama:
    """Build a randomly initialised Llama (N(0, 0.02) linear/embedding weights, unit norms)."""
    if isinstance(cfg, str):
        cfg = llama_config(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = Llama(cfg)
    if model.tok_embeddings.weight.device.type != "meta":
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
    return model

