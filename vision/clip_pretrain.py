"""Contrastive (CLIP) pre-training of a small open_clip model: the encoder stage of the recipe, in miniature.

Llama 3's image adapter starts from a *pre-trained* ViT-H/14 (trained contrastively on image-text
pairs) and only then trains the adapter. Tiny CPU runs (tests, ``scripts.bench_learning``, ``make demo``)
reproduce that order: ``train_clip`` fits an open_clip ``CLIP`` whose visual tower has exactly the shape
of a ``VisionEncoderConfig``, ``save_clip`` writes its state dict, and the encoder loads it through the
same local-checkpoint path a real open_clip file takes (``VisionEncoderConfig.pretrained = path``).

The loss is open_clip's own ``ClipLoss``. Captions of a batch may repeat (rendered sets have few
distinct captions); the text tower maps equal captions to equal embeddings, and then the diagonal
targets average out to exactly the "every equal caption is a positive" loss, so no special case is needed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from tqdm import tqdm

from vision.encoder import VisionEncoderConfig
from vision.tiling import TilingConfig, tile_image


@dataclass(frozen=True)
class ClipTrainConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 20
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 16
    seed: int = 0


def build_clip(vision: VisionEncoderConfig, cfg: ClipTrainConfig) -> CLIP:
    """An open_clip CLIP whose visual tower matches ``vision`` (image size = tile size), random init."""
    if vision.open_clip_model is not None:
        raise ValueError(f"build_clip makes custom small towers; {vision.open_clip_model!r} has its own "
                         "pretrained tags (set VisionEncoderConfig.pretrained instead)")
    vision_cfg = CLIPVisionCfg(width=vision.width, layers=vision.layers, head_width=vision.width // vision.heads,
                               patch_size=vision.patch_size, mlp_ratio=vision.mlp_ratio, image_size=vision.tile_size)
    text_cfg = CLIPTextCfg(context_length=cfg.context_length, width=cfg.text_width,
                           heads=max(1, cfg.text_width // 32), layers=cfg.text_layers)
    return CLIP(embed_dim=vision.width, vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True)


def train_clip(images: list[Image.Image], captions: list[str], vision: VisionEncoderConfig,
               cfg: ClipTrainConfig = ClipTrainConfig(), progress: bool = True) -> tuple[CLIP, list[float]]:
    """Contrastive training on (image, caption) pairs; images are resized to one tile like the encoder sees them."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"train_clip: {len(images)} images and {len(captions)} captions (need equal, > 0)")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_clip(vision, cfg).train()
    tiling = TilingConfig(tile_size=vision.tile_size, max_tiles=1)
    pixels = torch.stack([tile_image(img, tiling).tiles[0] for img in images])
    tokenizer = SimpleTokenizer(context_length=cfg.context_length)
    text = tokenizer(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / cfg.steps * torch.pi)).item())
    )
    loss_fn, losses = ClipLoss(), []
    bar = tqdm(range(cfg.steps), desc="CLIP pretrain", disable=not progress, mininterval=2)
    for _ in bar:
        idx = rng.sample(range(len(images)), min(cfg.batch_size, len(images)))
        out = model(pixels[idx], text[idx])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # ln(100), as open_clip's training loop does
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), losses


def save_clip(model: CLIP, path: str | Path) -> Path:
    """Write the full CLIP state dict; ``VisionEncoderConfig(pretrained=path)`` loads its visual tower."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path
