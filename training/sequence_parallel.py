"""Sequence parallelism for the image encoder, applied from outside the single-device code.

Llama 3 paper, sec. 7.3.2: image tokens dominate the sequence (2,308 per image against 192 text tokens),
so the image encoder's token sequence is split across the tensor-parallel ranks. `apply_encoder_sequence_parallel`
makes every rank of a group run the encoder's transformer blocks (the ViT blocks and the gated global blocks)
on its contiguous share of each tile: rank r of w holds tokens ``[r l, (r + 1) l)`` of every tile, l = L / w,
L = tokens per tile with padding (``pad_to_multiple`` makes L a multiple of 8, so w = 2, 4, 8 split it).

Norms and MLPs are token-local. Attention gathers the keys and values of all tokens (one all-gather of the
local K/V per block; its backward is a reduce-scatter: each rank's queries saw every key) and keeps the rows
of the mask that belong to its queries. The encoder's own forward is unchanged: module hooks put a scatter
``S`` on the input of the first block and of every tapped block, and a gather ``G`` on the output of the
block before each tap and of the last block (ViT and global stacks alike), so taps, ``ln_post``, the tile
embeddings and the output see whole sequences, computed alike on every rank.

``S`` (keep the local share; backward all-gathers the gradient) and ``G`` (all-gather; backward keeps the local
share of the gradient) are conjugate, like Megatron's f and g: the whole-sequence tensors outside the split
blocks carry complete, identical gradients on every rank, so the parameters used there (patch embedding,
position tables, ``ln_pre``, ``ln_post``) get full gradients, and each block parameter, which saw only the
local tokens, gets its gradient summed over the group by a hook. Afterwards every encoder parameter has the
unsplit encoder's gradient on every rank, which is what DeepSpeed's ``mpu`` expects of a replicated parameter.

All ranks of the group must feed the encoder the same images (true of tensor-parallel ranks), and the
gradient arriving at its output must be the complete one on each (the cross-attention K/V inputs carry
Megatron's f under `training.tensor_parallel`, which makes it so).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.tensor_parallel import _grad_allreduce_hook
from vision.encoder import VisionEncoder, VisionEncoderConfig
from vision.encoder_layers import MaskedSelfAttention, num_pad_tokens


class SequenceParallelError(ValueError):
    """The encoder or the group cannot be split as asked (names the offending config field)."""


def tile_tokens(cfg: VisionEncoderConfig) -> int:
    """L: tokens per tile in the encoder's blocks, CLS and padding included (1032 at 448 px, 1608 at 560)."""
    return cfg.n_tokens + num_pad_tokens(cfg.n_tokens, cfg.pad_to_multiple)


def validate_sp_size(cfg: VisionEncoderConfig, world: int) -> None:
    """Raise `SequenceParallelError` unless ``world`` ranks split every tile's L tokens evenly.

    Padding more than ``pad_to_multiple`` asks would change the outputs (real tokens attend to pad tokens, as
    released), so an uneven split is refused with the ``pad_to_multiple`` that would work.
    """
    if world < 1:
        raise SequenceParallelError(f"sequence-parallel size must be >= 1, got {world}")
    L = tile_tokens(cfg)
    if L % world:
        m = math.lcm(cfg.pad_to_multiple, world)
        padded = tile_tokens(replace(cfg, pad_to_multiple=m))
        raise SequenceParallelError(
            f"VisionEncoderConfig.pad_to_multiple = {cfg.pad_to_multiple} gives tiles of {L} tokens "
            f"({cfg.n_tokens} + padding), not divisible by the sequence-parallel size {world}: use a group size "
            f"dividing {L}, or pad_to_multiple = {m} (tiles of {padded} tokens; more padding changes the outputs "
            f"of released weights)")


# ----------------------------------------------------------------------------------------------
# The per-tile split and its collectives


class TileShards:
    """Rank ``rank`` of ``world`` holds tokens ``[rank l, (rank + 1) l)`` of each tile of L tokens, l = L / world.

    Sequences are ``(B, T * L, C)`` whole and ``(B, T * l, C)`` local, tile-major in both, so a gather puts
    the tokens back in the encoder's order and the mask's columns need no change.
    """

    def __init__(self, group, tokens_per_tile: int, recompute_kv: bool = False):
        self.group, self.recompute_kv = group, recompute_kv
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.L, self.l = tokens_per_tile, tokens_per_tile // self.world
        self.caching = False  # the local mask rows are kept while the encoder's forward runs
        self._rows: tuple[Tensor, Tensor] | None = None

    def _tiles(self, length: int) -> int:
        if length % self.L:
            raise SequenceParallelError(f"a sequence of {length} tokens is not whole tiles of {self.L} "
                                        f"(VisionEncoderConfig n_tokens + padding): not an encoder sequence")
        return length // self.L

    def local(self, x: Tensor) -> Tensor:
        """(B, T * L, C) -> this rank's (B, T * l, C), in fresh memory (the whole tensor is not kept alive)."""
        B, TL, C = x.shape
        part = x.reshape(B, self._tiles(TL), self.world, self.l, C)[:, :, self.rank]
        return part.clone(memory_format=torch.contiguous_format).view(B, -1, C)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's (B, T * l, C) -> (B, T * L, C) in the encoder's token order."""
        B, Tl, C = x.shape
        out = x.new_empty(self.world * B, Tl, C)
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        return out.view(self.world, B, Tl // self.l, self.l, C).permute(1, 2, 0, 3, 4).reshape(B, -1, C)

    def reduce_scatter(self, x: Tensor) -> Tensor:
        """(B, T * L, C) on every rank -> the sum over ranks of this rank's (B, T * l, C)."""
        B, TL, C = x.shape
        T = self._tiles(TL)
        parts = x.reshape(B, T, self.world, self.l, C).permute(2, 0, 1, 3, 4).reshape(self.world * B, T * self.l, C)
        out = x.new_empty(B, T * self.l, C)
        dist.reduce_scatter_tensor(out, parts, group=self.group)
        return out

    def scatter(self, x: Tensor) -> Tensor:
        """S: `local` forward; `gather` of the gradient backward (the whole input is used alike on every rank)."""
        return _Conjugate.apply(x, self.local, self.gather)

    def gather_output(self, x: Tensor) -> Tensor:
        """G: `gather` forward; `local` share of the gradient backward (the whole output is used alike on every
        rank, so its gradient is whole and identical on each)."""
        return _Conjugate.apply(x, self.gather, self.local)

    def gather_kv(self, x: Tensor) -> Tensor:
        """`gather` forward; `reduce_scatter` backward: each rank's gradient of the whole K/V comes from its own
        queries only, so the local K/V's gradient is the sum over ranks."""
        return _Conjugate.apply(x, self.gather, self.reduce_scatter)

    def local_rows(self, mask: Tensor | None) -> Tensor | None:
        """(..., T * L, T * L) additive mask -> the rows of this rank's queries (..., T * l, T * L); kept for
        the other blocks of the same forward (the encoder builds one mask per call)."""
        if mask is None:
            return None
        if self._rows is not None and self._rows[0] is mask:
            return self._rows[1]
        TL = mask.shape[-1]
        rows = self.local(mask.reshape(-1, TL, TL)).view(*mask.shape[:-2], -1, TL)
        if self.caching:
            self._rows = (mask, rows)
        return rows

    def reset(self, caching: bool) -> None:
        self.caching, self._rows = caching, None


class _Conjugate(torch.autograd.Function):
    """``forward(x)`` forward, ``backward(grad)`` backward: the pairs of `TileShards.scatter` and friends."""

    @staticmethod
    def forward(ctx, x: Tensor, forward, backward) -> Tensor:
        ctx.backward_op = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.backward_op(grad.contiguous()), None, None


# ----------------------------------------------------------------------------------------------
# Attention and block hooks


class SequenceParallelAttention(MaskedSelfAttention):
    """`MaskedSelfAttention` over the local queries and the gathered keys and values (same parameters).

    Installed by swapping the class of an existing module (as FSDP2's ``fully_shard`` does), so parameters,
    names and hooks stay; ``shards`` is set alongside.
    """

    shards: TileShards

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                **options) -> tuple[Tensor, None]:
        """query = key = value: (B, T * l, D) local; attn_mask: (B, 1, T * L, T * L) whole. -> (B, T * l, D).
        ``options``: the other ``nn.MultiheadAttention`` arguments, at their defaults (``need_weights`` False)."""
        unsupported = [k for k in ("key_padding_mask", "need_weights", "is_causal") if options.get(k)]
        if key is not query or value is not query or unsupported:
            raise NotImplementedError(f"SequenceParallelAttention supports plain self-attention only, not "
                                      f"{unsupported or 'distinct key / value'}")
        B, n, D = query.shape
        q, kv = nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias).split([D, 2 * D], dim=-1)
        q = q.reshape(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        mask = self.shards.local_rows(attn_mask)
        if self.shards.recompute_kv and torch.is_grad_enabled():
            # Keep the local K/V only; backward gathers them again and recomputes this attention.
            out = checkpoint(self._attend, q, kv, mask, use_reentrant=False)
        else:
            out = self._attend(q, kv, mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, n, D)), None

    def _attend(self, q: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        """q: (B, heads, T * l, hd); kv: local (B, T * l, 2D). -> (B, heads, T * l, hd)."""
        B, h, hd = q.shape[0], self.num_heads, self.head_dim
        kv = self.shards.gather_kv(kv)  # (B, T * L, 2D): one collective for K and V
        k, v = kv.view(B, -1, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def _scatter_input_hook(shards: TileShards):
    """Forward pre-hook: S on the block's input (positional, or open_clip's ``q_x=`` / the gated ``x=``)."""

    def hook(module, args, kwargs):
        if args:
            return (shards.scatter(args[0]), *args[1:]), kwargs
        name = "q_x" if "q_x" in kwargs else "x"
        return args, {**kwargs, name: shards.scatter(kwargs[name])}

    return hook


def _gather_output_hook(shards: TileShards):
    def hook(module, args, output):
        return shards.gather_output(output)

    return hook


def _split_stack(blocks: nn.ModuleList, whole_inputs: set[int], shards: TileShards) -> None:
    """Split a stack of blocks: S before block k when ``k in whole_inputs`` (k = 0 always), G after block k when
    block k + 1 needs a whole input or k is the last; local sequences in between."""
    for k, blk in enumerate(blocks):
        blk.attn.__class__ = SequenceParallelAttention
        blk.attn.shards = shards
        if k == 0 or k in whole_inputs:
            blk.register_forward_pre_hook(_scatter_input_hook(shards), with_kwargs=True)
        if k + 1 in whole_inputs or k == len(blocks) - 1:
            blk.register_forward_hook(_gather_output_hook(shards))
        for p in blk.parameters():  # each rank saw its tokens only: sum the gradient over the group
            if p.requires_grad:
                p.register_hook(_grad_allreduce_hook(shards.group))


def _encoder_of(model_or_encoder: nn.Module) -> VisionEncoder:
    if isinstance(model_or_encoder, VisionEncoder):
        return model_or_encoder
    encoder = getattr(model_or_encoder, "vision", None)
    if not isinstance(encoder, VisionEncoder):
        raise SequenceParallelError(f"expected a VisionEncoder or a model with one as .vision (MultimodalLlama), "
                                    f"got {type(model_or_encoder).__name__}")
    return encoder


def apply_encoder_sequence_parallel(model_or_encoder: nn.Module, group, recompute_kv: bool = False) -> nn.Module:
    """Split the image encoder's token sequence over ``group`` in place and return ``model_or_encoder``.

    Call it on every rank of ``group``, after freezing (gradient hooks go on the parameters that train then)
    and before any engine wraps the model. A 1-rank group leaves the model untouched. Parameters keep their
    objects and names; outputs and gradients are those of the unsplit encoder on every rank.

    ``recompute_kv``: do not keep the gathered K/V (whole sequence, 2 x width per token and block) for backward;
    backward gathers them again and recomputes the attention forward (one more all-gather per block). Without
    it they bound the saving: each rank keeps 1 / w of the block activations plus the whole K/V
    (``scripts.bench_sequence_parallel``, width 512, 4 tiles of 448 px, w = 2: 0.64 of the unsplit encoder's
    activations per rank, 0.54 with ``recompute_kv``).
    """
    encoder = _encoder_of(model_or_encoder)
    world = dist.get_world_size(group)
    validate_sp_size(encoder.cfg, world)
    blocks, global_blocks = encoder.transformer.resblocks, encoder.global_transformer.resblocks
    if any(isinstance(blk.attn, SequenceParallelAttention) for blk in [*blocks, *global_blocks]):
        raise SequenceParallelError("apply_encoder_sequence_parallel was already applied to this encoder")
    if world == 1:
        return model_or_encoder
    for blk in [*blocks, *global_blocks]:
        if not isinstance(blk.attn, MaskedSelfAttention):
            raise SequenceParallelError(f"expected MaskedSelfAttention in every encoder block, got "
                                        f"{type(blk.attn).__name__}")
    shards = TileShards(group, tile_tokens(encoder.cfg), recompute_kv)
    _split_stack(blocks, set(encoder.cfg.taps), shards)  # a tap is the whole input of its block
    if len(global_blocks):
        _split_stack(global_blocks, set(), shards)
    encoder.register_forward_pre_hook(lambda module, args: shards.reset(caching=True))
    encoder.register_forward_hook(lambda module, args, output: shards.reset(caching=False))
    return model_or_encoder
