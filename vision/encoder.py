"""The Llama 3 image encoder: an open_clip ViT-H/14 with multi-layer taps and gated global layers.

Llama 3 paper, sec. 7.2 ("Image encoder"): ViT-H/14 (630M params), features also taken from the
"4th, 8th, 16th, 24th and 31st layers", 8 gated self-attention layers on top (40 blocks, ~850M
params), 7680 channels per patch. The maths follows the released Llama 3.2 Vision encoder (Meta
``llama-models`` ``models/llama3/multimodal/model.py``, HF ``MllamaVisionModel`` <= 4.54), quirks
included: padded tiles are encoded, padding is masked only against padding, taps are block *inputs*
and the tap channels are interleaved.

The backbone is built by open_clip (``open_clip.create_model`` for pretrained tags,
``open_clip.model._build_vision_tower`` otherwise) and its modules are reused under their open_clip
names, which are also Meta's (``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
``transformer.resblocks.{i}``, ``ln_post``); the CLIP ``proj`` and pooling are dropped.

All position tables are sized by ``tile_size`` when the encoder is built: the local
``positional_embedding`` is resized by open_clip when a checkpoint of another image size is loaded;
``gated_positional_embedding`` is created at the build size (there is no Meta-style load hook, so a
converter must hand it over at the right size).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import SimpleNamespace

import open_clip
import torch
from open_clip.factory import load_state_dict as open_clip_load_state_dict
from open_clip.model import CLIPVisionCfg, _build_vision_tower, resize_pos_embed
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from common.presets import preset_config
from vision.encoder_layers import (
    GatedTransformer,
    TilePositionEmbedding,
    encoder_attention_mask,
    num_pad_tokens,
    run_block,
    tile_grid_index,
    use_masked_attention,
)


@dataclass(frozen=True)
class VisionEncoderConfig:
    """Defaults are the paper's ViT-H/14 at 336 px tiles (released checkpoints: 448 base, 560 instruct).

    open_clip_model: open_clip architecture name whose vision tower is used; None builds a tower from
        the fields below (tiny test models). Named towers must agree with width/layers/heads/...
    pretrained: an open_clip pretrained tag (downloaded by open_clip) or a local checkpoint path
        (state dict of a full open_clip CLIP model or of its visual tower); None = random init.
    taps: 0-based indices of the blocks whose *input* is tapped (see ``VisionEncoder``).
    attn_bias: attention biases in every block (``attn.in_proj_bias``, ``attn.out_proj.bias``), as open_clip
        builds them; False builds the blocks without them, the layout of Meta's and HF's Mllama towers
        (loaded from those checkpoints so; an HF export needs it or all-zero biases). A ``pretrained``
        backbone with non-zero biases cannot be loaded with False.
    """

    open_clip_model: str | None = "ViT-H-14"
    pretrained: str | None = None
    width: int = 1280
    layers: int = 32
    heads: int = 16
    patch_size: int = 14
    mlp_ratio: float = 4.0
    tile_size: int = 336
    max_tiles: int = 4
    taps: tuple[int, ...] = (3, 7, 15, 23, 30)
    n_global_layers: int = 8
    pad_to_multiple: int = 8
    attn_bias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))  # YAML gives lists
        if self.width % self.heads:
            raise ValueError(f"VisionEncoderConfig: width {self.width} not divisible by heads {self.heads}")
        if self.tile_size % self.patch_size:
            raise ValueError(f"VisionEncoderConfig: tile_size {self.tile_size} not a multiple of "
                             f"patch_size {self.patch_size}")
        if list(self.taps) != sorted(set(self.taps)) or not all(0 <= t < self.layers for t in self.taps):
            raise ValueError(f"VisionEncoderConfig: taps {self.taps} must be increasing block indices "
                             f"< layers ({self.layers})")
        if self.max_tiles < 1 or self.pad_to_multiple < 1:
            raise ValueError("VisionEncoderConfig: max_tiles and pad_to_multiple must be >= 1")

    @property
    def grid_size(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Tokens per tile, CLS included: 577 at 336 px, 1025 at 448, 1601 at 560."""
        return self.grid_size**2 + 1

    @property
    def out_dim(self) -> int:
        """Final output plus one ``width`` block per tap: 6 x 1280 = 7680 for ViT-H/14."""
        return self.width * (1 + len(self.taps))


VISION_PRESETS: dict[str, VisionEncoderConfig] = {
    "vit_h14": VisionEncoderConfig(),
    # Same shape of model in miniature: 8 blocks with taps spread like 3/7/15/23/30 of 32, 2 global.
    "tiny": VisionEncoderConfig(
        open_clip_model=None, width=64, layers=8, heads=4, patch_size=14, tile_size=56,
        taps=(1, 3, 5, 6, 7), n_global_layers=2,
    ),
}


def vision_config(name: str, **overrides) -> VisionEncoderConfig:
    """A preset with overrides; an unknown field raises ``TypeError``."""
    return preset_config(VISION_PRESETS, name, "vision", **overrides)


# ----------------------------------------------------------------------------------------------
# Backbone (open_clip)


def _tower_cfg(cfg: VisionEncoderConfig) -> tuple[int, CLIPVisionCfg, bool]:
    """(embed_dim, vision cfg, quick_gelu) for open_clip's ``_build_vision_tower``, image size = tile size."""
    expected = dict(width=cfg.width, layers=cfg.layers, head_width=cfg.width // cfg.heads,
                    patch_size=cfg.patch_size, mlp_ratio=cfg.mlp_ratio)
    if cfg.open_clip_model is None:
        # embed_dim only sizes the CLIP projection, which the encoder drops.
        return cfg.width, CLIPVisionCfg(**expected, image_size=cfg.tile_size), False
    model_cfg = open_clip.get_model_config(cfg.open_clip_model)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config {cfg.open_clip_model!r}")
    vision_cfg = dict(model_cfg["vision_cfg"])
    defaults = CLIPVisionCfg()
    for key, value in expected.items():
        if vision_cfg.get(key, getattr(defaults, key)) != value:
            raise ValueError(f"VisionEncoderConfig {key}={value} disagrees with open_clip "
                             f"{cfg.open_clip_model!r} ({vision_cfg.get(key, getattr(defaults, key))})")
    vision_cfg["image_size"] = cfg.tile_size
    return model_cfg["embed_dim"], CLIPVisionCfg(**vision_cfg), model_cfg.get("quick_gelu", False)


def load_backbone_checkpoint(tower: VisionTransformer, path: str) -> None:
    """Load a local open_clip checkpoint (full CLIP or visual tower) into ``tower``, strictly.

    The positional embedding is resized to the tower's grid with open_clip's own ``resize_pos_embed``
    (bicubic), as ``open_clip.create_model(..., force_image_size=...)`` does.
    """
    state = open_clip_load_state_dict(path, weights_only=True)
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if tower.proj is None:
        state.pop("proj", None)  # the CLIP projection (any embed_dim) is not used by the encoder
    if "positional_embedding" in state:
        # resize_pos_embed speaks the CLIP layout: a "visual." key and a model with .visual.grid_size.
        clip_view = {"visual.positional_embedding": state["positional_embedding"]}
        resize_pos_embed(clip_view, SimpleNamespace(visual=tower))
        state["positional_embedding"] = clip_view["visual.positional_embedding"]
    tower.load_state_dict(state, strict=True)


def build_backbone(cfg: VisionEncoderConfig) -> VisionTransformer:
    """The open_clip vision tower for ``cfg`` at ``tile_size`` (weights when ``cfg.pretrained`` is set)."""
    if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
        if cfg.open_clip_model is None:
            raise ValueError(f"pretrained={cfg.pretrained!r} is not a file, and a tag needs open_clip_model")
        # A tag: open_clip resolves and caches it and resizes the position table to force_image_size.
        tower = open_clip.create_model(
            cfg.open_clip_model, pretrained=cfg.pretrained, force_image_size=cfg.tile_size
        ).visual
        tower.proj = None
    else:
        # The factory CLIP itself uses; unlike create_model it builds no text tower and works on meta.
        embed_dim, vision_cfg, quick_gelu = _tower_cfg(cfg)
        tower = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
        tower.proj = None  # as open_clip's prune_intermediate_layers(prune_head=True)
        if cfg.pretrained is not None:
            load_backbone_checkpoint(tower, cfg.pretrained)
    _check_backbone(tower, cfg)
    if not cfg.attn_bias and cfg.pretrained is not None:
        _check_zero_attn_biases(tower, cfg.pretrained)
    return tower


def _check_zero_attn_biases(tower: VisionTransformer, source: str) -> None:
    """Loaded weights whose attention biases ``attn_bias=False`` would drop must be zero (as in Mllama's)."""
    for i, blk in enumerate(tower.transformer.resblocks):
        for name in ("attn.in_proj_bias", "attn.out_proj.bias"):
            bias = blk.get_parameter(name)
            if bias.device.type != "meta" and bias.any():
                raise ValueError(f"pretrained {source!r}: transformer.resblocks.{i}.{name} is non-zero, and "
                                 f"attn_bias=False builds no attention biases (keep attn_bias true for this tower)")


def _check_backbone(tower: nn.Module, cfg: VisionEncoderConfig) -> None:
    if not isinstance(tower, VisionTransformer):
        raise ValueError(f"expected an open_clip VisionTransformer, got {type(tower).__name__}")
    blocks = tower.transformer.resblocks
    got = (tower.conv1.out_channels, len(blocks), blocks[0].attn.num_heads,
           tower.positional_embedding.shape[0])
    want = (cfg.width, cfg.layers, cfg.heads, cfg.n_tokens)
    if got != want:
        raise ValueError(f"open_clip tower (width, layers, heads, tokens) = {got}, config says {want}")
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise ValueError("only open_clip's default ResidualAttentionBlock is supported")


# ----------------------------------------------------------------------------------------------
# Encoder


class VisionEncoder(nn.Module):
    """Tiles of one or more images -> (final | taps) features per patch, as in Llama 3.2 Vision.

    Per image (all its tiles form ONE attention sequence of T * L tokens, L = N + pad):
    conv1 patches -> + pre-tile embedding -> prepend CLS -> + gated positional embedding
    ``(1 - tanh g) * local + tanh g * global[row, col]`` -> ln_pre -> pad each tile to a multiple of
    ``pad_to_multiple`` -> ``layers`` open_clip blocks (taps collected) -> ln_post -> + post-tile
    embedding -> ``n_global_layers`` gated blocks -> strip padding -> concat.

    Taps: ``taps = (k, ...)`` records the *input* of 0-based block k, i.e. the output of the k-th
    block counted from 1 (0-based block k-1), before ``ln_post``. The release uses (3, 7, 15, 23, 30),
    which is the paper's "4th, 8th, 16th, 24th and 31st layers" if "the n-th layer" means the input
    of the n-th block (1-based n = k + 1); reading it as the n-th block's output would give
    (4, 8, 16, 24, 31), one block later. (HF transformers >= 4.56 takes block outputs, i.e. one block
    later than Meta; 4.54 matches Meta.)

    Output channels: ``cat([final, stack(taps, -1).flatten(-2)], -1)``, so the tap part is
    interleaved (channel c of every tap adjacent), as released; projector weights depend on it.

    Attention mask: the release's (see ``encoder_attention_mask``): only padding x padding pairs are
    masked, so real tokens also attend to padded tiles and pad tokens.
    """

    def __init__(self, cfg: VisionEncoderConfig, backbone: VisionTransformer):
        super().__init__()
        self.cfg = cfg
        # open_clip modules under open_clip's (= Meta's) names; proj and pooling are not used.
        self.conv1 = backbone.conv1
        self.class_embedding = backbone.class_embedding
        self.positional_embedding = backbone.positional_embedding  # the "local" table, (N, D)
        self.ln_pre = backbone.ln_pre
        self.transformer = backbone.transformer
        self.ln_post = backbone.ln_post
        for blk in self.transformer.resblocks:
            use_masked_attention(blk, cfg.attn_bias)  # per-image (B, 1, L, L) masks; same parameters

        T, N, D = cfg.max_tiles, cfg.n_tokens, cfg.width
        self.pre_tile_pos_embed = TilePositionEmbedding(T, D)
        self.post_tile_pos_embed = TilePositionEmbedding(T, D)
        self.gated_positional_embedding = nn.Parameter(D**-0.5 * torch.randn(T, T, N, D))
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.global_transformer = GatedTransformer(D, cfg.n_global_layers, cfg.heads, cfg.mlp_ratio, cfg.attn_bias)

    def forward(self, tiles: Tensor, layout: Tensor, tile_mask: Tensor) -> Tensor:
        """tiles: (B, T, 3, S, S) with T <= max_tiles and S = tile_size; layout: (B, 2) long
        (rows, cols), the image fills the first rows*cols tile slots row-major; tile_mask: (B, T) bool,
        True exactly for those slots. Returns (B, T, N, out_dim), N = (S / patch)^2 + 1 (CLS first).
        Padded tiles are encoded too (as released); callers mask them downstream.
        """
        B, T, _, H, W = tiles.shape
        cfg = self.cfg
        if T > cfg.max_tiles or H != cfg.tile_size or W != cfg.tile_size:
            raise ValueError(f"tiles {tuple(tiles.shape)} do not fit max_tiles={cfg.max_tiles}, "
                             f"tile_size={cfg.tile_size}")
        if layout.shape != (B, 2) or tile_mask.shape != (B, T):
            raise ValueError(f"layout {tuple(layout.shape)} / tile_mask {tuple(tile_mask.shape)}, "
                             f"expected ({B}, 2) / ({B}, {T})")

        x = self.conv1(tiles.flatten(0, 1).to(self.conv1.weight.dtype))  # (B*T, D, g, g)
        D = x.shape[1]
        x = x.flatten(2).transpose(1, 2).reshape(B, T, -1, D)
        x = self.pre_tile_pos_embed(x, layout)
        cls = self.class_embedding.to(x.dtype).expand(B, T, 1, D)
        x = torch.cat([cls, x], dim=2)  # (B, T, N, D)
        x = self._add_positional_embedding(x, layout)
        x = self.ln_pre(x)

        N = x.shape[2]
        n_pad = num_pad_tokens(N, cfg.pad_to_multiple)
        L = N + n_pad
        x = nn.functional.pad(x, (0, 0, 0, n_pad)).reshape(B, T * L, D)
        mask = encoder_attention_mask(tile_mask, N, n_pad, x.dtype)

        taps = []
        for idx, blk in enumerate(self.transformer.resblocks):
            if idx in cfg.taps:
                taps.append(x)  # input of block idx (see class docstring)
            x = run_block(blk, x, mask, self.transformer.grad_checkpointing)
        x = self.ln_post(x)

        x = self.post_tile_pos_embed(x.view(B, T, L, D), layout)
        x = self.global_transformer(x.view(B, T * L, D), mask)
        x = x.view(B, T, L, D)[:, :, :N]
        tapped = torch.stack(taps, dim=-1).view(B, T, L, D * len(taps))[:, :, :N]
        return torch.cat([x, tapped], dim=-1)

    def _add_positional_embedding(self, x: Tensor, layout: Tensor) -> Tensor:
        """x: (B, T, N, D). Local table scaled by 1 - tanh(g) on every tile, global table indexed by
        the tile's grid cell and scaled by tanh(g) on real tiles (Meta ``apply_positional_embedding``)."""
        gate = self.gated_positional_embedding_gate.tanh()
        row, col, valid = tile_grid_index(layout, x.shape[1])
        global_pos = self.gated_positional_embedding[row, col] * valid[..., None, None]  # (B, T, N, D)
        x = x + (self.positional_embedding * (1 - gate)).to(x.dtype)
        return x + (global_pos * gate).to(x.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        self.global_transformer.grad_checkpointing = enable

    def freeze(self) -> VisionEncoder:
        """Eval mode and no gradients for the whole tower (backbone, global layers, embeddings)."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        # A frozen tower stays in eval mode when a parent module calls .train().
        frozen = not any(p.requires_grad for p in self.parameters())
        return super().train(mode and not frozen)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts: open_clip backbone, gated global layers, tile/gated position tables."""
        global_layers = sum(p.numel() for p in self.global_transformer.parameters())
        tile_params = [*self.pre_tile_pos_embed.parameters(), *self.post_tile_pos_embed.parameters(),
                       self.gated_positional_embedding, self.gated_positional_embedding_gate]
        tile_tables = sum(p.numel() for p in tile_params)
        total = self.num_params()
        return {"backbone": total - global_layers - tile_tables, "global_layers": global_layers,
                "tile_tables": tile_tables, "total": total}


class VisionProjector(nn.Linear):
    """Single linear layer from the encoder's ``out_dim`` to the LM width, with bias.

    Meta ``vision_projection`` (ColumnParallelLinear(7680, dim, bias=True)), HF ``multi_modal_projector``:
    used as an attribute named ``vision_projection`` its keys are ``vision_projection.{weight,bias}``.
    (B, T, N, in_dim) -> (B, T, N, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, bias=True)


def build_vision_encoder(
    cfg: VisionEncoderConfig | str, device: torch.device | str | None = None
) -> VisionEncoder:
    """Build the encoder through open_clip's factories; ``device="meta"`` gives a shape-only model."""
    if isinstance(cfg, str):
        cfg = vision_config(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return VisionEncoder(cfg, build_backbone(cfg))
