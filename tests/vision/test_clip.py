"""The tiny CLIP of the ``clip`` kind: its visual tower has the encoder's shape, so the encoder loads its weights."""

from dataclasses import replace

import pytest
import torch

from vision.clip import ClipTextTower, build_clip
from vision.encoder import build_vision_encoder, vision_config


def test_the_encoder_loads_the_clip_visual_tower(tmp_path):
    vision = vision_config("tiny")
    torch.manual_seed(0)
    model = build_clip(vision, ClipTextTower(context_length=24))
    assert model.context_length == 24 and model.visual.image_size == (vision.tile_size, vision.tile_size)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    enc = build_vision_encoder(replace(vision, pretrained=str(path)))  # strict: any shape mismatch raises
    clip_visual = model.visual.state_dict()
    for name, value in enc.transformer.state_dict().items():
        assert torch.equal(value, clip_visual[f"transformer.{name}"])
    assert torch.equal(enc.conv1.weight, clip_visual["conv1.weight"])
    assert torch.equal(enc.positional_embedding, clip_visual["positional_embedding"])


def test_an_open_clip_preset_is_refused():
    with pytest.raises(ValueError, match="ViT-H-14"):
        build_clip(vision_config("vit_h14"))


def test_a_tower_without_attention_biases_is_refused():
    with pytest.raises(ValueError, match="attn_bias=True"):
        build_clip(replace(vision_config("tiny"), attn_bias=False))
