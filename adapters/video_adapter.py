"""The video adapter: temporal aggregator + video cross-attention layers (Llama 3 paper, sec. 7.4).

"The video adapter ... adds a temporal aggregator and additional video cross-attention layers ...
inserted before every fourth image cross-attention layer." The video cross-attention block is the image
one (`CrossAttentionBlock`: GQA cross-attention + SwiGLU FFN, both behind zero-initialised tanh gates),
so a freshly added video adapter leaves the image model's logits exactly unchanged.

Text placement mirrors images: a ``<|video|>`` token (the second learnable embedding row, id
``vocab_size + 1``) marks where a video sits; text after it sees that video's aggregated frames, text
before it sees nothing. The aggregated frames play the role of an image's tiles in the masks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from adapters.aggregator import AggregatorConfig, TemporalAggregator
from adapters.cross_attention import CrossAttentionBlock
from adapters.llama import LlamaConfig


@dataclass(frozen=True)
class VideoAdapterConfig:
    """max_frames: most frames per video (paper 64; pre-training uses 16).
    chunk_frames: frames merged into one aggregated frame (paper 32).
    n_latents: tokens per aggregated frame; None = one tile's tokens, so a video frame looks like an image tile.
    depth / ff_mult: perceiver layers and their FFN width multiple.
    every: a video block before every ``every``-th image cross-attention block (paper 4).
    train_image_adapter: False trains only the video adapter on top of a finished image model (the
        encoder, projector and image cross-attention layers are frozen); True trains them too.
    """

    max_frames: int = 64
    chunk_frames: int = 32
    n_latents: int | None = None
    depth: int = 1
    ff_mult: int = 4
    every: int = 4
    train_image_adapter: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_frames <= 64:
            raise ValueError(f"VideoAdapterConfig.max_frames must be in [1, 64], got {self.max_frames}")
        if self.every < 1 or self.chunk_frames < 1:
            raise ValueError("VideoAdapterConfig: every and chunk_frames must be >= 1")


def video_schedule(image_schedule: list[int], every: int) -> list[int]:
    """LM layers before which a video block runs: those of every ``every``-th image block.

    8B (image blocks before layers [3, 7, ..., 31]) -> video blocks before layers [15, 31], each running
    just before that layer's image block; 70B (20 image blocks) -> 5 video blocks.
    """
    return [image_schedule[j] for j in range(every - 1, len(image_schedule), every)]


@dataclass
class VideoBatch:
    """Videos of a batch: tiles (B, V, F, tiles, 3, S, S), layouts (B, V, F, 2), tile_mask (B, V, F, tiles),
    frame_mask (B, V, F) (False: padding or a repeated frame), video_mask (B, V) (False: padding slot).

    ``frame_features`` (B, V, F, tiles * P, D), optional: the projected encoder tokens of every frame,
    precomputed with ``MultimodalLlama.encode_frames`` while the encoder and projector are frozen (the
    paper's video stage), so training steps skip the encoder. When set, the model uses it instead of
    ``tiles``; a trainable encoder would get no gradient through it, and the model refuses that.
    """

    tiles: Tensor
    layouts: Tensor
    tile_mask: Tensor
    frame_mask: Tensor
    video_mask: Tensor
    frame_features: Tensor | None = None

    @classmethod
    def from_collated(cls, batch: dict) -> "VideoBatch":
        return cls(batch["tiles"], batch["layouts"], batch["tile_mask"], batch["frame_mask"], batch["video_mask"],
                   batch.get("frame_features"))

    def trimmed(self) -> "VideoBatch":
        """Drop tile slots no frame uses (one-tile frames encode 1 tile, not max_tiles)."""
        n = max(1, int(self.tile_mask.sum(-1).max()))
        return replace(self, tiles=self.tiles[..., :n, :, :, :], tile_mask=self.tile_mask[..., :n])

    def to(self, device) -> "VideoBatch":
        return VideoBatch(*(None if t is None else t.to(device) for t in (
            self.tiles, self.layouts, self.tile_mask, self.frame_mask, self.video_mask, self.frame_features)))


class VideoAdapter(nn.Module):
    """``aggregator`` + ``cross_attention_layers``; the model wires them into the LM."""

    def __init__(self, cfg: VideoAdapterConfig, lm: LlamaConfig, tokens_per_tile: int, n_blocks: int):
        super().__init__()
        self.cfg = cfg
        self.aggregator = TemporalAggregator(AggregatorConfig(
            dim=lm.dim, n_latents=cfg.n_latents or tokens_per_tile, n_heads=lm.n_heads, n_kv_heads=lm.n_kv_heads,
            chunk_frames=cfg.chunk_frames, depth=cfg.depth, ff_mult=cfg.ff_mult,
        ))
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(lm) for _ in range(n_blocks))

    def aggregate(self, frame_tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
        """frame_tokens (n, F, P, D), token_mask (n, F, P) -> (n, K * L, D) tokens and (n, K) chunk mask."""
        if frame_tokens.shape[1] > self.cfg.max_frames:
            raise ValueError(f"{frame_tokens.shape[1]} frames per video, more than max_frames={self.cfg.max_frames}")
        out, chunk_mask = self.aggregator(frame_tokens, token_mask)
        return out.flatten(1, 2), chunk_mask

    def num_params(self) -> dict[str, int]:
        return {
            "aggregator": sum(p.numel() for p in self.aggregator.parameters()),
            "video_cross_attention": sum(p.numel() for p in self.cross_attention_layers.parameters()),
        }


def frame_token_mask(frame_mask: Tensor, tile_mask: Tensor, tokens_per_tile: int) -> Tensor:
    """(n, F) and (n, F, tiles) bool -> (n, F, tiles * tokens_per_tile): real tokens of real frames."""
    per_tile = frame_mask[..., None] & tile_mask
    return per_tile.repeat_interleave(tokens_per_tile, dim=-1)
