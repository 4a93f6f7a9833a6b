"""Tiling transform: layout table, HF parity (transformers 4.54.1 MllamaImageProcessor), collation."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vision.tiling import (
    CLIP_MEAN,
    CLIP_STD,
    TiledImage,
    TilingConfig,
    TilingError,
    best_layout,
    collate_tiled,
    fit_size,
    layout_id,
    supported_layouts,
    tile_image,
)

import transformers.models.mllama.image_processing_mllama as hf_mllama  # noqa: E402


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A photo-like test image: smooth gradients, hard-edged shapes and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 100 * np.sin((x + y) / 7.0)], -1
    )
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 5, height // 5, width // 2, height // 2], fill=(250, 20, 30))
    draw.ellipse([width // 2, height // 3, 9 * width // 10, 9 * height // 10], outline=(10, 10, 240), width=3)
    return img.convert(mode) if mode != "RGB" else img


def hf_processor(tile_size: int, max_tiles: int = 4):
    return hf_mllama.MllamaImageProcessor(
        do_convert_rgb=True,
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=max_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=Image.Resampling.BILINEAR,
    )


# ---------------------------------------------------------------- layout table


def test_supported_layouts_order_defines_ids():
    expected = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert supported_layouts(4) == expected
    assert [layout_id(lay, 4) for lay in expected] == list(range(1, 9))
    for n in range(1, 7):
        assert supported_layouts(n) == list(hf_mllama.get_all_supported_aspect_ratios(n))
    with pytest.raises(TilingError, match="layout"):
        layout_id((2, 3), 4)


@pytest.mark.parametrize(
    "size, expected_layout, expected_resized",
    [
        ((800, 300), (1, 3), (800, 300)),  # wide, fits 1x3 without resizing
        ((700, 336), (1, 3), (700, 336)),  # 1x3 and 1x4 both fit at scale 1: smaller area wins
        ((1344, 336), (1, 4), (1344, 336)),  # exactly four tiles across
        ((5000, 300), (1, 4), (1344, 80)),  # very wide: downscaled into 1x4, height floored
        ((300, 800), (3, 1), (300, 800)),  # tall
        ((300, 5000), (4, 1), (80, 1344)),
        ((336, 336), (1, 1), (336, 336)),  # exactly one tile
        ((337, 336), (1, 2), (337, 336)),  # one pixel too wide for one tile
        ((500, 500), (2, 2), (500, 500)),  # square
        ((5000, 5000), (2, 2), (672, 672)),  # huge: least downscaling
        ((1, 1), (1, 1), (336, 336)),  # tiny: upscaled only to one tile
        ((10, 7), (1, 1), (336, 235)),
        ((7, 10), (1, 1), (235, 336)),
        ((100, 20), (1, 1), (336, 67)),
    ],
)
def test_layout_table(size, expected_layout, expected_resized):
    w, h = size
    layout = best_layout(w, h, 336, 4)
    assert layout == expected_layout
    rows, cols = layout
    assert fit_size(w, h, cols * 336, rows * 336, 336) == expected_resized


def test_layout_and_fit_match_hf_bruteforce():
    """Every size on a grid plus random sizes, three tile sizes: same canvas and resize target as HF."""
    rng = np.random.default_rng(0)
    sizes = [
        (w, h)
        for w in (1, 2, 13, 100, 335, 336, 337, 671, 672, 673, 1007, 1344, 1345, 3000)
        for h in (1, 3, 99, 335, 336, 337, 672, 1008, 1345, 2500)
    ]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(400)]
    for S in (336, 448, 560):
        for max_tiles in (1, 4, 6):
            for w, h in sizes:
                ch, cw = (int(v) for v in hf_mllama.get_optimal_tiled_canvas(h, w, max_tiles, S))
                assert best_layout(w, h, S, max_tiles) == (ch // S, cw // S), (w, h, S, max_tiles)
                new_h, new_w = hf_mllama.get_image_size_fit_to_canvas(h, w, ch, cw, S)
                assert fit_size(w, h, cw, ch, S) == (int(new_w), int(new_h)), (w, h, S)


def test_bad_sizes_and_config():
    with pytest.raises(TilingError, match="image size"):
        best_layout(0, 10, 336, 4)
    with pytest.raises(TilingError, match="resample"):
        TilingConfig(resample="cubic-ish")
    with pytest.raises(TilingError, match="tile_size"):
        TilingConfig(tile_size=0)
    with pytest.raises(TilingError, match="img"):
        tile_image(np.zeros((4, 4, 3), np.uint8), TilingConfig())
    assert TilingConfig(mean=[0.5, 0.5, 0.5]).mean == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- HF parity


@pytest.mark.parametrize(
    "size, tile_size",
    [
        ((800, 300), 336),  # wide
        ((300, 800), 336),  # tall
        ((500, 500), 336),  # square
        ((1, 1), 336),  # tiny
        ((10, 7), 336),
        ((5000, 300), 336),  # huge, downscaled
        ((1500, 1100), 336),  # downscaled into 2x2
        ((337, 336), 336),
        ((640, 480), 448),  # released base 11B tile size
        ((900, 1300), 560),  # released instruct tile size
    ],
)
def test_tile_image_matches_hf(size, tile_size):
    img = make_image(*size, seed=size[0] + size[1])
    cfg = TilingConfig(tile_size=tile_size)
    ours = tile_image(img, cfg)
    ref = hf_processor(tile_size)(img, return_tensors="pt")

    assert ours.tiles.shape == (4, 3, tile_size, tile_size)
    assert ours.tiles.dtype == torch.float32
    assert layout_id(ours.layout, 4) == int(ref["aspect_ratio_ids"][0, 0])
    assert ours.tile_mask.tolist() == ref["aspect_ratio_mask"][0, 0].bool().tolist()
    # Both sides resize with PIL bilinear on uint8 data, so the only difference is float rounding.
    torch.testing.assert_close(ours.tiles, ref["pixel_values"][0, 0].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1"])
def test_non_rgb_input_matches_hf(mode):
    img = make_image(420, 260, seed=3)
    if mode in ("RGBA", "LA"):
        img.putalpha(Image.linear_gradient("L").resize(img.size))
    img = img.convert(mode)
    ours = tile_image(img, TilingConfig())
    ref = hf_processor(336)(img, return_tensors="pt")
    assert layout_id(ours.layout, 4) == int(ref["aspect_ratio_ids"][0, 0])
    torch.testing.assert_close(ours.tiles, ref["pixel_values"][0, 0].float(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- tile content


def test_row_major_tile_order_and_padding_value():
    S = 16
    cfg = TilingConfig(tile_size=S, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    # 3 tiles across, 1 down, each a solid colour; the canvas is exactly 1x3 so nothing is resized.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    img = Image.new("RGB", (3 * S, S))
    for k, c in enumerate(colours):
        img.paste(c, (k * S, 0, (k + 1) * S, S))
    t = tile_image(img, cfg)
    assert t.layout == (1, 3) and t.tile_mask.tolist() == [True, True, True, False]
    for k, c in enumerate(colours):
        expected = torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, S, S) / 255
        assert torch.equal(t.tiles[k], expected)
    assert torch.count_nonzero(t.tiles[3]) == 0  # padding tile slot is zero

    # 2x2 grid: quadrant (row, col) must land in tile row * 2 + col.
    img = Image.new("RGB", (2 * S, 2 * S))
    quads = {(0, 0): (10, 0, 0), (0, 1): (20, 0, 0), (1, 0): (30, 0, 0), (1, 1): (40, 0, 0)}
    for (r, c), colour in quads.items():
        img.paste(colour, (c * S, r * S, (c + 1) * S, (r + 1) * S))
    t = tile_image(img, cfg)
    assert t.layout == (2, 2)
    for (r, c), colour in quads.items():
        assert t.tiles[r * 2 + c, 0].unique().tolist() == [torch.tensor(colour[0] / 255).item()]


def test_padding_is_black_before_normalisation():
    S = 336
    img = Image.new("RGB", (400, 100), (255, 255, 255))  # 1x2 canvas, bottom/right padded
    t = tile_image(img, TilingConfig(tile_size=S))
    assert t.layout == (1, 2) and t.resized_size == (400, 100)
    pad = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(t.tiles[0, :, 0, 0], white)
    torch.testing.assert_close(t.tiles[0, :, 200, 0], pad)  # below the image
    torch.testing.assert_close(t.tiles[1, :, 0, 100], pad)  # right of the image (x = 436)
    torch.testing.assert_close(t.tiles[1, :, 0, 63], white)  # last image column (x = 399)


# ---------------------------------------------------------------- collation


def test_collate_matches_hf_packing():
    imgs = [make_image(800, 300, 1), make_image(300, 300, 2), make_image(1200, 1200, 3)]
    cfg = TilingConfig()
    tiled = [tile_image(im, cfg) for im in imgs]
    out = collate_tiled([[tiled[0], tiled[1]], [tiled[2]], []])
    assert out["tiles"].shape == (3, 2, 4, 3, 336, 336)
    assert out["layouts"].dtype == torch.long and out["layouts"].shape == (3, 2, 2)
    assert out["layouts"].tolist() == [[[1, 3], [1, 1]], [[2, 2], [1, 1]], [[1, 1], [1, 1]]]
    assert out["layout_ids"].tolist() == [[3, 1], [6, 0], [0, 0]]
    assert out["image_mask"].tolist() == [[True, True], [True, False], [False, False]]
    assert out["tile_mask"].dtype == torch.bool
    assert out["tile_mask"][0, 0].tolist() == [True, True, True, False]
    assert not out["tile_mask"][1, 1].any() and not out["tile_mask"][2].any()
    assert torch.count_nonzero(out["tiles"][1, 1]) == 0 and torch.count_nonzero(out["tiles"][2]) == 0

    # HF refuses text-only samples, so compare the first two rows.
    ref = hf_processor(336)([[imgs[0], imgs[1]], [imgs[2]]], return_tensors="pt")
    torch.testing.assert_close(out["tiles"][:2], ref["pixel_values"].float(), atol=1e-5, rtol=0)
    assert torch.equal(out["layout_ids"][:2], ref["aspect_ratio_ids"])
    real = out["image_mask"][:2]
    assert torch.equal(out["tile_mask"][:2][real], ref["aspect_ratio_mask"].bool()[real])


def test_collate_fixed_slots_and_text_only():
    cfg = TilingConfig(tile_size=28)
    t = tile_image(make_image(60, 20), cfg)
    out = collate_tiled([[t]], max_images=3)
    assert out["tiles"].shape == (1, 3, 4, 3, 28, 28)
    assert out["image_mask"].tolist() == [[True, False, False]]
    out = collate_tiled([[], []], cfg=cfg)
    assert out["tiles"].shape == (2, 0, 4, 3, 28, 28)
    with pytest.raises(TilingError, match="cfg"):
        collate_tiled([[], []])


def test_collate_errors_name_the_field():
    t336 = tile_image(make_image(50, 50), TilingConfig(tile_size=336))
    t448 = tile_image(make_image(50, 50), TilingConfig(tile_size=448))
    with pytest.raises(TilingError, match=r"^tiles: sample 1 image 0 .*tile_size"):
        collate_tiled([[t336], [t448]])
    with pytest.raises(TilingError, match=r"^tiles: .*tile_size"):
        collate_tiled([[t336]], cfg=TilingConfig(tile_size=448))
    with pytest.raises(TilingError, match=r"^batch: sample 0"):
        collate_tiled([t336, t336])  # flat list instead of per-sample lists
    with pytest.raises(TilingError, match=r"^max_images"):
        collate_tiled([[t336, t336]], max_images=1)
    bad = TiledImage(t336.tiles, (3, 2), t336.tile_mask, t336.resized_size)
    with pytest.raises(TilingError, match=r"^layout"):
        collate_tiled([[bad]])
    bad = TiledImage(t336.tiles, (1, 2), t336.tile_mask, t336.resized_size)
    with pytest.raises(TilingError, match=r"^tile_mask"):
        collate_tiled([[bad]])
    bad = TiledImage(t336.tiles.half(), t336.layout, t336.tile_mask, t336.resized_size)
    with pytest.raises(TilingError, match=r"^tiles: .*mixed dtypes"):
        collate_tiled([[t336, bad]])
    with pytest.raises(TilingError, match=r"^batch"):
        collate_tiled([])
