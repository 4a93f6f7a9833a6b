"""Memory and throughput planner for the image model: TP x PP x DP layouts (issue 18, point 6).

The paper (Llama 3, "Model scaling" in the vision sections) picked its layouts with "a memory-consumption
estimator and a performance-projection tool"; this is ours. For every layout (tensor parallel ``tp`` x
pipeline ``pp`` x data parallel ``dp``, encoder sequence parallelism on/off, ZeRO stage 0/1/2, activation
checkpointing on/off) it estimates the memory of the heaviest GPU and the time of one optimizer step.

What the layouts mean (the code's own modes):
* TP (`training.tensor_parallel`): every LM self-attention layer (attention + FFN) and every cross-attention
  block is sharded (``wq/wk/wv/wo``, ``w1/w2/w3``); norms, gates, embeddings, LM head, image encoder and
  projector are replicated. Encoder sequence parallelism (the paper's; `training.sequence_parallel`) splits the
  encoder's tokens over the TP group instead (its activations and FLOPs / tp, K/V all-gathered per block).
* PP (`training.pipeline`): a stage holds consecutive groups of 4 self-attention + 1 cross-attention
  layers (``pp`` must divide the cross-attention count), the embeddings on the first stage, norm and head
  on the last; the image encoder + projector is replicated on *every* stage (tied, its gradients summed
  over stages). DeepSpeed's 1F1B schedule keeps up to ``pp - s`` micro-batches in flight on stage ``s``.
* Precision (configs/deepspeed/*.json, DeepSpeed's BF16_Optimizer at ZeRO 1): bf16 weights (frozen and
  trainable), bf16 gradients written by backward, an FP32 accumulation buffer of all trainable gradients,
  FP32 master weights + Adam moments (12 bytes/param, partitioned over ``dp`` from ZeRO 1). ZeRO 2 also
  partitions the FP32 gradients (plus DeepSpeed's bf16 reduce bucket). ZeRO 0 and 2 are what-ifs with FP32
  accumulation: DeepSpeed honours ``grad_accum_dtype: fp32`` with bf16 only at ZeRO 1 (a note says so).

Activations are the tensors autograd saves, counted per op of this code base's blocks (bf16 unless said):
a frozen self-attention layer keeps no linear inputs (its weights need no gradient), only its norms' FP32
inputs, q/k/v/out of attention and the SwiGLU intermediates; a cross-attention block also keeps its
linears' inputs and the bf16 copy of its text-image mask; every cross-attention layer keeps K/V of all
vision tokens; the encoder keeps ~34 x width bytes per token and block (as Korthikanti et al. 2022,
without dropout) plus its (L, L) additive mask; the last stage keeps FP32 logits of supervised tokens.
Checkpointing keeps block inputs only and recomputes one block at a time (one more forward of all but the
head). `scripts.bench_planner` checks the totals against measured peaks on CPU.

Time: matmul FLOPs (`training.bench.forward_flops`, executed: 3 x trainable, 2 x frozen, attention products
of frozen layers 3 x, conv patch embedding 2 x) over ``peak x efficiency``, plus communication at stated
bandwidths, not overlapped with compute (an upper bound): TP all-reduces (4 per layer and micro-batch),
pipeline sends, the pipeline bubble ``(pp - 1) / grad_accum``, data-parallel gradient reduction (FP32) and
parameter all-gather, and the tied encoder's all-reduce over stages.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import torch

from training.bench import forward_flops, train_flops

GIB = 2**30
ZERO_STAGES = (0, 1, 2)
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


class PlanError(ValueError):
    """A planner input that cannot be planned (unknown model, GPU count, workload); the message says which."""


@dataclass(frozen=True)
class Hardware:
    """Stated assumptions of the estimate (defaults: H100 SXM 80 GB nodes of 8 GPUs)."""

    gpu_memory_gib: float = 80.0
    peak_flops: float = 989e12  # dense bf16, `training.bench.PEAK_BF16_FLOPS` ("H100" SXM)
    efficiency: float = 0.5  # achieved fraction of peak in matmuls
    intra_node_gbs: float = 450.0  # NVLink 4 per GPU and direction, GB/s
    inter_node_gbs: float = 50.0  # one 400 Gb/s InfiniBand NIC per GPU, GB/s
    gpus_per_node: int = 8
    runtime_reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Workload:
    """Per micro-batch of one data-parallel replica: ``micro_batch`` samples of ``seq_len`` tokens and
    ``images`` images of ``tiles`` tiles each; ``supervised`` positions get the LM head (default all)."""

    micro_batch: int
    seq_len: int
    tiles: int
    grad_accum: int = 8
    images: int = 1
    supervised: int | None = None

    @property
    def n_supervised(self) -> int:
        return self.seq_len if self.supervised is None else self.supervised


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    encoder_sp: bool = False
    zero: int = 1
    checkpointing: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a `MultimodalConfig`, from the real model built on the ``meta`` device.
    ``*_sharded``: the part TP splits (the linears of attention and FFN modules)."""

    cfg: object  # MultimodalConfig
    lm_layer: int
    lm_layer_sharded: int
    xattn_block: int
    xattn_block_sharded: int
    embeddings: int  # frozen token table
    head: int  # frozen output projection + final norm
    vision: int
    projector: int
    learnable_embedding: int
    stage_layers: tuple[int, ...] = field(default=())  # LM layers per cross-attention group

    @property
    def total(self) -> int:
        c = self.cfg
        return (c.lm.n_layers * self.lm_layer + c.n_xattn * self.xattn_block + self.embeddings + self.head
                + self.vision + self.projector + self.learnable_embedding)


def model_shape(cfg) -> ModelShape:
    """Count ``cfg``'s parameters on the meta device (no memory); one LM layer and one block stand for all."""
    from adapters.cross_attention import CrossAttention, xattn_schedule
    from adapters.llama import Attention, FeedForward, Llama
    from adapters.multimodal import MultimodalLlama

    if cfg.video is not None or cfg.reward_head:
        raise PlanError("the planner lays out the image model only (no video adapter, no reward head)")
    with torch.device("meta"):
        m = MultimodalLlama(cfg, Llama(cfg.lm))

    def count(module: torch.nn.Module) -> tuple[int, int]:
        sharded = sum(lin.weight.numel() for mod in module.modules() if isinstance(mod, (Attention, CrossAttention,
                      FeedForward)) for lin in mod.children() if isinstance(lin, torch.nn.Linear))
        return sum(p.numel() for p in module.parameters()), sharded

    n = lambda mod: sum(p.numel() for p in mod.parameters())
    schedule = xattn_schedule(cfg.lm.n_layers, cfg.xattn_every)
    bounds = [-1, *schedule[:-1], cfg.lm.n_layers - 1]  # as training.pipeline.stage_layer_ids
    return ModelShape(cfg, *count(m.lm.layers[0]), *count(m.cross_attention_layers[0]), n(m.lm.tok_embeddings),
                      n(m.lm.output) + n(m.lm.norm), n(m.vision), n(m.projector), n(m.learnable_embedding),
                      tuple(b - a for a, b in itertools.pairwise(bounds)))


# ----------------------------------------------------------------------------------------------
# Memory


def _params_on_stage(shape: ModelShape, layout: Layout, stage: int) -> tuple[float, float, int, int]:
    """(frozen, trainable) parameters held by one GPU of ``stage``, and its (LM layers, cross-attention blocks)."""
    cfg, tp = shape.cfg, layout.tp
    per = len(shape.stage_layers) // layout.pp
    n_xa, n_sa = per, sum(shape.stage_layers[stage * per : (stage + 1) * per])
    sa = shape.lm_layer - shape.lm_layer_sharded + shape.lm_layer_sharded / tp
    xa = shape.xattn_block - shape.xattn_block_sharded + shape.xattn_block_sharded / tp
    frozen, trainable = n_sa * sa, n_xa * xa + shape.projector
    frozen += shape.embeddings if stage == 0 else 0
    frozen += shape.head if stage == layout.pp - 1 else 0
    trainable += shape.learnable_embedding if stage == 0 and cfg.train_image_token_rows else 0
    frozen += shape.learnable_embedding if stage == 0 and not cfg.train_image_token_rows else 0
    if cfg.train_vision:
        trainable += shape.vision
    else:
        frozen += shape.vision
    return frozen, trainable, n_sa, n_xa


def activation_bytes(shape: ModelShape, work: Workload, layout: Layout, n_sa: int, n_xa: int,
                     last: bool) -> dict[str, float]:
    """Saved-for-backward bytes of one micro-batch on one GPU of a stage holding ``n_sa`` LM layers and ``n_xa``
    cross-attention blocks (``last``: and the head); see the module docstring. A frozen encoder saves nothing
    (no gradient flows into it), only the projector keeps its input."""
    from vision.encoder_layers import num_pad_tokens

    cfg, tp = shape.cfg, layout.tp
    v, lm = cfg.vision, cfg.lm
    B, T, D, F, H, hd = work.micro_batch, work.seq_len, lm.dim, lm.ffn_dim, lm.n_heads, lm.head_dim
    q, kv, KVH = H * hd, lm.n_kv_heads * hd, lm.n_kv_heads
    W, N = v.width, v.n_tokens
    L = work.tiles * (N + num_pad_tokens(N, v.pad_to_multiple))  # the encoder's sequence per image
    n_vis = work.images * work.tiles * N  # vision tokens per sample
    sp = tp if layout.encoder_sp else 1
    # per text token of a frozen self-attention layer / a cross-attention block; per vision token and layer
    sa_tok = 8 * D + (4 * q + 4 * kv + 6 * F + 4 * H) / tp + 2 * hd
    xa_tok = 20 * D + (12 * q + 8 * F + 8 * H) / tp + 2 * n_vis  # + its bf16 copy of the (T, N_vis) mask
    xa_vis = 2 * D + (10 * kv + 4 * KVH) / tp  # vision_kv's inputs + the K/V that attention keeps
    n_blocks = v.layers + v.n_global_layers
    enc_tok = (34 * W + 4 * v.heads) * n_blocks + 8 * W * v.n_global_layers  # gated blocks keep their branches
    taps = B * n_vis * 2 * v.out_dim / sp  # the projector's input: final output + taps of every token
    encoder = (B * work.images * (L * enc_tok + 2 * L * L) / sp if cfg.train_vision else 0.0) + taps
    out = {"lm_layers": B * T * n_sa * sa_tok, "cross_attention": B * T * n_xa * xa_tok,
           "vision_kv": B * n_vis * (n_xa * xa_vis + 4 * D),  # + the FP32 vision tokens (or their gradient)
           "encoder": encoder, "head": B * work.n_supervised * 8 * lm.vocab_size if last else 0.0}
    if layout.checkpointing:  # block inputs kept; one block (or the head) live while recomputed
        biggest = max(B * T * sa_tok, B * T * xa_tok, B * work.images * L * (34 * W + 8 * W) / sp)
        out["lm_layers"] = B * T * n_sa * 2 * D
        out["cross_attention"] = B * T * n_xa * 2 * D + biggest
        out["vision_kv"] = B * n_vis * (xa_vis + 4 * D)  # FP32 tokens kept; one layer's K/V live in recompute
        out["encoder"] = (B * work.images * (L * n_blocks * 2 * W + 2 * L * L) / sp if cfg.train_vision else 0.0) + taps
    return out


def stage_memory(shape: ModelShape, work: Workload, layout: Layout, stage: int) -> dict[str, float]:
    """Bytes on one GPU of ``stage``: weights, gradients, optimizer states, FP32 accumulation, activations, and
    their peak ``total``: everything held across the step plus the larger of what backward holds (activations,
    pipeline buffers) and what the optimizer step adds (Adam's temporary)."""
    frozen, trainable, n_sa, n_xa = _params_on_stage(shape, layout, stage)
    dp, zero = layout.dp, layout.zero
    shard = dp if zero >= 1 else 1
    acts = activation_bytes(shape, work, layout, n_sa, n_xa, stage == layout.pp - 1)
    in_flight = min(layout.pp - stage, work.grad_accum)  # 1F1B: micro-batches whose backward is pending
    lm = shape.cfg.lm
    mem = {
        "frozen_weights_bf16": 2 * frozen,
        "trainable_weights_bf16": 2 * trainable,
        "gradients_bf16": 2 * (trainable / dp + min(trainable, DS_REDUCE_BUCKET) if zero == 2 else trainable),
        "fp32_accumulation": 4 * trainable / (dp if zero == 2 else 1),
        "optimizer_states": 12 * trainable / shard,  # FP32 master + Adam exp_avg + exp_avg_sq
        "activations": in_flight * sum(acts.values()),
        # pipeline receive buffers (DeepSpeed keeps max(2, in flight)): hidden state + pixels (bit-cast float32)
        "pipeline_buffers": (max(2, in_flight) * work.micro_batch * (2 * work.seq_len * lm.dim + 4 * work.images
                             * work.tiles * 3 * shape.cfg.vision.tile_size**2)) if layout.pp > 1 else 0.0,
    }
    # AdamW's temporary sqrt(v) (one FP32 tensor per flat partition) during the step, when activations are gone
    mem["optimizer_step_temp"] = 4 * trainable / shard
    held = sum(x for k, x in mem.items() if k not in ("activations", "pipeline_buffers", "optimizer_step_temp"))
    mem["total"] = held + max(mem["activations"] + mem["pipeline_buffers"], mem["optimizer_step_temp"])
    mem["activations_detail"] = {k: in_flight * x for k, x in acts.items()}
    return mem


# ----------------------------------------------------------------------------------------------
# FLOPs and time


def executed_flops(shape: ModelShape, work: Workload) -> dict[str, float]:
    """Matmul FLOPs one sample executes in forward + backward, per component, with the LM frozen: trainable
    parts 3 x forward, frozen ones 2 x (input gradients only) except their attention products (3 x: both
    score operands need gradients), the patch conv 2 x (pixels need no gradient). ``model``: 3 x forward, the
    MFU numerator of `training.bench.train_flops`."""
    cfg = shape.cfg
    fwd = forward_flops(cfg, work.seq_len, work.tiles * work.images, work.n_supervised)
    v = cfg.vision
    conv = 2 * work.tiles * work.images * v.grid_size**2 * 3 * v.patch_size**2 * v.width
    lm_scores = cfg.lm.n_layers * 4 * work.seq_len**2 * cfg.lm.n_heads * cfg.lm.head_dim
    trained = lambda x: 3 * x if cfg.train_vision else 2 * x
    return {"vision": trained(fwd["vision"] - conv) + 2 * conv, "projector": 3 * fwd["projector"],
            "cross_attention": 3 * fwd["cross_attention"], "lm": 2 * fwd["lm"] + lm_scores,
            "head": 2 * fwd["head"], "forward": fwd["total"], "model": train_flops(cfg, fwd)["model"],
            "forward_parts": {k: fwd[k] for k in ("vision", "projector", "cross_attention", "lm", "head")}}


def _allreduce_s(nbytes: float, n: int, gbs: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / (gbs * 1e9)


def step_time(shape: ModelShape, work: Workload, layout: Layout, hw: Hardware) -> dict[str, float]:
    """Seconds of one optimizer step (``grad_accum`` micro-batches per replica) and its parts."""
    tp, pp, dp, B = layout.tp, layout.pp, layout.dp, work.micro_batch
    ex = executed_flops(shape, work)
    fwd = ex["forward_parts"]
    sp = tp if layout.encoder_sp else 1
    lm, n_xattn = shape.cfg.lm, shape.cfg.n_xattn
    rate = hw.peak_flops * hw.efficiency

    def stage_s(stage: int) -> float:  # compute seconds of one micro-batch on one GPU of ``stage``
        _, _, n_sa, n_xa = _params_on_stage(shape, layout, stage)
        lm_part = (ex["lm"] * n_sa / lm.n_layers + ex["cross_attention"] * n_xa / n_xattn) / tp
        enc = (ex["vision"] + ex["projector"]) / sp
        recompute = ((fwd["vision"] + fwd["projector"]) / sp + (fwd["lm"] * n_sa / lm.n_layers
                     + fwd["cross_attention"] * n_xa / n_xattn) / tp) if layout.checkpointing else 0.0
        head = ex["head"] if stage == pp - 1 else 0.0  # replicated under TP
        return B * (enc + lm_part + recompute + head) / rate

    compute_mb = max(stage_s(s) for s in range(pp))  # the slowest stage sets the pipeline's pace
    n_sa, n_xa = lm.n_layers / pp, n_xattn / pp
    node = hw.gpus_per_node
    tp_bw = hw.intra_node_gbs if tp <= node else hw.inter_node_gbs
    h_bytes = B * work.seq_len * lm.dim * 2
    n_vis = work.images * work.tiles * shape.cfg.vision.n_tokens
    tp_comm = (4 * (n_sa + n_xa) * _allreduce_s(h_bytes, tp, tp_bw)
               + n_xa * _allreduce_s(B * n_vis * lm.dim * 2, tp, tp_bw))
    if layout.encoder_sp and tp > 1:  # K/V of every encoder block all-gathered (forward), reduce-scattered (backward)
        from vision.encoder_layers import num_pad_tokens

        v = shape.cfg.vision
        L = work.tiles * (v.n_tokens + num_pad_tokens(v.n_tokens, v.pad_to_multiple))
        kv_bytes = B * work.images * L * v.width * 2 * 2
        tp_comm += (v.layers + v.n_global_layers) * 2 * _allreduce_s(kv_bytes, tp, tp_bw) / 2
        tp_comm += _allreduce_s(B * n_vis * lm.dim * 2, tp, tp_bw) / 2  # projected tokens all-gathered
    pp_bw = hw.intra_node_gbs if tp * pp <= node else hw.inter_node_gbs
    pp_comm = 2 * h_bytes / tp / (pp_bw * 1e9) if pp > 1 else 0.0
    micro_s = compute_mb + tp_comm + pp_comm
    pipeline_s = (work.grad_accum + pp - 1) * micro_s
    _, trainable, _, _ = _params_on_stage(shape, layout, pp - 1)
    dp_bw = hw.intra_node_gbs if layout.gpus <= node else hw.inter_node_gbs
    grads = 4 if layout.zero < 2 else 2  # ZeRO 2 (DeepSpeed) reduces the bf16 gradients
    dp_s = _allreduce_s(grads * trainable, dp, dp_bw) + (_allreduce_s(2 * trainable, dp, dp_bw) / 2
                                                            if layout.zero >= 1 else 0.0)
    encoder = shape.vision + shape.projector if shape.cfg.train_vision else shape.projector
    tied_s = _allreduce_s(4 * encoder, pp, pp_bw)
    total = pipeline_s + dp_s + tied_s
    samples = B * work.grad_accum * dp
    return {"step_s": total, "compute_per_micro_batch_s": compute_mb, "tp_comm_per_micro_batch_s": tp_comm,
            "pp_comm_per_micro_batch_s": pp_comm, "bubble_s": (pp - 1) * micro_s, "dp_sync_s": dp_s,
            "tied_encoder_sync_s": tied_s, "samples_per_step": samples, "samples_per_s": samples / total,
            "tokens_per_s": samples * work.seq_len / total,
            "mfu": ex["model"] * samples / (total * layout.gpus * hw.peak_flops)}


# ----------------------------------------------------------------------------------------------
# Layouts


@dataclass
class LayoutPlan:
    layout: Layout
    memory: dict[str, float]  # bytes on the heaviest GPU (its stage in ``stage``)
    stage: int
    time: dict[str, float]
    rejected: list[str]
    notes: list[str]

    @property
    def total_gib(self) -> float:
        return self.memory["total"] / GIB

    def to_dict(self) -> dict:
        if not math.isfinite(self.memory["total"]):  # a layout that does not split the model: nothing to cost
            return {"layout": asdict(self.layout), "memory_gib": None, "heaviest_stage": None, "time": None,
                    "fits": False, "rejected": self.rejected, "notes": self.notes}
        gib = {k: round(v / GIB, 3) for k, v in self.memory.items() if k != "activations_detail"}
        gib["activations_detail"] = {k: round(v / GIB, 3) for k, v in self.memory["activations_detail"].items()}
        return {"layout": asdict(self.layout), "memory_gib": gib, "heaviest_stage": self.stage,
                "time": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.time.items()},
                "fits": not self.rejected, "rejected": self.rejected, "notes": self.notes}


def layout_problems(shape: ModelShape, layout: Layout) -> list[str]:
    """Why ``layout`` cannot split this model (empty when it can)."""
    from training.tensor_parallel import validate_tp_size

    out = []
    try:
        validate_tp_size(shape.cfg.lm, layout.tp)
    except ValueError as e:
        out.append(f"tp: {e}")
    groups = len(shape.stage_layers)
    if layout.pp < 1 or groups % layout.pp:
        out.append(f"pp: {layout.pp} does not divide the {groups} groups of LM layers + 1 cross-attention block "
                   f"(training.pipeline: stages of whole groups)")
    if layout.pp > 1 and layout.zero != 1:
        out.append(f"zero: ZeRO {layout.zero} with a pipeline: DeepSpeed pipelines take ZeRO 1 only (bf16 + FP32 "
                   f"accumulation; ZeRO 2/3 are incompatible with pipeline parallelism)")
    if layout.encoder_sp and layout.tp == 1:
        out.append("encoder_sp: encoder sequence parallelism splits over the TP group: needs tp > 1")
    return out


def trainer_gaps(layout: Layout) -> list[str]:
    """What `training.trainer` (with DeepSpeed) lacks to run ``layout`` as planned; empty when it runs it."""
    out = []
    if layout.zero != 1:
        out.append(f"ZeRO {layout.zero}: DeepSpeed keeps bf16 + FP32 accumulation at ZeRO 1 only "
                   "(training.config.resolve_deepspeed refuses it)")
    if layout.encoder_sp and layout.pp > 1:
        out.append("the trainer splits the encoder's tokens in data-parallel mode only, not inside pipeline stages")
    if layout.checkpointing and layout.pp == 1:
        out.append("the trainer checkpoints activations in pipeline mode only (per stage block, not per layer)")
    return out


def plan_layout(shape: ModelShape, work: Workload, layout: Layout, hw: Hardware) -> LayoutPlan:
    """Memory (heaviest stage) and step time of one layout, with why it is rejected and what the trainer lacks."""
    rejected = layout_problems(shape, layout)
    if any(r.startswith(("tp:", "pp:")) for r in rejected):  # no split to cost
        return LayoutPlan(layout, {"total": float("nan"), "activations_detail": {}}, 0, {}, rejected, [])
    per_stage = [stage_memory(shape, work, layout, s) for s in range(layout.pp)]
    for m in per_stage:
        m["runtime_reserve"] = hw.runtime_reserve_gib * GIB
        m["total"] += m["runtime_reserve"]
    stage = max(range(layout.pp), key=lambda s: per_stage[s]["total"])
    mem = per_stage[stage]
    if mem["total"] > hw.gpu_memory_gib * GIB:
        top = sorted(((k, x) for k, x in mem.items() if k not in ("total", "activations_detail", "runtime_reserve")),
                     key=lambda kx: -kx[1])[:2]
        rejected.append(f"memory: needs {mem['total'] / GIB:.1f} GiB on stage {stage} > {hw.gpu_memory_gib:g} GiB "
                        f"(largest: {', '.join(f'{k} {x / GIB:.1f}' for k, x in top)})")
    notes = trainer_gaps(layout)
    if layout.tp > hw.gpus_per_node:
        notes.append(f"tp={layout.tp} spans nodes: its all-reduces run at inter-node bandwidth")
    return LayoutPlan(layout, mem, stage, step_time(shape, work, layout, hw), rejected, notes)


def enumerate_layouts(shape: ModelShape, gpus: int) -> list[Layout]:
    """Every tp x pp x dp = ``gpus`` (tp and pp divisors of ``gpus``), encoder SP, ZeRO stage, checkpointing."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    out = []
    for tp, pp in itertools.product(divisors, divisors):
        if gpus % (tp * pp):
            continue
        for sp, zero, ckpt in itertools.product((False, True), ZERO_STAGES, (False, True)):
            out.append(Layout(tp, pp, gpus // (tp * pp), sp, zero, ckpt))
    return out


def plan(shape: ModelShape, gpus: int, work: Workload, hw: Hardware,
         trainer_only: bool = False) -> list[LayoutPlan]:
    """All layouts of ``gpus`` (``trainer_only``: those `trainer_gaps` has nothing against): the ones that fit
    first, fastest (highest MFU) first; then the rejected."""
    for name, value in (("micro_batch", work.micro_batch), ("seq_len", work.seq_len), ("tiles", work.tiles),
                        ("grad_accum", work.grad_accum), ("images", work.images)):
        if value < 1:
            raise PlanError(f"Workload.{name} must be >= 1, got {value}")
    if work.tiles > shape.cfg.vision.max_tiles:
        raise PlanError(f"tiles={work.tiles} > the encoder's max_tiles={shape.cfg.vision.max_tiles}")
    if not 0 <= work.n_supervised <= work.seq_len:
        raise PlanError(f"supervised={work.n_supervised} must be in [0, seq_len={work.seq_len}]")
    if gpus > hw.gpus_per_node and gpus % hw.gpus_per_node:
        raise PlanError(f"gpus={gpus} is not a whole number of {hw.gpus_per_node}-GPU nodes")
    layouts = [lay for lay in enumerate_layouts(shape, gpus) if not (trainer_only and trainer_gaps(lay))]
    plans = [plan_layout(shape, work, layout, hw) for layout in layouts]
    fit = sorted((p for p in plans if not p.rejected), key=lambda p: (-p.time["mfu"], p.memory["total"]))
    return fit + [p for p in plans if p.rejected]
