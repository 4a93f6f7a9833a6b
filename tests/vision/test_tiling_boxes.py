"""box_to_tiles follows tile_image: a filled box drawn on an image lands, after tiling, exactly where box_to_tiles
says (checked on the de-normalised tile pixels) for several sizes and layouts; tile_box_to_image maps it back."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vision.tiling import TilingConfig, TilingError, box_to_tiles, tile_box_to_image, tile_image

RED = (255, 0, 0)
MARGIN = 2  # tile pixels either side of a predicted edge that the resize filter may blend


def _pixels(tiles: torch.Tensor, cfg: TilingConfig) -> np.ndarray:
    """(T, 3, S, S) normalised tiles -> (T, S, S, 3) uint8-range floats."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((tiles * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def _red(px: np.ndarray) -> np.ndarray:
    return (px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60)


CASES = [  # (width, height, box) with tile 32, max 4 tiles: layouts 1x1 (up), 1x2, 1x4, 2x1, 2x2, 3x1 (down)
    (20, 12, (3, 2, 15, 10)),
    (60, 30, (10, 5, 50, 25)),
    (130, 30, (5, 4, 120, 26)),
    (30, 64, (4, 10, 26, 60)),
    (70, 70, (10, 12, 60, 55)),
    (90, 300, (20, 30, 80, 280)),
    (64, 64, (31, 31, 64, 64)),  # reaches the image's bottom-right corner
]


@pytest.mark.parametrize("resample", ["bilinear", "nearest"])
def test_a_drawn_box_lands_where_box_to_tiles_says(resample):
    cfg = TilingConfig(tile_size=32, max_tiles=4, resample=resample)
    layouts = set()
    for width, height, box in CASES:
        img = Image.new("RGB", (width, height), (128, 128, 128))
        ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=RED)  # PIL's x2 is inclusive
        tiled = tile_image(img, cfg)
        layouts.add(tiled.layout)
        red = _red(_pixels(tiled.tiles[: tiled.num_tiles], cfg))
        pieces = dict(box_to_tiles(box, width, height, cfg))
        assert pieces, (width, height)
        assert set(pieces) == {t for t in range(tiled.num_tiles) if red[t].any()}, (width, height, pieces)
        S = cfg.tile_size
        ys, xs = np.mgrid[0:S, 0:S] + 0.5  # pixel centres
        for t, (x1, y1, x2, y2) in pieces.items():
            inside = (xs > x1 + MARGIN) & (xs < x2 - MARGIN) & (ys > y1 + MARGIN) & (ys < y2 - MARGIN)
            near = (xs > x1 - MARGIN) & (xs < x2 + MARGIN) & (ys > y1 - MARGIN) & (ys < y2 + MARGIN)
            assert red[t][inside].all(), (width, height, t)
            assert not red[t][~near].any(), (width, height, t)
            # and back: each piece maps into the original box, and the pieces cover it
            back = tile_box_to_image(t, (x1, y1, x2, y2), width, height, cfg)
            assert back[0] >= box[0] - 1e-6 and back[1] >= box[1] - 1e-6, (back, box)
            assert back[2] <= box[2] + 1e-6 and back[3] <= box[3] + 1e-6, (back, box)
        backs = [tile_box_to_image(t, b, width, height, cfg) for t, b in pieces.items()]
        union = (min(b[0] for b in backs), min(b[1] for b in backs), max(b[2] for b in backs), max(b[3] for b in backs))
        assert np.allclose(union, box, atol=1e-6), (union, box)
    assert len(layouts) >= 6, layouts


def test_box_to_tiles_splits_a_box_across_tiles_and_rejects_bad_boxes():
    cfg = TilingConfig(tile_size=10, max_tiles=4)
    # a 20 x 20 image is already a 2x2 canvas: no resize, a centred box splits in four quarters
    assert box_to_tiles((5, 5, 15, 15), 20, 20, cfg) == [(0, (5.0, 5.0, 10.0, 10.0)), (1, (0.0, 5.0, 5.0, 10.0)),
                                                          (2, (5.0, 0.0, 10.0, 5.0)), (3, (0.0, 0.0, 5.0, 5.0))]
    assert tile_box_to_image(3, (0, 0, 5, 5), 20, 20, cfg) == (10.0, 10.0, 15.0, 15.0)
    for bad in ((5, 5, 5, 9), (9, 5, 5, 9), (-1, 0, 5, 5), (0, 0, 21, 5)):
        with pytest.raises(TilingError, match="box"):
            box_to_tiles(bad, 20, 20, cfg)
    with pytest.raises(TilingError, match="tile_index"):
        tile_box_to_image(4, (0, 0, 1, 1), 20, 20, cfg)
