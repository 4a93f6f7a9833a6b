"""Sampled frames -> model tensors: every frame goes through the image tiling transform.

One tile per frame by default (``TilingConfig(max_tiles=1)``: the frame is resized to fit one tile,
aspect ratio kept, padded black); ``max_tiles`` > 1 tiles frames like images. Frames that repeat an
earlier one (short videos, ``frame_mask`` False) are not tiled: their slots stay zero and the model
neither encodes nor attends to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from media.video import SampledFrames
from vision.tiling import TilingConfig, TilingError, layout_id, tile_image


def video_tiling(tile_size: int, max_tiles: int = 1, **kw) -> TilingConfig:
    return TilingConfig(tile_size=tile_size, max_tiles=max_tiles, **kw)


@dataclass
class TiledVideo:
    """tiles (F, max_tiles, 3, S, S) float32; layouts (F, 2); tile_mask (F, max_tiles); frame_mask (F,)."""

    tiles: torch.Tensor
    layouts: torch.Tensor
    tile_mask: torch.Tensor
    frame_mask: torch.Tensor

    @property
    def num_frames(self) -> int:
        return self.tiles.shape[0]


def tile_frames(frames: np.ndarray | SampledFrames, cfg: TilingConfig, frame_mask: np.ndarray | None = None) -> TiledVideo:
    """frames (F, H, W, 3) uint8 (or a reader result, whose mask is used) -> TiledVideo."""
    if isinstance(frames, SampledFrames):
        frames, frame_mask = frames.frames, frames.frame_mask if frame_mask is None else frame_mask
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        desc = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise TilingError(f"frames: expected a uint8 array (F, H, W, 3), got {desc}")
    n = frames.shape[0]
    mask = np.ones(n, dtype=bool) if frame_mask is None else np.asarray(frame_mask, dtype=bool)
    if mask.shape != (n,) or not mask.any():
        raise TilingError(f"frame_mask: expected ({n},) bool with at least one True, got shape {mask.shape}")
    S, T = cfg.tile_size, cfg.max_tiles
    tiles = torch.zeros(n, T, 3, S, S)
    layouts = torch.ones(n, 2, dtype=torch.long)
    tile_mask = torch.zeros(n, T, dtype=torch.bool)
    for i in np.flatnonzero(mask):
        t = tile_image(Image.fromarray(frames[i]), cfg)
        tiles[i], layouts[i], tile_mask[i] = t.tiles, torch.tensor(t.layout), t.tile_mask
    return TiledVideo(tiles, layouts, tile_mask, torch.from_numpy(mask.copy()))


def collate_videos(batch: Sequence[Sequence[TiledVideo]], max_videos: int | None = None) -> dict[str, torch.Tensor]:
    """B lists of videos (in prompt order) -> padded tensors.

    tiles (B, V, F, max_tiles, 3, S, S), layouts (B, V, F, 2), layout_ids (B, V, F), tile_mask (B, V, F, max_tiles),
    frame_mask (B, V, F), video_mask (B, V). F is the most frames of any video; shorter videos are
    padded with masked frames.
    """
    if not batch or any(isinstance(s, TiledVideo) or not isinstance(s, Sequence) for s in batch):
        raise TilingError("batch: expected a non-empty list of per-sample lists of TiledVideo")
    videos = [v for s in batch for v in s]
    if not videos:
        raise TilingError("batch: no video in the batch")
    shapes = {tuple(v.tiles.shape[1:]) for v in videos}
    if len(shapes) > 1:
        raise TilingError(f"tiles: videos in the batch have different tile shapes {sorted(shapes)}")
    most = max(len(s) for s in batch)
    V = most if max_videos is None else max_videos
    if most > V:
        raise TilingError(f"max_videos: a sample has {most} videos, more than max_videos={V}")
    F_ = max(v.num_frames for v in videos)
    T, _, S, _ = shapes.pop()
    B = len(batch)
    out = {
        "tiles": torch.zeros(B, V, F_, T, 3, S, S),
        "layouts": torch.ones(B, V, F_, 2, dtype=torch.long),
        "layout_ids": torch.zeros(B, V, F_, dtype=torch.long),
        "tile_mask": torch.zeros(B, V, F_, T, dtype=torch.bool),
        "frame_mask": torch.zeros(B, V, F_, dtype=torch.bool),
        "video_mask": torch.zeros(B, V, dtype=torch.bool),
    }
    for b, sample in enumerate(batch):
        for j, v in enumerate(sample):
            n = v.num_frames
            out["tiles"][b, j, :n] = v.tiles
            out["layouts"][b, j, :n] = v.layouts
            out["layout_ids"][b, j, :n] = torch.tensor([layout_id(tuple(lay), T) for lay in v.layouts.tolist()])
            out["tile_mask"][b, j, :n] = v.tile_mask
            out["frame_mask"][b, j, :n] = v.frame_mask
            out["video_mask"][b, j] = True
    return out
