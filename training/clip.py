"""The ``clip`` kind: contrastive pre-training of the vision encoder on image-caption shards.

Llama 3's image adapter starts from a contrastively pre-trained encoder (sec. 7.2). The tiny runs do the
same in miniature: an open_clip ``CLIP`` whose visual tower has exactly the shape of the image preset's
`VisionEncoderConfig` (`vision.clip.build_clip`) trains on the image kind's shards (key.jpg +
key.txt / json caption), each image resized to one tile as the encoder sees it, each caption tokenised by
open_clip's own BPE with ``data.max_seq_len`` as the context length (a longer caption is a bad sample,
never truncated).

From open_clip we reuse the model, the tokenizer and the loss (``open_clip.loss.ClipLoss``), i.e. what
defines the numbers. We do not use ``open_clip_train`` (installed): its ``train_one_epoch`` is a second
training loop with its own data pipeline, schedulers, precision and checkpoint handling, all of which the
trainer already owns; its one training-side rule we keep is the logit-scale cap at 100 (applied here to
the scale the loss sees, since the engine's step leaves no place for its post-step clamp) and its
weight-decay exclusions (`clip_param_groups`).

Export: the ``clip-encoder`` kind of `common.export`: ``model.safetensors`` (the visual tower's state dict,
open_clip names without ``visual.``) and ``config.json`` (the tower's `VisionEncoderConfig`). The image
kind's ``model.encoder_from`` takes the directory (`encoder_weights` checks the shapes and hands the file
to the encoder's ``pretrained`` path, which open_clip's loader reads).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from common.config import CheckpointError
from common.export import CONFIG, WEIGHTS, read_export_meta, write_export
from training.codecs import IMAGE_EXTS, sample_text
from training.data import BadSampleError, Example, RawSample

if TYPE_CHECKING:
    from training.config import RunConfig
    from vision.encoder import VisionEncoderConfig

EXPORT_KIND = "clip-encoder"  # `common.export`
SHAPE_FIELDS = ("width", "layers", "heads", "patch_size", "mlp_ratio")  # what must match to load the tower
MAX_LOGIT_SCALE = 100.0  # open_clip_train clamps log(scale) to ln(100) after every step


def clip_vision_config(cfg: "RunConfig") -> "VisionEncoderConfig":
    from adapters.multimodal import multimodal_config

    vision = multimodal_config(cfg.model.preset).vision
    return vision if cfg.model.tile_size is None else replace(vision, tile_size=cfg.model.tile_size)


def build_clip_model(cfg: "RunConfig", tok: None = None) -> nn.Module:
    from vision.clip import ClipTextTower, build_clip

    torch.manual_seed(cfg.model.seed)
    model = build_clip(clip_vision_config(cfg), ClipTextTower(context_length=cfg.data.max_seq_len))
    # DeepSpeed broadcasts every parameter as a byte view, which a 0-dim tensor cannot give: the scale
    # becomes shape (1,), which the loss broadcasts the same way (only the visual tower is exported).
    model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))
    return model


class ClipTask(nn.Module):
    """CLIP + ``ClipLoss``; ``tokens`` / ``labels`` (the trainer's uniform arguments) are not used: the
    padded caption ids travel as ``texts``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.model, self.loss = model, ClipLoss()

    def forward(self, tokens: Tensor, labels: Tensor, images: Tensor, texts: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W), texts (B, context_length)."""
        out = self.model(images, texts)
        scale = out["logit_scale"].clamp(max=MAX_LOGIT_SCALE)
        loss = self.loss(out["image_features"], out["text_features"], scale)
        return {"loss": loss, "n_tokens": torch.tensor(len(images))}


class ClipCodec:
    """key.jpg + caption -> one tile (B, 3, S, S) + open_clip token ids (sot ... eot)."""

    def __init__(self, tile_size: int, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer
        from vision.tiling import TilingConfig

        self.tiling = TilingConfig(tile_size=tile_size, max_tiles=1)
        self.bpe, self.context_length = SimpleTokenizer(context_length=context_length), context_length

    def decode(self, raw: RawSample) -> Example:
        from media.image import ImageLoadError, load_image_bytes
        from vision.tiling import TilingError, tile_image

        ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
        if ext is None:
            raise BadSampleError(f"{raw.shard}: sample {raw.key} has no image (has {sorted(raw.members)})")
        try:
            tile = tile_image(load_image_bytes(raw.members[ext], name=f"{raw.shard}:{raw.key}.{ext}"),
                              self.tiling).tiles[0]
        except (ImageLoadError, TilingError) as e:
            raise BadSampleError(f"{raw.shard}: sample {raw.key}: {e}") from e
        ids = [self.bpe.sot_token_id, *self.bpe.encode(sample_text(raw)), self.bpe.eot_token_id]
        return Example(ids, ids, tile, raw)  # over data.max_seq_len: a bad sample (TrainBatches' length check)

    def collate(self, examples: list[Example]) -> dict:
        texts = torch.zeros(len(examples), self.context_length, dtype=torch.long)  # open_clip pads with 0
        for i, e in enumerate(examples):
            texts[i, : len(e.tokens)] = torch.tensor(e.tokens)
        return {"images": torch.stack([e.media for e in examples]), "texts": texts}


def clip_codec(cfg: "RunConfig", tok: None, model: nn.Module) -> ClipCodec:
    return ClipCodec(clip_vision_config(cfg).tile_size, cfg.data.max_seq_len)


def clip_param_groups(cfg: "RunConfig", model: nn.Module) -> list[dict]:
    """open_clip_train's rule: no decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    o = cfg.optim
    return [{"params": decay, "lr": o.lr, "weight_decay": o.weight_decay},
            {"params": no_decay, "lr": o.lr, "weight_decay": 0.0}]


def export_clip(model: nn.Module, cfg: "RunConfig", out: Path) -> Path:
    visual = {k.removeprefix("visual."): v for k, v in model.state_dict().items() if k.startswith("visual.")}
    return write_export(out, EXPORT_KIND, clip_vision_config(cfg), visual)


def encoder_weights(export_dir: str | Path, vision: "VisionEncoderConfig") -> Path:
    """``export_dir/model.safetensors`` after checking the export's tower has ``vision``'s shape (the tile
    size may differ: open_clip's loader resizes the position table); anything else is a `TrainError`."""
    from training.spec import TrainError
    from vision.encoder import VisionEncoderConfig

    cfg_file = Path(export_dir) / CONFIG
    try:
        found = read_export_meta(export_dir, (EXPORT_KIND,), config_cls=VisionEncoderConfig)[1]["config"]
    except CheckpointError as e:
        raise TrainError(f"model.encoder_from: {e}") from None
    for name in SHAPE_FIELDS:
        if getattr(found, name) != getattr(vision, name):
            raise TrainError(f"model.encoder_from: {cfg_file}: config.{name} is {getattr(found, name)!r}, "
                             f"the image preset's is {getattr(vision, name)!r}")
    weights = Path(export_dir) / WEIGHTS
    if not weights.is_file():
        raise TrainError(f"model.encoder_from: {weights} not found")
    return weights
