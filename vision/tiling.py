"""Variable-resolution tiling of an image into up to `max_tiles` square tiles (Llama 3 paper sec. 7.2.1).

This is the released Llama 3.2 Vision transform: Meta's `VariableSizeImageTransform` and HF's
`MllamaImageProcessor` compute the same thing (notes/mllama.md sec. 1.6):
  1. candidate canvases = every (rows, cols) grid with rows * cols <= max_tiles, times tile_size;
  2. pick the canvas needing the least upscaling (or, if none fits, the least downscaling);
     ties go to the smallest canvas area;
  3. resize without distortion (bilinear), upscaling small images only until a side reaches one tile;
  4. pad bottom/right with black pixels, BEFORE normalisation (so padding becomes -mean/std);
  5. rescale to [0, 1] and normalise with the CLIP constants;
  6. split row-major: tile index = row * cols + col.
Layouts are (rows, cols) = (tiles down, tiles across), HF's `aspect_ratio` order; their position in
`supported_layouts` + 1 is HF's `aspect_ratio_id` (0 = padding image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from media.image import to_rgb

# OpenAI CLIP normalisation, used by the released Llama 3.2 Vision preprocessor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class TilingError(ValueError):
    """Bad input to the tiling transform or to `collate_tiled`; the message names the field."""


@dataclass
class TilingConfig:
    """How images become tiles.

    tile_size: side S of a square tile in pixels (paper: 336; released 11B base 448, instruct 560).
    max_tiles: most tiles per image (4 in the paper and the release).
    mean, std: per-channel normalisation applied after rescaling to [0, 1].
    resample: PIL filter name for the resize: nearest, bilinear, bicubic, lanczos, box, hamming.
    """

    tile_size: int = 336
    max_tiles: int = 4
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if not isinstance(self.tile_size, int) or self.tile_size < 1:
            raise TilingError(f"tile_size: must be a positive int, got {self.tile_size!r}")
        if not isinstance(self.max_tiles, int) or self.max_tiles < 1:
            raise TilingError(f"max_tiles: must be a positive int, got {self.max_tiles!r}")
        self.mean = tuple(float(m) for m in self.mean)  # YAML gives lists
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise TilingError(f"mean/std: need 3 values each, got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise TilingError(f"std: must be positive, got {self.std}")
        if self.resample not in _RESAMPLE:
            raise TilingError(f"resample: must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")


@dataclass
class TiledImage:
    """One image after `tile_image`.

    tiles: (max_tiles, 3, S, S) float32, normalised; slots past rows * cols are zero.
    layout: (rows, cols) of the tile grid; rows * cols <= max_tiles.
    tile_mask: (max_tiles,) bool, True for the rows * cols real tiles (the first ones).
    resized_size: (width, height) of the image after resizing, before padding (PIL order).
    """

    tiles: torch.Tensor
    layout: tuple[int, int]
    tile_mask: torch.Tensor
    resized_size: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return self.layout[0] * self.layout[1]


@lru_cache(maxsize=16)
def _layouts(max_tiles: int) -> tuple[tuple[int, int], ...]:
    # Same loop order as HF get_all_supported_aspect_ratios: it fixes the aspect_ratio_id numbering
    # that the released tile position-embedding tables are indexed by.
    return tuple(
        (rows, cols)
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
        if rows * cols <= max_tiles
    )


def supported_layouts(max_tiles: int) -> list[tuple[int, int]]:
    """All (rows, cols) grids with rows * cols <= max_tiles, in HF order.

    For 4: [(1,1), (1,2), (1,3), (1,4), (2,1), (2,2), (3,1), (4,1)].
    """
    if max_tiles < 1:
        raise TilingError(f"max_tiles: must be >= 1, got {max_tiles}")
    return list(_layouts(max_tiles))


def layout_id(layout: tuple[int, int], max_tiles: int) -> int:
    """1-based index of `layout` in `supported_layouts(max_tiles)` (HF `aspect_ratio_id`; 0 = padding)."""
    layouts = _layouts(max_tiles)
    key = (int(layout[0]), int(layout[1]))
    if key not in layouts:
        raise TilingError(f"layout: {key} is not a supported (rows, cols) grid for max_tiles={max_tiles}")
    return layouts.index(key) + 1


def best_layout(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The (rows, cols) canvas the released transform picks for a width x height image.

    scale(canvas) = min(canvas_w / width, canvas_h / height) is the largest distortion-free resize
    factor. If some canvas admits scale >= 1 take the smallest such scale (least upscaling, so a
    small image is not blown up across many tiles); else the largest scale (least downscaling).
    Ties (e.g. a wide image fits 1x2 and 2x2 at the same scale) go to the smallest canvas area, and
    then to the first in `supported_layouts` order. Float64 arithmetic and exact equality, as HF.
    """
    if width < 1 or height < 1:
        raise TilingError(f"image size: width and height must be >= 1, got {width}x{height}")
    layouts = _layouts(max_tiles)
    scales = []
    for rows, cols in layouts:
        scale_h = rows * tile_size / height
        scale_w = cols * tile_size / width
        scales.append(min(scale_w, scale_h))  # the limiting side: resize without distortion
    upscaling = [s for s in scales if s >= 1]
    selected = min(upscaling) if upscaling else max(scales)
    best, best_area = None, None
    for (rows, cols), scale in zip(layouts, scales, strict=True):
        if scale == selected:
            area = rows * cols
            if best_area is None or area < best_area:
                best, best_area = (rows, cols), area
    assert best is not None
    return best


def fit_size(
    width: int, height: int, canvas_width: int, canvas_height: int, tile_size: int
) -> tuple[int, int]:
    """Resize target (new_width, new_height) that fits the canvas without distortion.

    As HF `get_image_size_fit_to_canvas`: each side's target is clip(side, tile_size, canvas_side),
    so small images are upscaled only until a side reaches one tile and images already inside the
    canvas keep their size; the limiting side is fitted exactly and the other floored (min 1 px).
    """
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        new_w = target_w
        new_h = min(math.floor(height * scale_w) or 1, target_h)
    else:
        new_h = target_h
        new_w = min(math.floor(width * scale_h) or 1, target_w)
    return new_w, new_h


def tile_image(img: Image.Image, cfg: TilingConfig) -> TiledImage:
    """Resize, pad, normalise and split one PIL image into tiles.

    Non-RGB images are converted with `media.image.to_rgb` (white behind transparency).

    Returns:
        TiledImage with tiles (cfg.max_tiles, 3, S, S) float32, S = cfg.tile_size.
    """
    if not isinstance(img, Image.Image):
        raise TilingError(f"img: expected a PIL.Image.Image, got {type(img).__name__}")
    img = to_rgb(img)
    S = cfg.tile_size
    width, height = img.size
    rows, cols = best_layout(width, height, S, cfg.max_tiles)
    new_w, new_h = fit_size(width, height, cols * S, rows * S, S)
    resized = img.resize((new_w, new_h), resample=_RESAMPLE[cfg.resample])

    # Pad with black in uint8 space first (Meta pastes onto an RGB (0,0,0) canvas; HF pads 0 before
    # rescaling), so padding normalises to -mean/std exactly as in the released model's inputs.
    canvas = torch.zeros(3, rows * S, cols * S, dtype=torch.uint8)
    canvas[:, :new_h, :new_w] = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)

    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    pixels = (canvas.to(torch.float32) / 255.0 - mean) / std

    # (3, rows*S, cols*S) -> (rows, cols, 3, S, S) -> (rows*cols, 3, S, S), row-major tile order.
    grid = pixels.view(3, rows, S, cols, S).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, S, S)
    tiles = torch.zeros(cfg.max_tiles, 3, S, S, dtype=torch.float32)
    tiles[: rows * cols] = grid
    tile_mask = torch.zeros(cfg.max_tiles, dtype=torch.bool)
    tile_mask[: rows * cols] = True
    return TiledImage(tiles=tiles, layout=(rows, cols), tile_mask=tile_mask, resized_size=(new_w, new_h))


def _check_image(item: object, where: str, ref_shape: tuple[int, ...] | None) -> TiledImage:
    if not isinstance(item, TiledImage):
        raise TilingError(f"{where}: expected a TiledImage, got {type(item).__name__}")
    tiles = item.tiles
    if not isinstance(tiles, torch.Tensor) or tiles.dim() != 4 or tiles.shape[1] != 3:
        shape = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
        raise TilingError(f"tiles: {where} has shape {shape}, expected (max_tiles, 3, S, S)")
    if not tiles.is_floating_point():
        raise TilingError(f"tiles: {where} has dtype {tiles.dtype}, expected a float tensor")
    if tiles.shape[2] != tiles.shape[3]:
        raise TilingError(f"tiles: {where} tiles are {tiles.shape[2]}x{tiles.shape[3]}, expected square")
    if ref_shape is not None and tuple(tiles.shape) != ref_shape:
        raise TilingError(
            f"tiles: {where} has shape {tuple(tiles.shape)} but the first image has {ref_shape}; "
            "all images in a batch need the same tile_size and max_tiles"
        )
    max_tiles = tiles.shape[0]
    rows, cols = item.layout
    if rows < 1 or cols < 1 or rows * cols > max_tiles:
        raise TilingError(f"layout: {where} has layout {item.layout}, invalid for max_tiles={max_tiles}")
    mask = item.tile_mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (max_tiles,):
        raise TilingError(f"tile_mask: {where} must be a bool tensor of shape ({max_tiles},)")
    if int(mask.sum()) != rows * cols or not bool(mask[: rows * cols].all()):
        raise TilingError(
            f"tile_mask: {where} does not mark exactly the first {rows * cols} tiles of layout {item.layout}"
        )
    return item


def collate_tiled(
    batch: Sequence[Sequence[TiledImage]],
    *,
    max_images: int | None = None,
    cfg: TilingConfig | None = None,
) -> dict[str, torch.Tensor]:
    """Pack per-sample lists of tiled images into padded batch tensors.

    Args:
        batch: B lists, one per sample, each with that sample's images in prompt order; an empty
            list is a text-only sample.
        max_images: pad the image axis to this many slots (default: the most in any sample).
        cfg: needed only to shape an all-text batch; if given, images must match its tile size.

    Returns:
        tiles: (B, N, max_tiles, 3, S, S) float32, zero for padding tiles and padding images.
        layouts: (B, N, 2) long (rows, cols); padding images get (1, 1), as Meta pads them.
        layout_ids: (B, N) long, HF aspect_ratio_ids (1-based in `supported_layouts`), 0 for padding.
        tile_mask: (B, N, max_tiles) bool, True for real tiles of real images. Padding images are
            all False (HF's aspect_ratio_mask sets their tile 0 to 1; reproduce that from layouts).
        image_mask: (B, N) bool, True for real image slots.
    """
    if isinstance(batch, TiledImage) or not isinstance(batch, Sequence):
        raise TilingError(
            f"batch: expected a list of per-sample lists of TiledImage, got {type(batch).__name__}"
        )
    for i, sample in enumerate(batch):
        if isinstance(sample, TiledImage) or not isinstance(sample, Sequence):
            raise TilingError(
                f"batch: sample {i} is a {type(sample).__name__}, expected a list of TiledImage "
                "(wrap a single image per sample as [[img_a], [img_b]])"
            )
    B = len(batch)
    if B == 0:
        raise TilingError("batch: empty batch")
    most = max(len(sample) for sample in batch)
    if max_images is None:
        n_slots = most
    elif most > max_images:
        raise TilingError(f"max_images: a sample has {most} images, more than max_images={max_images}")
    else:
        n_slots = max_images

    ref_shape = None if cfg is None else (cfg.max_tiles, 3, cfg.tile_size, cfg.tile_size)
    for i, sample in enumerate(batch):
        for j, item in enumerate(sample):
            _check_image(item, f"sample {i} image {j}", ref_shape)
            ref_shape = tuple(item.tiles.shape)
    if ref_shape is None:
        raise TilingError("cfg: the batch has no images; pass cfg so the tile tensor can be shaped")
    max_tiles, _, S, _ = ref_shape

    dtypes = {item.tiles.dtype for sample in batch for item in sample}
    if len(dtypes) > 1:
        raise TilingError(f"tiles: images in the batch have mixed dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop() if dtypes else torch.float32
    tiles = torch.zeros(B, n_slots, max_tiles, 3, S, S, dtype=dtype)
    layouts = torch.ones(B, n_slots, 2, dtype=torch.long)
    layout_ids = torch.zeros(B, n_slots, dtype=torch.long)
    tile_mask = torch.zeros(B, n_slots, max_tiles, dtype=torch.bool)
    image_mask = torch.zeros(B, n_slots, dtype=torch.bool)
    for i, sample in enumerate(batch):
        for j, item in enumerate(sample):
            tiles[i, j] = item.tiles
            layouts[i, j] = torch.tensor(item.layout, dtype=torch.long)
            layout_ids[i, j] = layout_id(item.layout, max_tiles)
            tile_mask[i, j] = item.tile_mask
            image_mask[i, j] = True
    return {
        "tiles": tiles,
        "layouts": layouts,
        "layout_ids": layout_ids,
        "tile_mask": tile_mask,
        "image_mask": image_mask,
    }


def box_to_tiles(
    box_xyxy: Sequence[float], width: int, height: int, cfg: TilingConfig
) -> list[tuple[int, tuple[float, float, float, float]]]:
    """Where a box of a width x height image lands after `tile_image`: [(tile_index, box in that tile)].

    Boxes are (x1, y1, x2, y2) in pixel-edge coordinates (pixel i spans [i, i + 1); a box over the whole
    image is (0, 0, width, height)). Follows `tile_image` step for step: the same `best_layout` and
    `fit_size`, so the resize maps x -> x * new_w / width and y -> y * new_h / height; the padding is
    bottom/right, so nothing shifts; then the row-major split. Each tile the box overlaps with positive
    area gets the box clipped to it, in that tile's pixel coordinates (0..S), in tile-index order.
    """
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise TilingError(f"box: {tuple(box_xyxy)} is not a positive-area box inside the {width}x{height} image")
    S = cfg.tile_size
    rows, cols = best_layout(width, height, S, cfg.max_tiles)
    new_w, new_h = fit_size(width, height, cols * S, rows * S, S)
    sx, sy = new_w / width, new_h / height
    rx1, ry1, rx2, ry2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
    out = []
    for row in range(rows):
        for col in range(cols):
            ox, oy = col * S, row * S
            cx1, cy1 = max(rx1, ox), max(ry1, oy)
            cx2, cy2 = min(rx2, ox + S), min(ry2, oy + S)
            if cx2 > cx1 and cy2 > cy1:
                out.append((row * cols + col, (cx1 - ox, cy1 - oy, cx2 - ox, cy2 - oy)))
    return out


def tile_box_to_image(
    tile_index: int, box_xyxy: Sequence[float], width: int, height: int, cfg: TilingConfig
) -> tuple[float, float, float, float]:
    """`box_to_tiles`' inverse for one tile: a box in tile ``tile_index``'s pixel coordinates -> the same box
    in the original width x height image (a model's box on one tile, mapped back). Parts over the padding
    map past the image's right / bottom edge; clip them if the caller needs a box inside the image."""
    S = cfg.tile_size
    rows, cols = best_layout(width, height, S, cfg.max_tiles)
    if not 0 <= tile_index < rows * cols:
        raise TilingError(f"tile_index: {tile_index} is not one of the {rows * cols} tiles of layout {(rows, cols)}")
    new_w, new_h = fit_size(width, height, cols * S, rows * S, S)
    oy, ox = divmod(tile_index, cols)
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    return ((x1 + ox * S) * width / new_w, (y1 + oy * S) * height / new_h,
            (x2 + ox * S) * width / new_w, (y2 + oy * S) * height / new_h)
