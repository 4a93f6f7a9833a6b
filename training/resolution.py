"""Changing the per-tile resolution of a trained image model (stage-2 annealing, Llama 3 sec. 7.4).

The encoder's position tables are sized by ``tile_size`` at build time: the local table (N, D) and the
gated global table (T, T, N, D), N = (tile_size / patch)^2 + 1 with the CLS position first. Going from
336 to 448 px tiles (or the tiny preset's 56 to 84) interpolates the patch-grid part of both tables
bicubically and keeps CLS, as open_clip's ``resize_pos_embed`` does for the local table on checkpoint
load. ``vision/encoder.py`` has no helper for the gated table (its docstring says a converter must hand
it over at the right size), hence this module. Everything else in the model is resolution-free.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.multimodal import MultimodalLlama

POSITION_TABLES = ("vision.positional_embedding", "vision.gated_positional_embedding")


def resize_grid_tokens(table: Tensor, new_grid: int) -> Tensor:
    """(..., 1 + g*g, D) -> (..., 1 + new_grid^2, D): bicubic over the g x g patch grid, CLS kept."""
    *lead, N, D = table.shape
    g = math.isqrt(N - 1)
    if g * g != N - 1:
        raise ValueError(f"position table with {N} tokens is not CLS + a square grid")
    if g == new_grid:
        return table
    cls, grid = table[..., :1, :], table[..., 1:, :]
    x = grid.reshape(-1, g, g, D).permute(0, 3, 1, 2).float()  # (L, D, g, g)
    x = F.interpolate(x, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(*lead, new_grid * new_grid, D).to(table.dtype)
    return torch.cat([cls, x], dim=-2)


def with_tile_size(model: MultimodalLlama, tile_size: int) -> MultimodalLlama:
    """A copy of ``model`` at ``tile_size`` pixels per tile (same LM object, interpolated position tables)."""
    old = model.cfg.vision
    if tile_size == old.tile_size:
        return model
    vision = replace(old, tile_size=tile_size, pretrained=None)  # weights come from ``model``, not a file
    cfg = replace(model.cfg, vision=vision)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("lm.")}
    for name in POSITION_TABLES:
        sd[name] = resize_grid_tokens(sd[name], vision.grid_size)
    out = MultimodalLlama(cfg, model.lm)
    missing, unexpected = out.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("lm.") for k in missing):
        raise RuntimeError(f"resizing to {tile_size} px tiles: missing {missing}, unexpected {unexpected}")
    return out
