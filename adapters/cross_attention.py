"""Gated GQA cross-attention blocks: the image adapter layers inserted into the frozen Llama (sec. 7.3).

Names follow Meta's Llama 3.2 Vision checkpoints (``attention.wq/wk/wv/wo``, ``attention.q_norm``,
``attention.k_norm``, ``attention_norm``, ``feed_forward.w1/w2/w3``, ``ffn_norm``, ``gate_attn``,
``gate_ffwd``) so released weights load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.llama import FeedForward, LlamaConfig, RMSNorm


def fusion_schedule(n_layers: int, n_xattn: int) -> list[int]:
    """LM layer indices *before* which a cross-attention block runs, as released (Meta's rule).

    Counted from the top layer down every ``ceil(n_layers / n_xattn)`` layers: 32 layers / 8 blocks ->
    [3, 7, ..., 31]; 80 / 20 -> [3, 7, ..., 79]. Block k therefore sits after the 4k-1 (1-based: 4k-1
    earlier) self-attention layers; the paper describes this as "after every 4th self-attention layer".
    """
    if not 0 < n_xattn <= n_layers:
        raise ValueError(f"n_xattn must be in [1, n_layers={n_layers}], got {n_xattn}")
    k = math.ceil(n_layers / n_xattn)
    return list(range(n_layers))[::-1][::k][:n_xattn][::-1]


def xattn_schedule(n_layers: int, every: int) -> list[int]:
    """Our placement: one block per ``every`` LM layers, ``n_layers // every`` blocks, counted from the top.

    Equals the released ``fusion_schedule`` for 32 and 80 layers ([3, 7, ..., 31], [3, ..., 79]) and
    extends it to depths that ``every`` does not divide: 126 layers (405B) -> 31 blocks [5, 9, ..., 125].
    """
    if not 0 < every <= n_layers:
        raise ValueError(f"xattn_every must be in [1, n_layers={n_layers}], got {every}")
    return list(range(n_layers))[::-1][::every][: n_layers // every][::-1]


class CrossAttention(nn.Module):
    """Text queries attend to projected vision tokens; GQA like the LM, q/k RMSNorm, no RoPE."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def vision_kv(self, vision: Tensor) -> tuple[Tensor, Tensor]:
        """Projected vision tokens (B, N, D) -> k, v (B, kv_heads, N, head_dim), computed once per image.

        Kept at the KV-head count (not expanded to all heads): 4x less cache memory at 8/32 heads.
        ``vision`` may be wider than the layer's dtype (the model keeps it FP32): the cast happens here,
        per consumer, so autograd sums the gradients of all cross-attention layers in that wider dtype.
        """
        vision = vision.to(self.wk.weight.dtype)
        B, N, _ = vision.shape
        k = self.k_norm(self.wk(vision).view(B, N, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(vision).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor, row_mask: Tensor) -> Tensor:
        """x (B, T, D); mask bool (B, 1, T, N) (rows with no visible token are all True); row_mask (B, T, 1)."""
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        # Meta zeroes rows that see no image *before* wo, so they get exactly 0 (HF leaks here, #39379).
        out = out.transpose(1, 2).reshape(B, T, -1) * row_mask
        return self.wo(out)


class CrossAttentionBlock(nn.Module):
    """x + tanh(gate_attn) * xattn(norm x); then + tanh(gate_ffwd) * SwiGLU(norm h) * row_mask.

    Both gates start at zero, so a new block is the identity and the model equals the frozen LM.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention = CrossAttention(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor, row_mask: Tensor) -> Tensor:
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), kv, mask, row_mask)
        return h + self.gate_ffwd.tanh() * (self.feed_forward(self.ffn_norm(h)) * row_mask)


# ----------------------------------------------------------------------------------------------
# Which text token sees which image


def image_intervals(tokens: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """Per image token, the [start, end) text span that attends to it (Meta's ``create_vision_mask``).

    Image k at position p_k is seen by [p_k, p_{k+1}); the last by [p_last, T). Consecutive image
    tokens form a run whose images are all seen by the text span after the run. Text before the first
    image sees no image.
    """
    locs = [i for i, t in enumerate(tokens) if t == image_token_id]
    if not locs:
        return []
    spans = [[a, b] for a, b in zip(locs[:-1], locs[1:])] + [[locs[-1], len(tokens)]]
    last_end = spans[-1][1]
    for span in spans[::-1]:
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [(a, b) for a, b in spans]


def text_image_mask(tokens: Tensor, image_token_id: int, image_mask: Tensor, media: str = "image") -> Tensor:
    """Bool (B, T, n_images): text position t may see image slot i.

    ``image_mask`` (B, n_images) marks real image slots; the k-th image token of a row is matched to
    the k-th real slot. A count mismatch is an error naming the row. Videos use the same rule with
    their own token (``media="video"`` names them in the error).
    """
    B, T = tokens.shape
    n_img = image_mask.shape[1]
    out = torch.zeros(B, T, n_img, dtype=torch.bool, device=tokens.device)
    rows = tokens.tolist()
    slots = image_mask.tolist()
    for b in range(B):
        spans = image_intervals(rows[b], image_token_id)
        real = [i for i, ok in enumerate(slots[b]) if ok]
        if len(spans) != len(real):
            raise ValueError(
                f"batch row {b}: {len(spans)} <|{media}|> tokens but {len(real)} {media}s; they must match"
            )
        for (start, end), slot in zip(spans, real):
            out[b, start:end, slot] = True
    return out


def expand_vision_mask(text_image: Tensor, tile_mask: Tensor, tokens_per_tile: int) -> tuple[Tensor, Tensor]:
    """Dense attention mask over vision tokens and the per-row "sees any image" mask.

    text_image (B, T, I) bool, tile_mask (B, I, tiles) bool -> mask (B, 1, T, I*tiles*tokens_per_tile)
    bool and row_mask (B, T, 1) float. Padded tiles are never visible. Rows that see nothing attend to
    everything (finite softmax) and are then zeroed by ``row_mask``, as in the released code.
    """
    per_tile = text_image[..., None] & tile_mask[:, None]  # (B, T, I, tiles)
    row_mask = per_tile.flatten(2).any(-1, keepdim=True)  # (B, T, 1)
    per_tile = per_tile | ~row_mask[..., None]
    mask = per_tile.repeat_interleave(tokens_per_tile, dim=-1).flatten(2)[:, None]
    return mask, row_mask.to(torch.float32)


def within_documents(text_image: Tensor, doc_ids: Tensor) -> Tensor:
    """``text_image`` (B, T, I) restricted to packed documents: a media slot is seen only by its own
    document's text (the one holding its placeholder, where its span starts). Without this, a text-only
    document packed after a captioned image would see that image through the span rule."""
    first = text_image.to(torch.uint8).argmax(1)  # (B, I): where each slot's span starts
    slot_doc = doc_ids.gather(1, first)
    return text_image & (doc_ids[:, :, None] == slot_doc[:, None, :])
