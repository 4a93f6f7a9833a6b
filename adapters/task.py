"""Training task = model + loss, and the one place that decides which parameters train.

The training engine (plain loop, DeepSpeed) wraps ``ImageTextTask``; it returns a dict of losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.chat import IGNORE_INDEX
from adapters.multimodal import ImageBatch, MultimodalLlama, VideoBatch


def shift_targets(labels: Tensor, vocab_size: int) -> Tensor:
    """Next-token targets (B, T): targets[t] = labels[t+1]; the image token and ids >= vocab are ignored."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    targets[targets >= vocab_size] = IGNORE_INDEX
    return targets


class ImageTextTask(nn.Module):
    """Next-token loss on the caption/answer tokens only (labels = -100 elsewhere)."""

    def __init__(self, model: MultimodalLlama):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, labels: Tensor, images: ImageBatch | None = None,
                videos: VideoBatch | None = None, doc_ids: Tensor | None = None) -> dict[str, Tensor]:
        """``doc_ids`` (B, T): packed rows (see `MultimodalLlama.forward`). No target crosses a document
        boundary as long as each document's first label is ignored (its BOS / prompt)."""
        targets = shift_targets(labels, self.model.cfg.lm.vocab_size)
        hidden = self.model(tokens, images, videos, return_hidden=True, doc_ids=doc_ids)
        keep = targets != IGNORE_INDEX
        # Project only supervised positions: the 128K-row head on every position dominates memory otherwise.
        logits = self.model.lm.output(hidden[keep]).float()
        n = keep.sum()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum") / n.clamp(min=1)
        if torch.is_grad_enabled() and not loss.requires_grad:
            # A micro-batch with no image or video (text-only conversations): only the frozen LM made the
            # loss. Tie it to the trainable weights with zero gradients, so backward and step stay uniform.
            loss = loss + sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        return {"loss": loss, "n_tokens": n}


def build_param_groups(model: MultimodalLlama, lr: float, weight_decay: float = 0.0,
                       encoder_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms/gates/biases/embedding rows. The LM never appears.

    ``encoder_lr_scale`` multiplies the learning rate of the (pre-trained) image encoder, ``vision.*``;
    the projector, cross-attention layers and image-token rows use ``lr``. Asserts every trainable
    parameter lands in exactly one group and no frozen-LM parameter trains.
    """
    buckets: dict[tuple[bool, bool], list] = {(enc, wd): [] for enc in (False, True) for wd in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("lm."):
            raise RuntimeError(f"frozen LM parameter {name} requires grad")
        no_wd = p.dim() < 2 or "embedding" in name or name.endswith(("gate", "gate_attn", "gate_ffwd", "latents", "frame_pos"))
        buckets[(name.startswith("vision."), not no_wd)].append(p)
    groups = [
        {"params": params, "lr": lr * (encoder_lr_scale if enc else 1.0), "weight_decay": weight_decay if wd else 0.0}
        for (enc, wd), params in buckets.items()
    ]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == trainable
    return [g for g in groups if g["params"]]
