"""The composed image model: frozen Llama + image encoder + projector + gated cross-attention layers.

Token stream: ids below ``lm.vocab_size`` use the frozen embedding table; ids at or above it use
``learnable_embedding`` (8 rows, as released). ``<|image|>`` enters the model as ``vocab_size``
(128256 for Llama 3), ``<|video|>`` as ``vocab_size + 1``; neither is ever a prediction target: the LM
head keeps its ``vocab_size`` rows.

With ``cfg.video`` set the model also holds the video adapter (`adapters.video_adapter`): a temporal aggregator
over the projected frame tokens and video cross-attention blocks before every 4th image block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from common.presets import preset_config
from adapters.chat import IMAGE_TOKEN_ROW, VIDEO_TOKEN_ROW
from adapters.cross_attention import (CrossAttentionBlock, expand_vision_mask, text_image_mask, within_documents,
                                      xattn_schedule)
from adapters.llama import (KVCache, Llama, LlamaConfig, build_attention_mask, build_llama, document_positions,
                            llama_config)
from adapters.video_adapter import VideoAdapter, VideoAdapterConfig, VideoBatch, frame_token_mask, video_schedule
from vision.encoder import VisionEncoderConfig, VisionProjector, build_vision_encoder, vision_config


@dataclass(frozen=True)
class MultimodalConfig:
    lm: LlamaConfig = field(default_factory=lambda: llama_config("8B"))
    vision: VisionEncoderConfig = field(default_factory=lambda: vision_config("vit_h14"))
    xattn_every: int = 4  # "after every 4th self-attention layer" (sec. 7.3)
    n_learnable_embeddings: int = 8  # released: max(model-parallel size, 8) extra rows; row 0 = <|image|>
    train_vision: bool = True  # the paper updates the image encoder; False freezes it too
    # The <|image|> rows train by default (as released: new rows, not in the frozen table). Freezing them
    # lets backward stop at the first cross-attention block instead of running through the frozen
    # layers below it, which is what HF Mllama does (its image rows sit in the frozen embed_tokens).
    train_image_token_rows: bool = True
    video: VideoAdapterConfig | None = None  # None: an image-only model
    # A reward model (Llama 3 sec. 7.5): a scalar head on the final hidden state of a row's last token
    # (`MultimodalLlama.reward`), trained by the ``reward`` kind of `training.spec`.
    reward_head: bool = False

    @property
    def n_xattn(self) -> int:
        return self.lm.n_layers // self.xattn_every

    @property
    def image_token_id(self) -> int:
        return self.lm.vocab_size + IMAGE_TOKEN_ROW

    @property
    def video_token_id(self) -> int:
        return self.lm.vocab_size + VIDEO_TOKEN_ROW


MULTIMODAL_PRESETS: dict[str, MultimodalConfig] = {
    "tiny": MultimodalConfig(lm=llama_config("tiny"), vision=vision_config("tiny"), xattn_every=2),
    "11B": MultimodalConfig(lm=llama_config("8B"), vision=vision_config("vit_h14", tile_size=560)),
    "90B": MultimodalConfig(lm=llama_config("70B"), vision=vision_config("vit_h14", tile_size=560)),
    # Not released; the paper says the 405B adapter adds about 100B parameters (sec. 7.3).
    "405B": MultimodalConfig(lm=llama_config("405B"), vision=vision_config("vit_h14", tile_size=336)),
}


def multimodal_config(name: str, **overrides) -> MultimodalConfig:
    return preset_config(MULTIMODAL_PRESETS, name, "multimodal", **overrides)


@dataclass
class ImageBatch:
    """Images of a batch: tiles (B, I, tiles, 3, S, S), layouts (B, I, 2), tile_mask (B, I, tiles),
    image_mask (B, I) (False for padding image slots; rows may hold no image at all)."""

    tiles: Tensor
    layouts: Tensor
    tile_mask: Tensor
    image_mask: Tensor

    @classmethod
    def from_collated(cls, batch: dict) -> "ImageBatch":
        return cls(batch["tiles"], batch["layouts"], batch["tile_mask"], batch["image_mask"])

    def trimmed(self) -> "ImageBatch":
        """Drop tile slots that no image in the batch uses (a batch of 1-tile images encodes 1 tile, not 4).

        For training our own models; released weights were trained with padded tiles present, which real
        tokens attend to in the encoder, so inference that must match them bit for bit keeps all slots.
        """
        n = max(1, int(self.tile_mask.sum(-1).max()))
        return ImageBatch(self.tiles[:, :, :n], self.layouts, self.tile_mask[:, :, :n], self.image_mask)

    def to(self, device) -> "ImageBatch":
        return ImageBatch(*(t.to(device) for t in (self.tiles, self.layouts, self.tile_mask, self.image_mask)))


@dataclass
class VisionContext:
    """What every cross-attention layer needs, computed once per batch (and once per generation)."""

    kv: list[tuple[Tensor, Tensor]]  # per cross-attention layer, (B, kv_heads, N_vis, head_dim)
    text_image: Tensor  # (B, T, I) bool: which text positions see which image
    tile_mask: Tensor  # (B, I, tiles)
    tokens_per_tile: int
    # (mask, row_mask) for one decoding step (what the prompt's last token saw), built on first use
    decode_masks: tuple[Tensor, Tensor] | None = None

    def masks(self, T: int, decoding: bool) -> tuple[Tensor, Tensor]:
        """Cross-attention (mask, row_mask) for T new tokens: the prompt's rows, or decoding rows that
        see what the last prompt token saw (built once per generation for single-token steps)."""
        if not decoding:
            return expand_vision_mask(self.text_image, self.tile_mask, self.tokens_per_tile)
        if T == 1 and self.decode_masks is not None:
            return self.decode_masks
        masks = expand_vision_mask(self.text_image[:, -1:].expand(-1, T, -1), self.tile_mask, self.tokens_per_tile)
        if T == 1:
            self.decode_masks = masks
        return masks


class MultimodalLlama(nn.Module):
    def __init__(self, cfg: MultimodalConfig, lm: Llama | None = None):
        super().__init__()
        self.cfg = cfg
        self.lm = (lm if lm is not None else Llama(cfg.lm)).freeze()
        self.vision = build_vision_encoder(cfg.vision)
        self.projector = VisionProjector(cfg.vision.out_dim, cfg.lm.dim)
        self.learnable_embedding = nn.Embedding(cfg.n_learnable_embeddings, cfg.lm.dim)
        with torch.no_grad():  # new rows on the scale of the frozen table, not N(0, 1) outliers
            if self.lm.tok_embeddings.weight.device.type != "meta":
                self.learnable_embedding.weight.normal_(0.0, float(self.lm.tok_embeddings.weight.std()))
        self.schedule = xattn_schedule(cfg.lm.n_layers, cfg.xattn_every)
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(cfg.lm) for _ in self.schedule)
        self._xattn_at = {layer: i for i, layer in enumerate(self.schedule)}
        if not cfg.train_vision:
            self.vision.freeze()
        self.learnable_embedding.requires_grad_(cfg.train_image_token_rows)
        self.video: VideoAdapter | None = None
        self._video_at: dict[int, int] = {}
        if cfg.video is not None:
            self.video_schedule = video_schedule(self.schedule, cfg.video.every)
            if not self.video_schedule:
                raise ValueError(f"VideoAdapterConfig.every = {cfg.video.every} leaves no video cross-attention block: "
                                 f"the LM has only {len(self.schedule)} image cross-attention blocks")
            self._video_at = {layer: i for i, layer in enumerate(self.video_schedule)}
            self.video = VideoAdapter(cfg.video, cfg.lm, cfg.vision.n_tokens, len(self.video_schedule))
            if not cfg.video.train_image_adapter:  # the video stage trains on top of a finished image model
                for module in (self.vision, self.projector, self.cross_attention_layers):
                    module.requires_grad_(False)
        self.reward_head: nn.Linear | None = None
        if cfg.reward_head:  # zero: every answer starts at reward 0, the pairwise loss moves the head first
            self.reward_head = nn.Linear(cfg.lm.dim, 1)
            if self.reward_head.weight.device.type != "meta":
                nn.init.zeros_(self.reward_head.weight)
                nn.init.zeros_(self.reward_head.bias)

    # -- pieces --------------------------------------------------------------------------------

    def embed(self, tokens: Tensor) -> Tensor:
        """Frozen rows for ids < vocab, learnable rows for the image token and the other new ids."""
        vocab = self.cfg.lm.vocab_size
        extra = tokens >= vocab
        h = self.lm.tok_embeddings(tokens.clamp(max=vocab - 1))
        if extra.any():
            learn = self.learnable_embedding((tokens - vocab).clamp(min=0))
            h = torch.where(extra[..., None], learn.to(h.dtype), h)
        return h

    def encode_images(self, images: ImageBatch) -> Tensor:
        """-> projected vision tokens (B, I * tiles * N, D); padding image slots stay zero (masked anyway)."""
        B, I = images.image_mask.shape
        real = images.image_mask.flatten()
        feats = self.vision(images.tiles.flatten(0, 1)[real], images.layouts.flatten(0, 1)[real],
                            images.tile_mask.flatten(0, 1)[real])
        feats = self.projector(feats)  # (n_real, tiles, N, D): only real images go through the encoder
        out = feats.new_zeros(B * I, *feats.shape[1:])
        out[real] = feats
        return out.reshape(B, -1, feats.shape[-1])

    def encode_frames(self, videos: VideoBatch) -> Tensor:
        """Projected encoder tokens of every frame: (B, V, F, tiles * P, D), zero for repeated and padded
        frames. Only real frames of real videos go through the encoder."""
        B, V, F_ = videos.frame_mask.shape
        frame_mask = videos.frame_mask & videos.video_mask[..., None]
        feats = self.projector(self.vision(videos.tiles[frame_mask], videos.layouts[frame_mask],
                                           videos.tile_mask[frame_mask]))
        out = feats.new_zeros(B, V, F_, feats.shape[1] * feats.shape[2], feats.shape[3])
        out[frame_mask] = feats.flatten(1, 2)
        return out

    def encode_videos(self, videos: VideoBatch) -> tuple[Tensor, Tensor]:
        """-> aggregated video tokens (B, V * K * L, D) and chunk mask (B, V, K), K = ceil(F / chunk_frames).

        Repeated frames, padded frames and padded videos are zero and masked; ``videos.frame_features``,
        when set, replaces the encoder (see `VideoBatch`).
        """
        if self.video is None:
            raise ValueError("this model has no video adapter (cfg.video is None)")
        if videos.frame_features is None:
            frames = self.encode_frames(videos)
        elif self.training and any(p.requires_grad for p in [*self.vision.parameters(), *self.projector.parameters()]):
            raise ValueError("VideoBatch.frame_features were given while the image encoder or projector trains: "
                             "precomputed features would give them no gradient (freeze them or pass tiles only)")
        else:
            frames = videos.frame_features
        B, V, F_, T_P, D = frames.shape
        n_tiles = videos.tile_mask.shape[-1]
        if T_P != n_tiles * self.cfg.vision.n_tokens:
            raise ValueError(f"frame_features carry {T_P} tokens per frame, not the batch's {n_tiles} tile slots x "
                             f"{self.cfg.vision.n_tokens} tokens (compute them with encode_frames on the same, "
                             f"trimmed, batch)")
        real_video = videos.video_mask.flatten()
        frame_mask = videos.frame_mask.flatten(0, 1)[real_video]  # (n, F)
        token_mask = frame_token_mask(frame_mask, videos.tile_mask.flatten(0, 1)[real_video], self.cfg.vision.n_tokens)
        agg, chunk_mask = self.video.aggregate(frames.flatten(0, 1)[real_video], token_mask)  # (n, K * L, D), (n, K)
        out = agg.new_zeros(B * V, *agg.shape[1:])
        out[real_video] = agg
        chunks = chunk_mask.new_zeros(B * V, chunk_mask.shape[1])
        chunks[real_video] = chunk_mask
        return out.reshape(B, -1, D), chunks.view(B, V, -1)

    def video_context(self, tokens: Tensor, videos: VideoBatch, doc_ids: Tensor | None = None) -> VisionContext:
        vis, chunk_mask = self.encode_videos(videos)
        vis = vis.float()  # FP32 gradient accumulation over the video blocks (see `vision_context`)
        kv = [blk.attention.vision_kv(vis) for blk in self.video.cross_attention_layers]
        tokens_per_chunk = vis.shape[1] // (chunk_mask.shape[1] * chunk_mask.shape[2])
        text_video = text_image_mask(tokens, self.cfg.video_token_id, videos.video_mask, media="video")
        if doc_ids is not None:
            text_video = within_documents(text_video, doc_ids)
        return VisionContext(kv, text_video, chunk_mask, tokens_per_chunk)

    def vision_context(self, tokens: Tensor, images: ImageBatch, doc_ids: Tensor | None = None) -> VisionContext:
        # Every cross-attention layer reads these tokens. Kept FP32 and cast per consumer (in
        # ``vision_kv``), autograd sums the layers' gradients in FP32: bf16 accumulation over all layers
        # diverged in Llama 3 training (paper, "Model scaling"). Forward values are unchanged (the cast of
        # the upcast bf16 tokens is exact).
        vis = self.encode_images(images).float()
        kv = [blk.attention.vision_kv(vis) for blk in self.cross_attention_layers]
        tokens_per_tile = vis.shape[1] // (images.tile_mask.shape[1] * images.tile_mask.shape[2])
        text_image = text_image_mask(tokens, self.cfg.image_token_id, images.image_mask)
        if doc_ids is not None:
            text_image = within_documents(text_image, doc_ids)
        return VisionContext(kv, text_image, images.tile_mask, tokens_per_tile)

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,
        images: ImageBatch | None = None,
        videos: VideoBatch | None = None,
        *,
        context: VisionContext | None = None,
        video_context: VisionContext | None = None,
        start_pos: int = 0,
        cache: list[KVCache] | None = None,
        return_hidden: bool = False,
        doc_ids: Tensor | None = None,
        key_valid: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) fp32.

        With no image in the batch the cross-attention layers are skipped entirely (text-only cost); the
        same for videos. For cached decoding pass ``context`` / ``video_context`` (from ``vision_context``
        / ``video_context`` on the prompt) and ``start_pos``. ``doc_ids`` (B, T) marks packed training
        documents: each attends only to its own text (document mask, RoPE positions restarting at 0) and
        its own images / videos, so a packed row computes what its documents would alone. ``key_valid``
        (B, start_pos + T) bool marks the real tokens of left-padded generation rows (`adapters.generation`):
        padding keys are masked; RoPE scores are relative, so a row shifted right computes what it would alone.
        """
        if doc_ids is not None and (start_pos or cache is not None):
            raise ValueError("doc_ids are for packed training rows, not cached decoding")
        if context is None and images is not None and bool(images.image_mask.any()):
            context = self.vision_context(tokens, images, doc_ids)
        if video_context is None and videos is not None and bool(videos.video_mask.any()):
            video_context = self.video_context(tokens, videos, doc_ids)
        T = tokens.shape[1]
        h = self.embed(tokens)
        rope = self.lm.rope(T, start_pos, document_positions(doc_ids) if doc_ids is not None else None)
        mask = build_attention_mask(T, start_pos, doc_ids, tokens.device, key_valid)
        xmask = row_mask = None
        if context is not None:
            xmask, row_mask = context.masks(T, decoding=start_pos > 0)
            row_mask = row_mask.to(h.dtype)
        if video_context is not None:
            vmask, vrow_mask = video_context.masks(T, decoding=start_pos > 0)
            vrow_mask = vrow_mask.to(h.dtype)
        for i, layer in enumerate(self.lm.layers):
            if video_context is not None and i in self._video_at:
                j = self._video_at[i]
                h = self.video.cross_attention_layers[j](h, video_context.kv[j], vmask, vrow_mask)
            if context is not None and i in self._xattn_at:
                j = self._xattn_at[i]
                h = self.cross_attention_layers[j](h, context.kv[j], xmask, row_mask)
            h = layer(h, rope, mask, cache[i] if cache is not None else None, start_pos)
        h = self.lm.norm(h)
        return h if return_hidden else self.lm.output(h).float()

    def reward(self, tokens: Tensor, lengths: Tensor, images: ImageBatch | None = None,
               videos: VideoBatch | None = None) -> Tensor:
        """(B,) fp32 rewards of a reward model (``cfg.reward_head``): its head on the final hidden state of each
        row's last token, ``tokens[i, lengths[i] - 1]`` (rows right-padded; the last token is the answer's
        ``<|eot_id|>``)."""
        if self.reward_head is None:
            raise ValueError("reward(): this model has no reward head (MultimodalConfig.reward_head is False)")
        hidden = self(tokens, images, videos, return_hidden=True)
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths.to(tokens.device) - 1]
        return self.reward_head(last.to(self.reward_head.weight.dtype)).squeeze(-1).float()

    # -- training helpers ----------------------------------------------------------------------

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "MultimodalLlama":
        super().train(mode)
        self.lm.eval()  # frozen LM: always eval
        if not self.cfg.train_vision or (self.video is not None and not self.cfg.video.train_image_adapter):
            self.vision.eval()
        return self


def build_multimodal(cfg: MultimodalConfig | str, lm: Llama | None = None) -> MultimodalLlama:
    """Build the composed model; a fresh one gives exactly the frozen LM's logits (zero gates)."""
    if isinstance(cfg, str):
        cfg = multimodal_config(cfg)
    if lm is None:
        lm = build_llama(cfg.lm)
    elif lm.cfg != cfg.lm:
        raise ValueError(f"the given LM's config {lm.cfg} differs from cfg.lm {cfg.lm}")
    # New layers keep PyTorch's fan-in scaled init: the zero gates already make them the identity, and a
    # fixed N(0, 0.02) is far too small for narrow test models (slow start through SwiGLU's 3 matrices).
    return MultimodalLlama(cfg, lm)
