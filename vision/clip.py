"""A small open_clip ``CLIP`` whose visual tower has exactly the shape of a `VisionEncoderConfig`.

Llama 3's image adapter starts from a contrastively pre-trained encoder. The tiny runs train this model with
the trainer's ``clip`` kind (`training.clip`); the encoder then loads its visual tower through the same
local-checkpoint path a real open_clip file takes (``VisionEncoderConfig.pretrained``). Curation scores
image-caption pairs with it in tests and benchmarks (`data_curation.filters.ClipScorer`), where
`open_clip_model_cfg` is the JSON config open_clip's loader needs for this architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from open_clip.model import CLIP

from vision.encoder import VisionEncoderConfig


@dataclass(frozen=True)
class ClipTextTower:
    """The text tower beside the visual one (heads: one per 32 channels)."""

    text_width: int = 64
    text_layers: int = 2
    context_length: int = 16


def open_clip_model_cfg(vision: VisionEncoderConfig, text: ClipTextTower = ClipTextTower()) -> dict:
    """open_clip's ``model_cfg`` (``CLIP`` keyword arguments, the JSON of ``open_clip_config.json``)."""
    if vision.open_clip_model is not None:
        raise ValueError(f"build_clip makes custom small towers; {vision.open_clip_model!r} has its own "
                         "pretrained tags (set VisionEncoderConfig.pretrained instead)")
    if not vision.attn_bias:
        raise ValueError("open_clip's CLIP towers have attention biases; build_clip needs attn_bias=True")
    return {
        "embed_dim": vision.width,
        "vision_cfg": {"width": vision.width, "layers": vision.layers, "head_width": vision.width // vision.heads,
                       "patch_size": vision.patch_size, "mlp_ratio": vision.mlp_ratio, "image_size": vision.tile_size},
        "text_cfg": {"context_length": text.context_length, "width": text.text_width,
                     "heads": max(1, text.text_width // 32), "layers": text.text_layers},
    }


def build_clip(vision: VisionEncoderConfig, text: ClipTextTower = ClipTextTower()) -> CLIP:
    """An open_clip CLIP whose visual tower matches ``vision`` (image size = tile size), random init."""
    return CLIP(**open_clip_model_cfg(vision, text), output_dict=True)
