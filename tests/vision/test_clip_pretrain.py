"""The miniature encoder pre-training stage: open_clip CLIP, contrastive loss, checkpoint into the encoder."""

from dataclasses import replace

import pytest
import torch

from synthetic.shapes import make_caption_set
from vision.clip_pretrain import ClipTrainConfig, save_clip, train_clip
from vision.encoder import build_vision_encoder, vision_config


def test_clip_training_lowers_the_loss_and_loads_into_the_encoder(tmp_path):
    vision = vision_config("tiny")
    images, captions = make_caption_set(64, seed=0)
    model, losses = train_clip(images, captions, vision, ClipTrainConfig(steps=40, batch_size=32), progress=False)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    path = save_clip(model, tmp_path / "clip.pt")
    enc = build_vision_encoder(replace(vision, pretrained=str(path)))
    clip_visual = model.visual.state_dict()
    for name, value in enc.transformer.state_dict().items():
        assert torch.equal(value, clip_visual[f"transformer.{name}"])
    assert torch.equal(enc.conv1.weight, clip_visual["conv1.weight"])
    assert torch.equal(enc.positional_embedding, clip_visual["positional_embedding"])


def test_bad_inputs_are_named():
    vision = vision_config("tiny")
    with pytest.raises(ValueError, match="2 images and 1 captions"):
        train_clip([None, None], ["x"], vision, progress=False)
    with pytest.raises(ValueError, match="ViT-H-14"):
        train_clip([None], ["x"], vision_config("vit_h14"), progress=False)
