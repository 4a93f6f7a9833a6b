"""Training task = model + loss, and the one place that decides which parameters train.

The training engine (plain loop, DeepSpeed) wraps ``ImageTextTask``; it returns a dict of losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.multimodal import ImageBatch, MultimodalLlama

IGNORE_INDEX = -100


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

    def forward(self, tokens: Tensor, labels: Tensor, images: ImageBatch | None = None) -> dict[str, Tensor]:
        targets = shift_targets(labels, self.model.cfg.lm.vocab_size)
        hidden = self.model(tokens, images, return_hidden=True)
        keep = targets != IGNORE_INDEX
        # Project only supervised positions: the 128K-row head on every position dominates memory otherwise.
        logits = self.model.lm.output(hidden[keep]).float()
        n = keep.sum()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum") / n.clamp(min=1)
        return {"loss": loss, "n_tokens": n}


def build_param_groups(model: MultimodalLlama, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms/gates/biases/embedding rows. The LM never appears.

    Asserts every trainable parameter lands in exactly one group and no frozen-LM parameter trains.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("lm."):
            raise RuntimeError(f"frozen LM parameter {name} requires grad")
        no_wd = p.dim() < 2 or "embedding" in name or name.endswith(("gate", "gate_attn", "gate_ffwd"))
        (no_decay if no_wd else decay).append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == trainable
    return [g for g in groups if g["params"]]
