"""Show how an image is tiled and what shapes it takes through the image encoder.

    python -m scripts.inspect_image IMAGE [--tile-size 336] [--preset tiny] [--out tiles.png]

Prints the chosen tile layout, the tensor shapes through the encoder (random weights unless the preset
names a pretrained checkpoint) and writes a PNG with the tiles laid out as the model sees them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from media.image import ImageLoadError, load_image
from vision.encoder import VISION_PRESETS, VisionProjector, build_vision_encoder, vision_config
from vision.tiling import CLIP_MEAN, CLIP_STD, TiledImage, TilingConfig, collate_tiled, layout_id, tile_image


def render_tiles(tiled: TiledImage, gap: int = 6) -> Image.Image:
    """The normalised tiles mapped back to pixels, in their grid, padded slots left out."""
    rows, cols = tiled.layout
    S = tiled.tiles.shape[-1]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    canvas = Image.new("RGB", (cols * S + (cols + 1) * gap, rows * S + (rows + 1) * gap), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        px = ((tiled.tiles[i] * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        x, y = gap + c * (S + gap), gap + r * (S + gap)
        canvas.paste(Image.fromarray(px), (x, y))
        draw.text((x + 4, y + 4), f"tile {i}", fill=(255, 255, 0))
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image")
    p.add_argument("--preset", default="tiny", choices=sorted(VISION_PRESETS))
    p.add_argument("--tile-size", type=int, default=None, help="tile side in pixels (default: the preset's)")
    p.add_argument("--max-tiles", type=int, default=None)
    p.add_argument("--lm-dim", type=int, default=None, help="also run the projector to this width")
    p.add_argument("--out", default=None, help="PNG of the tiles (default: <image stem>_tiles.png)")
    p.add_argument("--json", action="store_true", help="print a JSON summary only")
    args = p.parse_args(argv)

    cfg = vision_config(args.preset)
    if args.tile_size:
        cfg = replace(cfg, tile_size=args.tile_size)
    if args.max_tiles:
        cfg = replace(cfg, max_tiles=args.max_tiles)
    try:
        img = load_image(args.image)
    except ImageLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tiled = tile_image(img, TilingConfig(tile_size=cfg.tile_size, max_tiles=cfg.max_tiles))
    batch = collate_tiled([[tiled]])

    torch.manual_seed(0)
    encoder = build_vision_encoder(cfg).eval()
    with torch.no_grad():
        feats = encoder(batch["tiles"][:, 0], batch["layouts"][:, 0], batch["tile_mask"][:, 0])
        lm_dim = args.lm_dim or (64 if args.preset == "tiny" else 4096)  # tiny LM / Llama 3 8B width
        projected = VisionProjector(cfg.out_dim, lm_dim)(feats)

    out = Path(args.out) if args.out else Path(args.image).with_name(Path(args.image).stem + "_tiles.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    render_tiles(tiled).save(out)
    rows, cols = tiled.layout
    summary = {
        "image": str(args.image),
        "image_size_wh": list(img.size),
        "resized_wh": list(tiled.resized_size),
        "tile_size": cfg.tile_size,
        "layout_rows_cols": [rows, cols],
        "layout_id": layout_id(tiled.layout, cfg.max_tiles),
        "real_tiles": int(tiled.tile_mask.sum()),
        "shapes": {
            "tiles (B, tiles, 3, S, S)": list(batch["tiles"][:, 0].shape),
            "patches per tile": cfg.grid_size**2,
            "tokens per tile (+CLS)": cfg.n_tokens,
            "encoder out (B, tiles, N, width*(1+taps))": list(feats.shape),
            "projected (B, tiles, N, lm_dim)": list(projected.shape),
        },
        "taps (block inputs)": list(cfg.taps),
        "tiles_png": str(out),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{args.image}: {img.size[0]}x{img.size[1]} -> resized {tiled.resized_size[0]}x{tiled.resized_size[1]}")
    print(f"layout {rows}x{cols} (id {summary['layout_id']}), {summary['real_tiles']} of {cfg.max_tiles} tiles, "
          f"tile {cfg.tile_size}px, preset {args.preset}")
    for name, shape in summary["shapes"].items():
        print(f"  {name:45s} {shape}")
    print(f"  taps = inputs of 0-based blocks {list(cfg.taps)}; final + {len(cfg.taps)} taps = {cfg.out_dim} channels")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
