"""Building blocks that Llama 3 adds around the open_clip ViT: tile position embeddings, the
per-image attention mask, and the gated "global" self-attention blocks (Llama 3 paper, sec. 7.2).

Parameter names follow Meta's released vision encoder (``models/llama3/multimodal/model.py``), and
the blocks reuse open_clip's ``ResidualAttentionBlock`` layout (``ln_1``, ``attn.in_proj_weight``,
``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``), so checkpoints map one to one (Meta's
``wq/wk/wv`` are concatenated into ``in_proj_weight``). open_clip's attention has biases, Meta's and HF's
have none: ``attn_bias=False`` builds the blocks without them (``in_proj_bias`` None, ``out_proj`` bias-free).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, ResidualAttentionBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def num_pad_tokens(n_tokens: int, multiple: int) -> int:
    """Tokens appended to each tile so its length is a multiple of ``multiple``.

    HF's formula ``(m - n % m) % m``: 7 for 1601 (560 px) and 1025 (448 px), as released. Meta's
    ``expand_num_tokens_to_mult8`` would add a full 8 when ``n % 8 == 0``; no released size hits that.
    """
    return (multiple - n_tokens % multiple) % multiple


def tile_grid_index(layout: Tensor, n_tiles: int) -> tuple[Tensor, Tensor, Tensor]:
    """Grid cell of every tile slot: the ``rows x cols`` grid fills the first ``rows*cols`` slots row-major.

    layout: (B, 2) long (rows, cols). Returns row, col, valid, each (B, n_tiles); row/col are 0 for
    unused slots. Vectorised so the batch needs no Python loop (Meta loops over images).
    """
    rows, cols = layout[:, :1], layout[:, 1:].clamp(min=1)
    slot = torch.arange(n_tiles, device=layout.device)
    valid = slot < rows * cols
    row = torch.where(valid, slot // cols, 0)
    col = torch.where(valid, slot % cols, 0)
    return row, col, valid


def encoder_attention_mask(tile_mask: Tensor, n_tokens: int, n_pad: int, dtype: torch.dtype) -> Tensor:
    """The released encoder mask, (B, 1, T*L, T*L) additive, L = n_tokens + n_pad.

    Padding positions (all tokens of padded tiles and the per-tile pad tokens) form a 0/1 vector m and
    the mask is ``(m m^T) * finfo.min``: only pad-query x pad-key pairs are masked, so real tokens still
    attend to padding. That is a quirk of the release (Meta ``build_encoder_attention_mask``, HF
    ``_prepare_aspect_ratio_attention_mask``) which we keep for bit-faithful outputs. Unlike HF we do
    not mask everything when ``n_pad == 0`` (HF's ``[-0:]`` slice).

    tile_mask: (B, T) bool, True for real tiles.
    """
    B, T = tile_mask.shape
    pad = (~tile_mask)[:, :, None].expand(B, T, n_tokens + n_pad).clone()
    pad[:, :, n_tokens:] = True
    pad = pad.reshape(B, -1).to(dtype)
    return (pad[:, :, None] * pad[:, None, :] * torch.finfo(dtype).min)[:, None]


class MaskedSelfAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters and names) taking a per-image (B, 1, L, L) mask.

    ``nn.MultiheadAttention`` only accepts (L, L) or (B*heads, L, L) masks; the latter would hold
    ``heads`` copies of the per-image mask (2.6 GB fp32 for one 4-tile 560 px image with 16 heads).
    Here the mask broadcasts over heads inside ``F.scaled_dot_product_attention``. Self-attention
    only, batch-first, no attention weights: that is how open_clip's blocks call it.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        plain = key is query and value is query and key_padding_mask is None
        if not plain or need_weights or is_causal:
            raise NotImplementedError("MaskedSelfAttention supports plain self-attention only")
        if not self.batch_first:
            raise NotImplementedError("MaskedSelfAttention expects batch_first=True")
        B, L, D = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D)), None


def use_masked_attention(block: ResidualAttentionBlock, bias: bool = True) -> None:
    """Swap an open_clip block's attention for ``MaskedSelfAttention``, sharing its parameters.

    The block keeps its own forward (so module hooks, activation checkpointing and ZeRO-3/FSDP
    wrapping see ordinary module calls); parameter names are unchanged. ``bias=False`` drops the
    attention biases (``in_proj_bias``, ``out_proj.bias``) as parameters: the Mllama layout.
    """
    old = block.attn
    if not old._qkv_same_embed_dim or not old.batch_first:
        raise ValueError("expected open_clip's batch-first nn.MultiheadAttention with a packed in_proj")
    # A parameter-less shell (meta), then the block's own parameters moved in.
    new = MaskedSelfAttention(old.embed_dim, old.num_heads, dropout=old.dropout, batch_first=True,
                              device="meta")
    new.in_proj_weight, new.in_proj_bias, new.out_proj = old.in_proj_weight, old.in_proj_bias, old.out_proj
    if not bias:
        new.in_proj_bias = None  # F.linear and nn.Linear take a None bias
        new.out_proj.bias = None
    block.attn = new


class GatedResidualAttentionBlock(ResidualAttentionBlock):
    """open_clip block with Llama 3's tanh gates on both residual branches (gates init 0, i.e. identity).

    ``x + tanh(gate_attn) * attn(ln_1 x)``, then ``x + tanh(gate_ffn) * mlp(ln_2 x)``
    (Meta ``ImageTransformerBlock(gated=True)``; HF initialises the gates to pi/4 instead).
    """

    def __init__(self, d_model: int, n_head: int, mlp_ratio: float = 4.0, attn_bias: bool = True):
        # Exact GELU and LayerNorm(eps 1e-5) as released.
        super().__init__(d_model, n_head, mlp_ratio, act_layer=nn.GELU, norm_layer=LayerNorm)
        use_masked_attention(self, attn_bias)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        x = x + self.gate_attn.tanh().to(x.dtype) * self.attention(self.ln_1(x), attn_mask=attn_mask)
        return x + self.gate_ffn.tanh().to(x.dtype) * self.mlp(self.ln_2(x))


class GatedTransformer(nn.Module):
    """The ``global_transformer``: a stack of gated blocks run over all tiles of an image at once."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, attn_bias: bool = True):
        super().__init__()
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [GatedResidualAttentionBlock(width, heads, mlp_ratio, attn_bias) for _ in range(layers)]
        )

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D); attn_mask: (B, 1, L, L) additive."""
        for blk in self.resblocks:
            x = run_block(blk, x, attn_mask, self.grad_checkpointing)
        return x


def run_block(blk: nn.Module, x: Tensor, attn_mask: Tensor | None, grad_checkpointing: bool) -> Tensor:
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(blk, x, attn_mask=attn_mask, use_reentrant=False)
    return blk(x, attn_mask=attn_mask)


class TilePositionEmbedding(nn.Module):
    """One learned vector per tile grid cell, added to every token of the tile (Meta naming).

    ``embedding`` is (max_tiles, max_tiles, 1, width), randn / sqrt(width); for layout (rows, cols)
    the slice ``[:rows, :cols]`` fills the first rows*cols tile slots row-major, padded slots get
    nothing, and the sum is scaled by tanh(gate) with gate init 0 (so the module starts as identity).
    """

    def __init__(self, max_tiles: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(max_tiles, max_tiles, 1, width) / math.sqrt(width))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, layout: Tensor) -> Tensor:
        """x: (B, T, L, D) with T <= max_tiles; layout: (B, 2) rows/cols. Returns (B, T, L, D)."""
        row, col, valid = tile_grid_index(layout, x.shape[1])
        embed = self.embedding[row, col] * valid[..., None, None]  # (B, T, 1, D)
        return x + (embed * self.gate.tanh()).to(x.dtype)
