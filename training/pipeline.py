"""DeepSpeed pipeline mode for the image model: stages of 4 LM self-attention + 1 cross-attention layers.

Llama 3 ("Model scaling" in the vision sections): every pipeline stage holds four self-attention layers
and one cross-attention layer, and the image encoder is replicated on every stage, which balances image
and text compute. Here a *group* is one cross-attention block with the LM layers around it (layers
``(schedule[j-1], schedule[j]]``, the block running before layer ``schedule[j]``: SA SA SA XA SA for
``xattn_every = 4``); a stage holds one group (``num_stages = n_xattn``) or several consecutive ones.

Layer list handed to ``PipelineModule`` (partitioned ``uniform``: exactly two entries per stage)::

    [ImageEncoderPipe (tied), StageBlock(groups of stage 0, embeddings), ...,
     ImageEncoderPipe (tied), StageBlock(groups of stage S-1, norm; its ``loss`` is the loss_fn)]

The inter-stage contract (../shared/notes/video_speech_train.md, sec. 5.3): only tensors cross stages,
and the only floating one is the hidden state, which is always in the autograd graph. Pixels travel
bit-cast to int32, masks as uint8 and token ids as int64; the vision features are produced and
consumed inside each stage, never sent. Every micro-batch of a run must have the same shapes (the
engine negotiates them once): `pipeline_batch` pads to fixed ``seq_len`` / ``n_images`` / ``n_tiles``.

The blocks reuse the model's own modules (no copies): building a pipeline from a ``MultimodalLlama``
shares its parameters, so weights loaded into the model before ``build_pipeline_module`` are the
pipeline's, and `stage_parameters` maps them back to the model's names for the export (each stage writes
its own part: `training.loading.write_rank_shards`). DeepSpeed casts
the stage-local parameters of that model to bf16 in place when the engine is created. The trainer builds
that model per rank (`training.loading`): the stage's LM layers and blocks are read, other stages' stay on
the meta device, and ``PipelineModule`` keeps only the local stage's blocks.

With tensor parallelism the model is sharded (`training.tensor_parallel.apply_tensor_parallel`) before the
stages are built: each stage is then a TP group, and the process grid is `pipeline_topology`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.activation_checkpointing import checkpointing
from deepspeed.runtime.pipe.topology import ProcessTopology
from torch import Tensor, nn

from adapters.chat import IGNORE_INDEX
from adapters.cross_attention import expand_vision_mask, text_image_mask, xattn_schedule
from adapters.multimodal import ImageBatch, MultimodalConfig, MultimodalLlama
from adapters.task import build_param_groups, shift_targets
from common.rope import rope_table

ENCODER_KEY = "image_encoder"  # TiedLayerSpec key of the replicated encoder + projector
N_CARRY = 5  # (tokens, tiles, layouts, tile_mask, image_mask): what every stage receives besides h


class PipelineConfigError(ValueError):
    """The model or the requested stage count cannot be laid out as a pipeline."""


class PipelineBatchError(ValueError):
    """A batch does not fit the pipeline's fixed inter-stage tensor contract."""


def pipeline_ds_config(micro_batch_size: int, grad_accum_steps: int, data_parallel: int = 1,
                       gradient_clipping: float = 1.0, activation_checkpoint_interval: int = 0) -> dict:
    """The DeepSpeed config this module is built for: bf16 compute, FP32 gradient accumulation.

    ``grad_accum_dtype: fp32`` is honoured with bf16 only under ZeRO stage 1 (DeepSpeed then uses its
    BF16_Optimizer: fp32 master weights, fp32 accumulation buffers, tied gradients reduced in fp32);
    ZeRO 0 raises "unsupported mix" and ZeRO 2/3 are incompatible with pipelines.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * data_parallel,
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"stage": 1},
        "gradient_clipping": gradient_clipping,
        "pipeline": {"activation_checkpoint_interval": activation_checkpoint_interval,
                     "use_reentrant": False},
    }


# ----------------------------------------------------------------------------------------------
# Stage pieces


class ImageEncoderPipe(nn.Module):
    """The image encoder + projector, one replica per stage: ``(*, tiles, layouts, tile_mask,
    image_mask) -> (*, tiles, layouts, tile_mask, image_mask, vis)`` with ``vis`` (B, I * tiles * N, D)
    FP32, as ``MultimodalLlama.vision_context`` keeps it (the stage's cross-attention layers cast it
    per consumer, so their gradients add up in FP32).
    """

    def __init__(self, vision: nn.Module, projector: nn.Module, n_tokens: int, dim: int):
        super().__init__()
        self.vision, self.projector = vision, projector
        self.n_tokens, self.dim = n_tokens, dim

    @staticmethod
    def args_from(model: MultimodalLlama) -> tuple:
        """Constructor arguments sharing ``model``'s encoder and projector (what the TiedLayerSpec holds)."""
        return model.vision, model.projector, model.cfg.vision.n_tokens, model.cfg.lm.dim

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        tiles_bits, layouts, tile_mask, image_mask = inputs[-4:]
        tiles, tile_mask, image_mask = tiles_bits.view(torch.float32), tile_mask.bool(), image_mask.bool()
        B, I, T = tile_mask.shape
        real = image_mask.flatten()
        if bool(real.any()):  # as MultimodalLlama.encode_images: only real image slots are encoded
            feats = self.projector(self.vision(tiles.flatten(0, 1)[real], layouts.flatten(0, 1)[real],
                                               tile_mask.flatten(0, 1)[real]))
            out = feats.new_zeros(B * I, *feats.shape[1:])
            out[real] = feats
            vis = out.reshape(B, -1, feats.shape[-1]).float()
        else:  # a text-only micro-batch: nothing to see (every row's row_mask is 0)
            vis = torch.zeros(B, I * T * self.n_tokens, self.dim, device=tiles.device)
        return (*inputs, vis)


class StageBlock(nn.Module):
    """The LM side of one stage: its groups' self-attention layers (frozen) and cross-attention blocks,
    plus the embeddings on the first stage and the final norm (and, through `loss`, the head) on the
    last. Cross-attention masks and RoPE are rebuilt here from the token ids on every stage.

    Input ``([h,] tokens, tiles, layouts, tile_mask, image_mask, vis)`` (no ``h`` on the first stage);
    output ``(h, tokens, tiles, layouts, tile_mask, image_mask)``, or the normed hidden (B, T, D) on the
    last stage.
    """

    def __init__(self, model: MultimodalLlama, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        cfg = model.cfg
        self.first, self.last = first, last
        self.vocab_size, self.image_token_id = cfg.lm.vocab_size, cfg.image_token_id
        self.layer_ids = layer_ids
        self.layers = nn.ModuleList(model.lm.layers[i] for i in layer_ids)
        xattn_at = {layer: j for j, layer in enumerate(model.schedule)}
        self.xattn_ids = [xattn_at[i] for i in layer_ids if i in xattn_at]
        self.cross_attention_layers = nn.ModuleList(model.cross_attention_layers[j] for j in self.xattn_ids)
        self._xattn_at = {i: k for k, i in enumerate(i for i in layer_ids if i in xattn_at)}
        self.register_buffer("inv_freq", model.lm.inv_freq.detach().clone(), persistent=False)
        if first:
            self.tok_embeddings, self.learnable_embedding = model.lm.tok_embeddings, model.learnable_embedding
            self._shapes: list[tuple] | None = None
        if last:
            self.norm, self.output = model.lm.norm, model.lm.output

    def embed(self, tokens: Tensor) -> Tensor:
        """As ``MultimodalLlama.embed``: frozen rows below the vocab, learnable rows for the image token."""
        extra = tokens >= self.vocab_size
        h = self.tok_embeddings(tokens.clamp(max=self.vocab_size - 1))
        if extra.any():
            learn = self.learnable_embedding((tokens - self.vocab_size).clamp(min=0))
            h = torch.where(extra[..., None], learn.to(h.dtype), h)
        return h

    def _check_shapes(self, carry: tuple[Tensor, ...]) -> None:
        """The engine sends shapes once; a later micro-batch of another shape would be received into the
        first one's buffers. Fail here, on the sender, with a readable message."""
        shapes = [(tuple(t.shape), t.dtype) for t in carry]
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise PipelineBatchError(f"micro-batch tensors {shapes} differ from the run's first "
                                     f"{self._shapes}: pad every batch to the same seq_len / n_images / "
                                     "n_tiles (pipeline_batch)")

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        if self.first:
            carry, vis = inputs[:N_CARRY], inputs[N_CARRY]
            self._check_shapes(carry)
            h = self.embed(carry[0])
        else:
            h, carry, vis = inputs[0], inputs[1 : 1 + N_CARRY], inputs[1 + N_CARRY]
        tokens, _, _, tile_mask, image_mask = carry
        B, I, n_tiles = tile_mask.shape
        text_image = text_image_mask(tokens, self.image_token_id, image_mask.bool())
        xmask, row_mask = expand_vision_mask(text_image, tile_mask.bool(), vis.shape[1] // (I * n_tiles))
        row_mask = row_mask.to(h.dtype)
        rope = rope_table(self.inv_freq, torch.arange(tokens.shape[1], device=tokens.device))
        for i, layer in zip(self.layer_ids, self.layers):
            if i in self._xattn_at:  # as MultimodalLlama.forward: the block runs before LM layer i
                blk = self.cross_attention_layers[self._xattn_at[i]]
                h = blk(h, blk.attention.vision_kv(vis), xmask, row_mask)
            h = layer(h, rope, None)  # mask None: causal (SDPA is_causal), as build_attention_mask(T)
        if self.last:
            return self.norm(h)
        return (h, *carry)

    def loss(self, hidden: Tensor, labels: tuple[Tensor, ...]) -> Tensor:
        """The pipeline's loss_fn (last stage): ``ImageTextTask``'s next-token cross entropy, mean over
        supervised tokens, with the frozen head applied to those positions only (a 128K-row head on
        every position would dominate memory). ``labels = (labels (B, T),)`` as `pipeline_batch` gives."""
        if not self.last:
            raise PipelineConfigError("StageBlock.loss is the last stage's loss_fn; this block is not last")
        targets = shift_targets(labels[0], self.vocab_size)
        keep = targets != IGNORE_INDEX
        logits = self.output(hidden[keep]).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum") / keep.sum().clamp(min=1)


class MultimodalPipe(PipelineModule):
    """A ``PipelineModule`` that remembers each local parameter's name in ``MultimodalLlama``."""

    def __init__(self, layers: list, model_names: dict[int, str], **kwargs):
        super().__init__(layers, **kwargs)
        self.model_names = {name: model_names[id(p)] for name, p in self.named_parameters()}
        if not any(p.requires_grad for p in self.parameters()):
            # deepspeed.initialize would fail with "optimizer got an empty parameter list" (DeepSpeed#5071)
            raise PipelineConfigError(f"pipeline stage {self.stage_id} owns no trainable parameter (frozen "
                                      "encoder, projector and cross-attention layers): nothing to train")


# ----------------------------------------------------------------------------------------------
# Building


def stage_layer_ids(model: MultimodalLlama, num_stages: int) -> list[list[int]]:
    """LM layer indices of each stage: consecutive groups (one cross-attention block each), split as
    evenly as possible; earlier stages take the extra group when ``num_stages`` does not divide them."""
    return config_stage_layer_ids(model.cfg, num_stages)


def config_stage_layer_ids(cfg: MultimodalConfig, num_stages: int) -> list[list[int]]:
    """`stage_layer_ids` from the config alone (a model built per rank needs it before it exists)."""
    schedule, n_layers = xattn_schedule(cfg.lm.n_layers, cfg.xattn_every), cfg.lm.n_layers
    bounds = [-1, *schedule[:-1], n_layers - 1]  # the last group also takes any layers above the last block
    groups = [list(range(a + 1, b + 1)) for a, b in zip(bounds[:-1], bounds[1:])]
    if not 1 <= num_stages <= len(groups):
        raise PipelineConfigError(f"num_stages must be in [1, {len(groups)}] (one cross-attention block per "
                                  f"stage at least: {n_layers} LM layers, "
                                  f"xattn_every={cfg.xattn_every}), got {num_stages}")
    per, extra = divmod(len(groups), num_stages)
    out, start = [], 0
    for s in range(num_stages):
        n = per + (s < extra)
        out.append([i for g in groups[start : start + n] for i in g])
        start += n
    return out


def pipeline_topology(num_stages: int, data_parallel: int, tensor_parallel: int = 1) -> ProcessTopology:
    """The (dp, pp, tp) process grid, ordered [TP, CP, PP, DP] from innermost (consecutive ranks) to outermost,
    as the Llama 3 paper lays out its 4D parallelism (sec. 3.3.2; no context parallelism here): TP
    communicates inside every layer, forward and backward, so its ranks are neighbours on the fastest links
    (one node's NVLink); PP sends one activation per micro-batch between stages; DP reduces gradients once
    per step and tolerates the slowest links, so it is outermost. (DeepSpeed's own
    ``PipeModelDataParallelTopology`` puts pipe outermost.) Rank = ((d * pp) + p) * tp + t."""
    if tensor_parallel == 1:
        return ProcessTopology(axes=["data", "pipe"], dims=[data_parallel, num_stages])
    return ProcessTopology(axes=["data", "pipe", "model"], dims=[data_parallel, num_stages, tensor_parallel])


def build_pipeline_module(model: MultimodalLlama, num_stages: int, activation_checkpoint_interval: int = 0,
                          topology: ProcessTopology | None = None) -> MultimodalPipe:
    """The image model as a DeepSpeed ``PipelineModule`` of ``num_stages`` stages (see module docstring).

    Call after ``deepspeed.init_distributed()``; the world size must be a multiple of ``num_stages``
    (the rest is data parallelism). The encoder + projector replica of each stage is a ``TiedLayerSpec``
    naming every trainable encoder and projector parameter, so DeepSpeed broadcasts them from the first
    stage at build time and sums their gradients across stages after backward (replicas stay identical).
    ``activation_checkpoint_interval`` counts pipeline layers (2 per stage; 1 recomputes each stage
    block); checkpointing is non-reentrant, which accepts the integer-only first-stage inputs. ``topology``
    (`pipeline_topology`) lays out the ranks; None: DeepSpeed's default (pipe outermost, no TP).
    """
    if model.video is not None:
        raise PipelineConfigError("pipeline mode lays out the image model only; this MultimodalLlama has a "
                                  "video adapter (cfg.video is set)")
    layer_ids = stage_layer_ids(model, num_stages)
    encoder_args = ImageEncoderPipe.args_from(model)
    shared_encoder = ImageEncoderPipe(*encoder_args)  # used when nothing in it trains: no tie needed
    tied = [n for n, p in shared_encoder.named_parameters() if p.requires_grad]
    layers: list = []
    for s, ids in enumerate(layer_ids):
        if tied:
            layers.append(TiedLayerSpec(ENCODER_KEY, ImageEncoderPipe, *encoder_args, tied_weight_attr=tied))
        else:
            layers.append(shared_encoder)
        layers.append(StageBlock(model, ids, first=s == 0, last=s == num_stages - 1))
    model_names = {id(p): n for n, p in model.named_parameters()}
    if topology is not None and topology.get_dim("pipe") != num_stages:
        raise PipelineConfigError(f"topology has {topology.get_dim('pipe')} stages, num_stages is {num_stages}")
    return MultimodalPipe(
        layers, model_names, **({"topology": topology} if topology else {"num_stages": num_stages}),
        loss_fn=layers[-1].loss, partition_method="uniform",
        activation_checkpoint_interval=activation_checkpoint_interval,
        activation_checkpoint_func=checkpointing.non_reentrant_checkpoint,
        checkpointable_layers=["StageBlock"],
    )


def pipeline_param_groups(module: MultimodalPipe, model: MultimodalLlama, lr: float,
                          weight_decay: float = 0.0, encoder_lr_scale: float = 1.0) -> list[dict]:
    """``adapters.task.build_param_groups`` (the one home of the grouping rule) restricted to the
    parameters this stage owns; pass it to the optimizer handed to ``deepspeed.initialize``."""
    local = {id(p) for p in module.parameters() if p.requires_grad}
    groups = []
    for g in build_param_groups(model, lr, weight_decay, encoder_lr_scale):
        params = [p for p in g["params"] if id(p) in local]
        if params:
            groups.append({**g, "params": params})
    return groups


# ----------------------------------------------------------------------------------------------
# Batches


def pipeline_batch(tokens: Tensor, labels: Tensor, images: ImageBatch, *, seq_len: int | None = None,
                   n_images: int | None = None, n_tiles: int | None = None,
                   pad_id: int = 0) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One micro-batch as the engine's data iterator yields it: ``((inputs), (labels,))``.

    inputs = (tokens (B, T) int64, tiles (B, I, tiles, 3, S, S) float32 bit-cast to int32, layouts
    (B, I, 2) int64, tile_mask (B, I, tiles) uint8, image_mask (B, I) uint8); labels (B, T) int64 with
    ``IGNORE_INDEX`` where there is no target (the loss shifts them, as ``ImageTextTask``).

    Shapes must be identical for every micro-batch of a run: pad tokens to ``seq_len`` (``pad_id``,
    ignored labels; right padding is invisible to earlier positions under the causal mask), image slots
    to ``n_images`` (masked out, never encoded) and tile slots to ``n_tiles`` (e.g. ``max_tiles``: a
    ``trimmed()`` batch has as many as its largest image). None keeps the batch's own size.
    """
    if tokens.shape != labels.shape or tokens.dim() != 2:
        raise PipelineBatchError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} must both "
                                 "be (B, T)")
    if not images.tiles.is_floating_point():
        raise PipelineBatchError(f"images.tiles must be normalised floats, got {images.tiles.dtype}")
    B, T = tokens.shape
    _, I, n_t = images.tile_mask.shape
    seq_len, n_images, n_tiles = seq_len or T, n_images or I, n_tiles or n_t
    for name, want, have in (("seq_len", seq_len, T), ("n_images", n_images, I), ("n_tiles", n_tiles, n_t)):
        if want < have:
            raise PipelineBatchError(f"{name}={want} is smaller than the batch's {have}")
    tok = torch.full((B, seq_len), pad_id, dtype=torch.long)
    lab = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    tok[:, :T], lab[:, :T] = tokens, labels
    S = images.tiles.shape[-1]
    tiles = torch.zeros(B, n_images, n_tiles, 3, S, S, dtype=torch.float32)
    tiles[:, :I, :n_t] = images.tiles
    layouts = torch.ones(B, n_images, 2, dtype=torch.long)  # padding images get (1, 1), as collate_tiled
    layouts[:, :I] = images.layouts
    tile_mask = torch.zeros(B, n_images, n_tiles, dtype=torch.uint8)
    tile_mask[:, :I, :n_t] = images.tile_mask
    image_mask = torch.zeros(B, n_images, dtype=torch.uint8)
    image_mask[:, :I] = images.image_mask
    return (tok, tiles.view(torch.int32), layouts, tile_mask, image_mask), (lab,)


# ----------------------------------------------------------------------------------------------
# Weights in and out


def _module_of(engine_or_module) -> MultimodalPipe:
    module = getattr(engine_or_module, "module", engine_or_module)
    if not isinstance(module, MultimodalPipe):
        raise TypeError(f"expected a MultimodalPipe or an engine wrapping one, got {type(module).__name__}")
    return module


def stage_parameters(engine_or_module) -> dict[str, nn.Parameter]:
    """This rank's parameters (its stage's, and the encoder replica) under ``MultimodalLlama.state_dict()``
    names: what it writes of the export (`training.loading.write_rank_shards`), nothing gathered."""
    module = _module_of(engine_or_module)
    return {module.model_names[name]: p for name, p in module.named_parameters()}
