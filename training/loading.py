"""Per-rank model building: each rank of a pipeline or tensor-parallel run holds and reads only its own weights.

A full build reads the whole frozen LM on every rank (~140 GB for 70B) before `training.pipeline` keeps one
stage or `training.tensor_parallel` one slice. Here the LM is built on the meta device, the layout decides
which of its parameters (and which slice of each) the rank owns (`lm_plan`), and only those are
materialised and filled from the checkpoint through `adapters.checkpoint.LlamaCheckpoint`, which reads one
tensor or one slice at a time; the others stay on meta and are never read.

* pipeline stage s: the stage's LM layers and cross-attention blocks (`config_stage_layer_ids`), the
  embeddings on the first stage, norm and head on the last; the image encoder and projector (replicated on
  every stage, see `training.pipeline`) are built on every stage, the learnable image-token rows on the
  first.
* tensor-parallel rank r: every layer, each `tp_split_dims` weight as the slice `tp_slice` keeps (what
  `apply_tensor_parallel` keeps of a full model); the rest replicated.

At the end of the run each rank writes its own part of the export the same way round (`write_rank_shards`):
no rank gathers the model, and the frozen LM is referenced, not re-written, when it came from a checkpoint.

The adapter (encoder, projector, cross-attention blocks) is built by the same factory in the same order
as the full build, so the same seed gives the same initial values; a cross-attention block is cut to the
rank's part (meta, or its slices) as soon as it is built, so only one whole block exists at a time. The
layout and the checkpoint (every stage's keys and shapes) are checked before any weight is read.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.module import register_module_module_registration_hook

from adapters.checkpoint import LlamaCheckpoint
from adapters.cross_attention import CrossAttentionBlock, xattn_schedule
from adapters.llama import Llama
from adapters.multimodal import MultimodalConfig, MultimodalLlama, build_multimodal
from common.rope import rope_frequencies
from training.spec import TrainError

if TYPE_CHECKING:
    from adapters.tokenizer import Tokenizer
    from training.config import RunConfig

Slice = tuple[int, int, int]  # (dim, start, stop)


class LayoutError(TrainError):
    """A parallel layout that does not fit the model or its checkpoint; raised before any weight is read."""


@dataclass(frozen=True)
class RankLayout:
    """Where a rank sits: pipeline stage ``stage`` of ``stages``, tensor-parallel rank ``tp_rank`` of ``tp``."""

    stages: int = 1
    stage: int = 0
    tp: int = 1
    tp_rank: int = 0


def _stage_layer_ids(cfg: MultimodalConfig, stages: int) -> list[list[int]]:
    if stages == 1:  # no pipeline (and no DeepSpeed import)
        return [list(range(cfg.lm.n_layers))]
    from training.pipeline import PipelineConfigError, config_stage_layer_ids

    try:
        return config_stage_layer_ids(cfg, stages)
    except PipelineConfigError as e:
        n = len(xattn_schedule(cfg.lm.n_layers, cfg.xattn_every))
        even = [s for s in range(1, n + 1) if n % s == 0]
        raise LayoutError(f"pipeline_stages={stages}: {e}; stage counts that split the {n} groups evenly: "
                          f"{even}") from None


def check_layout(cfg: MultimodalConfig, layout: RankLayout) -> list[list[int]]:
    """Each stage's LM layers, after refusing a layout that does not divide the model (`LayoutError` naming
    the mismatch and the sizes that would work)."""
    from training.tensor_parallel import TensorParallelError, validate_tp_size

    if cfg.video is not None:
        raise LayoutError("per-rank building lays out the image model only; this config has a video adapter")
    if not 0 <= layout.stage < layout.stages or not 0 <= layout.tp_rank < layout.tp:
        raise LayoutError(f"{layout}: stage must be in [0, stages) and tp_rank in [0, tp)")
    try:
        validate_tp_size(cfg.lm, layout.tp)
    except TensorParallelError as e:
        fits = [t for t in range(1, cfg.lm.n_kv_heads + 1)
                if not (cfg.lm.n_heads % t or cfg.lm.n_kv_heads % t or cfg.lm.ffn_dim % t)]
        raise LayoutError(f"tensor_parallel={layout.tp}: {e}; sizes that split this model: {fits}") from None
    return _stage_layer_ids(cfg, layout.stages)


def _owns(name: str, layers: set[int], first: bool, last: bool, tied: bool) -> bool:
    """Whether the stage with LM ``layers`` holds the LM parameter ``name`` (``Llama`` names)."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) in layers
    if name == "tok_embeddings.weight":
        return first or (last and tied)  # a tied head is the embedding matrix
    return last  # norm.weight, output.weight


def lm_plan(cfg: MultimodalConfig, lm: Llama, layout: RankLayout) -> dict[str, Slice | None]:
    """LM parameter (``Llama`` names) -> the slice this rank holds (None: whole), for the parameters it owns."""
    from training.tensor_parallel import layer_split_dims, tp_slice

    stages = check_layout(cfg, layout)
    layers = set(stages[layout.stage])
    first, last = layout.stage == 0, layout.stage == layout.stages - 1
    dims = {f"layers.{i}.{k}": d for i, layer in enumerate(lm.layers) for k, d in layer_split_dims(layer).items()}
    plan: dict[str, Slice | None] = {}
    for name, p in lm.named_parameters():
        if not _owns(name, layers, first, last, cfg.lm.tie_embeddings):
            continue
        d = dims.get(name) if layout.tp > 1 else None
        plan[name] = None if d is None else (d, *tp_slice(p.shape[d], layout.tp_rank, layout.tp))
    return plan


def check_checkpoint(ckpt: LlamaCheckpoint, cfg: MultimodalConfig, lm: Llama, layout: RankLayout) -> None:
    """Every stage's tensors are in ``ckpt`` with the model's shapes and one float dtype (headers only): a
    checkpoint missing some is refused on every rank alike, before any of them reads a weight."""
    if ckpt.cfg != cfg.lm:
        raise LayoutError(f"{ckpt.path}: its LM config {ckpt.cfg} is not the model's {cfg.lm}")
    shapes = {n: tuple(p.shape) for n, p in lm.named_parameters()}
    have = set(ckpt.keys())
    lacking = {}
    for s in range(layout.stages):
        plan = lm_plan(cfg, lm, replace(layout, stage=s, tp=1, tp_rank=0))
        missing = sorted(set(plan) - have)
        if missing:
            lacking[s] = missing
    if lacking:
        complete = [s for s in range(layout.stages) if s not in lacking]
        what = "; ".join(f"stage {s} lacks {len(m)} tensor(s): {m[:4]}{' ...' if len(m) > 4 else ''}"
                         for s, m in lacking.items())
        raise LayoutError(f"{ckpt.path}: {what} (of pipeline_stages={layout.stages}; stages complete in this "
                          f"checkpoint: {complete}). Its params say n_layers={ckpt.cfg.n_layers}: every layer "
                          "must be stored, whatever the layout")
    unknown = sorted(have - set(shapes))
    if unknown:
        raise LayoutError(f"{ckpt.path}: keys the model (n_layers={cfg.lm.n_layers}) does not have: {unknown[:5]}")
    for name, shape in shapes.items():
        if ckpt.shape(name) != shape:
            raise LayoutError(f"{ckpt.path}: {name} has shape {ckpt.shape(name)}, the model expects {shape}")
    floats = {ckpt.dtype(n) for n in shapes}
    if len(floats) != 1 or not next(iter(floats)).is_floating_point:
        raise LayoutError(f"{ckpt.path}: LM tensors of dtypes {sorted(map(str, floats))}; one float dtype expected")


def _set_param(module: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner)
    sub._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _materialise(lm: Llama, ckpt: LlamaCheckpoint, name: str, part: Slice | None) -> None:
    """Read ``name`` (or its slice) into memory of its own (nothing of a memory-mapped file is kept)."""
    shape = list(lm.get_parameter(name).shape)
    if part is not None:
        shape[part[0]] = part[2] - part[1]
    out = torch.empty(shape, dtype=ckpt.dtype(name))
    _set_param(lm, name, ckpt.read(name, out=out) if part is None else ckpt.read(name, *part, out=out))


def _cut_blocks(owned: set[int], layout: RankLayout):
    """A module-registration hook cutting each `CrossAttentionBlock` to this rank's part as its ModuleList
    receives it: other stages' blocks to meta, owned ones to their tensor-parallel slices (in/out features
    stay whole: `apply_tensor_parallel` recognises the slices)."""
    from training.tensor_parallel import layer_split_dims, tp_slice

    index = itertools.count()

    def hook(parent: nn.Module, name: str, block: nn.Module):
        if not (isinstance(parent, nn.ModuleList) and isinstance(block, CrossAttentionBlock)):
            return None
        if next(index) not in owned:
            return block.to("meta")
        if layout.tp > 1:
            for key, d in layer_split_dims(block).items():
                w = block.get_parameter(key)
                start, stop = tp_slice(w.shape[d], layout.tp_rank, layout.tp)
                owner, _, leaf = key.rpartition(".")
                setattr(block.get_submodule(owner), leaf,
                        nn.Parameter(w.detach().narrow(d, start, stop - start).clone(), requires_grad=w.requires_grad))
        return block

    return hook


def plan_layers(plan: dict[str, Slice | None]) -> list[int]:
    """The LM layer indices a `lm_plan` holds."""
    return sorted({int(n.split(".")[1]) for n in plan if n.startswith("layers.")})


def build_rank_model(cfg: MultimodalConfig, ckpt: LlamaCheckpoint, layout: RankLayout) -> MultimodalLlama:
    """The image model around ``ckpt``'s frozen LM as this rank holds it (module docstring): owned LM
    weights read in their stored dtype, the rest of the LM on meta, the adapter as a full build with the
    current RNG state makes it, cut to this rank. Seed the RNG as the full build does before calling."""
    with torch.device("meta"):
        lm = Llama(cfg.lm)
    plan = lm_plan(cfg, lm, layout)
    check_checkpoint(ckpt, cfg, lm, layout)
    emb = "tok_embeddings.weight"
    shape, dtype = lm.tok_embeddings.weight.shape, ckpt.dtype(emb)
    if emb in plan:
        _materialise(lm, ckpt, emb, plan[emb])
    else:
        # `MultimodalLlama` draws the image-token rows with the embedding table's std; a stage that does not
        # hold them still makes the same draws (the same RNG stream for the blocks after), from a stand-in
        # that has the table's shape and one element of storage (fp32: its std is 5x faster than bf16's).
        _set_param(lm, emb, torch.zeros(()).expand(shape))
    schedule = xattn_schedule(cfg.lm.n_layers, cfg.xattn_every)
    layers = set(plan_layers(plan))
    owned = {j for j, i in enumerate(schedule) if i in layers}
    handle = register_module_module_registration_hook(_cut_blocks(owned, layout))
    try:
        model = build_multimodal(cfg, lm)
    finally:
        handle.remove()
    if emb not in plan:
        _set_param(lm, emb, torch.empty(shape, dtype=dtype, device="meta"))
    if layout.stage != 0:  # the image-token rows live on the first stage (`StageBlock.embed`)
        model.learnable_embedding.to("meta")
    for name, part in plan.items():
        if name != emb:
            _materialise(lm, ckpt, name, part)
    if cfg.lm.tie_embeddings:
        lm.output.weight = lm.tok_embeddings.weight
    lm.inv_freq = rope_frequencies(cfg.lm.head_dim, cfg.lm.rope_theta, cfg.lm.rope_scaling)
    return model


def build_rank_image_model(cfg: RunConfig, tok: Tokenizer | None, layout: RankLayout) -> MultimodalLlama:
    """The ``image`` kind's model for this rank: built per rank when it wraps a checkpoint LM (``model.lm``)
    in a fresh adapter. From ``model.init_from`` (an export) or around a random LM there is no checkpoint to
    read in parts: those take the full build (`training.spec.build_multimodal_model`)."""
    from training.spec import build_multimodal_model, check_vocab, fresh_multimodal_config

    m = cfg.model
    if m.init_from or not m.lm:
        return build_multimodal_model(cfg, tok)
    torch.manual_seed(m.seed)
    ckpt = LlamaCheckpoint(m.lm)
    check_vocab(cfg, tok, ckpt.cfg.vocab_size)
    mcfg = replace(fresh_multimodal_config(cfg), lm=ckpt.cfg)
    return build_rank_model(mcfg, ckpt, layout)


def write_rank_shards(held: dict[str, nn.Parameter], layout: RankLayout, dp_rank: int, tp_group, out: Path,
                      with_lm: bool, master: Callable[[nn.Parameter], Tensor | None]) -> dict[str, str]:
    """Write this rank's part of a sharded export (`adapters.model_io.save_shard`) and return the whole
    ``weight_map`` (name -> file, the same on every rank). Collective: every rank calls it.

    ``held``: the rank's parameters under ``MultimodalLlama`` names (`training.pipeline.stage_parameters`, or
    the TP-sharded model's); ``master(p)``: a trainable parameter's FP32 master weight (collective over the
    data-parallel group) or None. Without ``with_lm`` the ``lm.*`` tensors are left out (the export refers to
    the LM). Each name is written once: by the first stage that holds it (the encoder replicas are equal),
    there by TP rank ``i % tp`` for the stage's i-th name, which receives the other TP ranks' slices of that
    one tensor (never more than one whole tensor at a time); data-parallel replicas write nothing.
    """
    from adapters.model_io import save_shard, shard_file

    names = sorted(n for n in held if with_lm or not n.startswith("lm."))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (layout.stage, layout.tp_rank, dp_rank, names))
    writers = sorted((s, t, ns) for s, t, dp, ns in everyone if dp == 0)
    first_stage: dict[str, int] = {}
    for s, _, ns in writers:
        for n in ns:
            first_stage.setdefault(n, s)
    owned = {(s, t): [n for i, n in enumerate(m for m in ns if first_stage[m] == s) if i % layout.tp == t]
             for s, t, ns in writers}
    files = [w for w in sorted(owned) if owned[w]]
    weight_map = {n: shard_file(i, len(files)) for i, w in enumerate(files) for n in owned[w]}
    mine = [n for n in names if first_stage[n] == layout.stage]
    tensors: dict[str, Tensor] = {}
    for i, name in enumerate(mine):  # the same names in the same order on every rank of the stage
        p = held[name]
        value = master(p) if p.requires_grad else None
        value = (value if value is not None else p.detach()).float().contiguous()
        owner = i % layout.tp
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(value) for _ in range(layout.tp)] if layout.tp_rank == owner else None
            dist.gather(value, parts, group=tp_group, group_dst=owner)
            value = torch.cat(parts, dim=p.partition_dim) if parts is not None else value
        if owner == layout.tp_rank and dp_rank == 0:
            tensors[name] = value
    if tensors:
        save_shard(tensors, out, files.index((layout.stage, layout.tp_rank)), len(files))
    return weight_map


def export_shards(held: dict[str, nn.Parameter], layout: RankLayout, dp_rank: int, tp_group, model: nn.Module,
                  cfg: RunConfig, out: Path, rank: int) -> Path:
    """The image model's export written by the ranks that hold it (`training.loading.write_rank_shards`:
    FP32 master weights, each tensor once), then rank 0's index and config.json, whose LM fingerprint is read
    from the ``model.lm`` checkpoint (`checkpoint_fingerprint`), not from a loaded LM."""
    from deepspeed.utils import safe_get_full_fp32_param

    from adapters.model_io import begin_sharded_export, write_shard_index

    if rank == 0:
        begin_sharded_export(out)
    dist.barrier()
    weight_map = write_rank_shards(held, layout, dp_rank, tp_group, out, with_lm=not cfg.model.lm,
                                   master=safe_get_full_fp32_param)
    dist.barrier()
    if rank == 0:
        write_shard_index(model.cfg, out, weight_map, cfg.model.tokenizer, cfg.model.lm or None)
    dist.barrier()
    return out
