"""Megatron-style tensor parallelism for the image model, applied from outside the single-device code.

The model code stays single-device (CONVENTIONS.md, torchtitan's rule): `apply_tensor_parallel` slices
the weights of an existing `MultimodalLlama` in place and attaches the two conjugate communication
operators of Megatron-LM (Shoeybi et al. 2019, sec. 3) as module hooks:

* column-parallel ``wq/wk/wv`` (whole heads; query *and* KV heads split) and ``w1/w3``: their input
  passes through ``f`` (identity forward, all-reduce of the gradient backward), so every replicated
  tensor upstream (norms, gates, embeddings rows, image encoder, projector) gets its complete gradient;
* row-parallel ``wo`` and ``w2``: their partial outputs pass through ``g`` (all-reduce forward,
  identity backward), so the residual stream stays replicated.

The per-rank head counts of the attention modules are lowered (as torchtitan does), so the unchanged
forward code reshapes local shards. ``q_norm``/``k_norm`` (RMSNorm over ``head_dim``) stay replicated
but see only the local heads, so their weight gradients are summed over the TP group by a gradient
hook: ``f`` applied to a parameter. Sharded parameters are plain tensors (not DTensor, so DeepSpeed and
any torch optimizer hold them) marked ``tensor_model_parallel = True`` with ``partition_dim``, the
attributes DeepSpeed's gradient-norm code reads to count them once per TP rank.

Sharded: every LM self-attention layer (attention + FFN) and every image cross-attention block. The
embeddings, LM head, image encoder, projector and any video adapter stay replicated. KV caches for
generation (``Llama.new_cache``) are sized from the config and do not fit local shards: TP is a
training mode here.

`init_tp_grid` builds the (dp, tp) process grid and the ``mpu`` object that ``deepspeed.initialize``
takes, so gradients are averaged (and ZeRO states partitioned) over data-parallel ranks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from adapters.cross_attention import CrossAttention
from adapters.llama import Attention, FeedForward, LlamaConfig
from adapters.multimodal import MultimodalLlama


class TensorParallelError(ValueError):
    """The model or the process grid cannot be split as asked (names the offending config field)."""


# ----------------------------------------------------------------------------------------------
# Megatron's conjugate operators f and g


class _CopyToTP(torch.autograd.Function):
    """f: identity forward; all-reduce (sum) of the gradient backward. Placed where a replicated
    tensor enters sharded compute: each rank's gradient holds only its shard's contribution."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce (sum) forward; identity backward. Placed after row-parallel layers, whose outputs
    are partial sums; the summed output is replicated, so its gradient already is too."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def copy_to_tp(x: Tensor, group) -> Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return _ReduceFromTP.apply(x, group)


# ----------------------------------------------------------------------------------------------
# Sharding


def validate_tp_size(cfg: LlamaConfig, tp: int) -> None:
    """Raise `TensorParallelError` unless ``tp`` splits heads, KV heads and the FFN evenly.

    KV heads are split, not replicated (one copy of each K/V projection in the group), which caps
    ``tp`` at ``n_kv_heads`` (8 for every Llama 3 size).
    """
    if tp < 1:
        raise TensorParallelError(f"tensor-parallel size must be >= 1, got {tp}")
    for name in ("n_heads", "n_kv_heads", "ffn_dim"):
        value = getattr(cfg, name)
        if value % tp:
            raise TensorParallelError(
                f"LlamaConfig.{name} = {value} is not divisible by the tensor-parallel size {tp}: "
                f"{'heads are' if name != 'ffn_dim' else 'the FFN hidden layer is'} split whole across ranks")


# Megatron's split of one layer (attention and FFN alike): column-parallel linears keep a slice of their
# output rows, row-parallel ones a slice of their input columns.
COLUMN_PARALLEL, ROW_PARALLEL = ("wq", "wk", "wv", "w1", "w3"), ("wo", "w2")


def tp_slice(size: int, rank: int, tp: int) -> tuple[int, int]:
    """[start, stop) of the contiguous 1/tp slice that TP rank ``rank`` keeps of a dim of ``size``."""
    n = size // tp
    return rank * n, (rank + 1) * n


def layer_split_dims(layer: nn.Module, prefix: str = "") -> dict[str, int]:
    """Weight name -> split dim (0 column-, 1 row-parallel) of the linears `apply_tensor_parallel` shards in
    one LM layer or cross-attention block (its ``attention`` and ``feed_forward``)."""
    out = {}
    for part in ("attention", "feed_forward"):
        for name, _ in getattr(layer, part).named_children():
            if name in COLUMN_PARALLEL or name in ROW_PARALLEL:
                out[f"{prefix}{part}.{name}.weight"] = 0 if name in COLUMN_PARALLEL else 1
    return out


def sharded_layers(model: MultimodalLlama) -> list[tuple[str, nn.Module]]:
    """(name prefix, layer) of every layer `apply_tensor_parallel` shards: LM layers, then cross-attention blocks."""
    return ([(f"lm.layers.{i}.", layer) for i, layer in enumerate(model.lm.layers)]
            + [(f"cross_attention_layers.{j}.", blk) for j, blk in enumerate(model.cross_attention_layers)])


def tp_split_dims(model: MultimodalLlama) -> dict[str, int]:
    """``model.named_parameters()`` name -> split dim of every weight `apply_tensor_parallel` shards."""
    return {k: d for prefix, layer in sharded_layers(model) for k, d in layer_split_dims(layer, prefix).items()}


def _shard_linear(linear: nn.Linear, dim: int, rank: int, tp: int) -> None:
    """Keep this rank's contiguous 1/tp slice of ``linear.weight`` along ``dim`` (0: output features,
    column-parallel; 1: input features, row-parallel), as a fresh plain parameter. A weight that already is
    that slice (built per rank by `training.loading`; ``in/out_features`` still the full sizes) is kept."""
    w = linear.weight.detach()
    full = linear.out_features if dim == 0 else linear.in_features
    start, stop = tp_slice(full, rank, tp)
    if w.shape[dim] == full:
        w = w.narrow(dim, start, stop - start).clone()
    elif w.shape[dim] != stop - start:
        raise TensorParallelError(f"a weight of shape {tuple(w.shape)} is neither whole ({full} along dim {dim}) "
                                  f"nor one of {tp} slices")
    shard = nn.Parameter(w, requires_grad=linear.weight.requires_grad)
    shard.tensor_model_parallel = True  # DeepSpeed / Megatron attribute names
    shard.partition_dim = dim
    shard.partition_stride = 1
    linear.weight = shard
    linear.out_features, linear.in_features = shard.shape


def _shard_linears(module: nn.Module, rank: int, tp: int) -> None:
    for name, linear in module.named_children():
        if name in COLUMN_PARALLEL or name in ROW_PARALLEL:
            _shard_linear(linear, 0 if name in COLUMN_PARALLEL else 1, rank, tp)


def _input_f_hook(group):
    """Forward pre-hook: f on the module's first input (positional or ``x=``)."""

    def hook(module, args, kwargs):
        if args:
            return (copy_to_tp(args[0], group), *args[1:]), kwargs
        return args, {**kwargs, "x": copy_to_tp(kwargs["x"], group)}

    return hook


def _output_g_hook(group):
    def hook(module, args, output):
        return reduce_from_tp(output, group)

    return hook


def _grad_allreduce_hook(group):
    def hook(grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def _shard_attention(attn: Attention | CrossAttention, group, rank: int, tp: int) -> None:
    _shard_linears(attn, rank, tp)
    attn.n_heads //= tp  # local heads: the unchanged forward reshapes its shard
    attn.n_kv_heads //= tp
    attn.wo.register_forward_hook(_output_g_hook(group))
    # f on x: feeds wq (and wk/wv in self-attention)
    attn.register_forward_pre_hook(_input_f_hook(group), with_kwargs=True)
    if isinstance(attn, CrossAttention):
        # wk/wv read the vision tokens in `vision_kv`, not in forward: f on each of their inputs.
        # (Megatron fuses k and v into one matrix and pays one all-reduce; here it is two.)
        attn.wk.register_forward_pre_hook(_input_f_hook(group), with_kwargs=True)
        attn.wv.register_forward_pre_hook(_input_f_hook(group), with_kwargs=True)
        for norm in (attn.q_norm, attn.k_norm):  # replicated, but each rank only sees its own heads
            if norm.weight.requires_grad:
                norm.weight.register_hook(_grad_allreduce_hook(group))


def _shard_feed_forward(ffn: FeedForward, group, rank: int, tp: int) -> None:
    _shard_linears(ffn, rank, tp)
    ffn.register_forward_pre_hook(_input_f_hook(group), with_kwargs=True)
    ffn.w2.register_forward_hook(_output_g_hook(group))


def apply_tensor_parallel(model: MultimodalLlama, tp_group) -> MultimodalLlama:
    """Shard ``model`` in place over ``tp_group`` and return it; a 1-rank group leaves it untouched.

    Every rank must hold the same full weights before the call (same seed or same checkpoint): each
    keeps its slice; a model built per rank (`training.loading`) already holds only its slices. Frozen
    parameters stay frozen; the replicated ones keep their objects, so parameter groups built afterwards
    (``build_param_groups``) see the same names.
    """
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    validate_tp_size(model.cfg.lm, tp)
    if any(getattr(p, "tensor_model_parallel", False) for p in model.parameters()):
        raise TensorParallelError("apply_tensor_parallel was already applied to this model")
    if tp == 1:
        return model
    for _, layer in sharded_layers(model):
        _shard_attention(layer.attention, tp_group, rank, tp)
        _shard_feed_forward(layer.feed_forward, tp_group, rank, tp)
    return model


# ----------------------------------------------------------------------------------------------
# The (dp, tp) grid and DeepSpeed's model-parallel unit


@dataclass
class ModelParallelUnit:
    """The ``mpu`` that ``deepspeed.initialize(..., mpu=...)`` takes (Megatron's interface).

    DeepSpeed averages gradients and partitions ZeRO states over ``get_data_parallel_group`` and sums
    the gradient norm over ``get_model_parallel_group`` (counting replicated parameters on TP rank 0
    only and ``tensor_model_parallel`` ones on every rank), so the clipping norm is the global one.
    """

    tp_group: object
    dp_group: object
    tp_ranks: list[int]
    dp_ranks: list[int]

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    def get_model_parallel_world_size(self) -> int:
        return len(self.tp_ranks)

    def get_model_parallel_group(self):
        return self.tp_group

    # Newer Megatron / DeepSpeed spellings (deepspeed.utils.bwc prefers these)
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self) -> int:
        return len(self.dp_ranks)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)


def init_tp_grid(tp_size: int) -> ModelParallelUnit:
    """Split the initialised world into ``world // tp_size`` TP groups of consecutive ranks (TP traffic
    stays within a node, as in Megatron) and ``tp_size`` strided DP groups. Collective: every rank
    calls it. ``mpu.tp_group`` is what `apply_tensor_parallel` takes."""
    if not dist.is_initialized():
        raise TensorParallelError("init_tp_grid needs torch.distributed initialised (torchrun / deepspeed)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size < 1 or world % tp_size:
        raise TensorParallelError(f"tensor-parallel size {tp_size} does not divide the world size {world}")
    tp_group = dp_group = tp_ranks = dp_ranks = None
    for d in range(world // tp_size):  # every rank creates every group, in the same order
        ranks = list(range(d * tp_size, (d + 1) * tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group, tp_ranks = group, ranks
    for t in range(tp_size):
        ranks = list(range(t, world, tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group, dp_ranks = group, ranks
    return ModelParallelUnit(tp_group, dp_group, tp_ranks, dp_ranks)
