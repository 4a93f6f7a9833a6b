"""The ``text`` kind: pre-training the Llama LM alone on text-only dialogs, before it is frozen.

The learning proofs freeze a tiny LM that first learned the chat format and the answer vocabulary;
this kind trains it through the trainer (e.g. configs/run_text_speech_synthetic.yaml: the spoken-digits
LM on text-only ASR dialogs). Input: webdataset shards whose samples carry a ``key.json`` whose ``meta`` object
(where the shard builders keep a sidecar's own fields) holds:

* ``data.format: qa`` -- ``{"question": ..., "answer": ...}``: one user turn, one assistant turn. The
  question-answer shards of the image / video kinds are such shards (their media member is not read),
  so the LM can pre-train on the same curated samples without ever seeing the picture: it learns each
  question's answer distribution, not the answer of one scene.
* ``data.format: conversation`` -- ``{"conversations": [{"role": "system"|"user"|"assistant", "content": ...},
  ...]}``, the multi-turn layout of the image and video kinds (checked the same way), without media: loss on
  every assistant turn.

Either way the tokens are the Llama 3 chat format of `adapters.chat` and only assistant text and its
``<|eot_id|>`` carry labels. The model is ``model.lm`` (continued pre-training) or the LM of the
``model.preset`` multimodal preset sized to the tokenizer; every parameter trains. The export is Meta's
layout (``params.json`` + ``consolidated.00.pth``, `adapters.checkpoint.save_meta_checkpoint`) plus
``tokenizer.model``: a run of another kind takes the directory as ``model.lm`` and its tokenizer as
``model.tokenizer``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.chat import IGNORE_INDEX, Message, encode_training_example
from common.conversation import PLACEHOLDERS
from adapters.task import shift_targets
from training.codecs import conversation_messages, qa_fields
from training.data import BadSampleError, Example, RawSample

if TYPE_CHECKING:
    from adapters.tokenizer import Tokenizer
    from training.config import RunConfig


def build_text_model(cfg: "RunConfig", tok: "Tokenizer") -> nn.Module:
    """A trainable Llama: ``model.lm`` when given, else the preset's LM with the tokenizer's vocabulary."""
    from adapters.checkpoint import load_llama
    from adapters.llama import build_llama
    from adapters.multimodal import multimodal_config
    from training.spec import TrainError

    m = cfg.model
    torch.manual_seed(m.seed)
    lm = load_llama(m.lm) if m.lm else build_llama(replace(multimodal_config(m.preset).lm, vocab_size=tok.n_words))
    if lm.cfg.vocab_size != tok.n_words:
        raise TrainError(f"model.tokenizer {m.tokenizer} has {tok.n_words} ids, model.lm {m.lm} {lm.cfg.vocab_size}")
    return lm.requires_grad_(True)


class TextTask(nn.Module):
    """Next-token loss of the LM on the labelled (assistant) tokens, the dict `ImageTextTask` returns."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """tokens, labels (B, T); labels are IGNORE_INDEX on prompts and padding."""
        targets = shift_targets(labels, self.lm.cfg.vocab_size)
        logits = self.lm(tokens)
        keep = targets != IGNORE_INDEX
        n = keep.sum()
        loss = F.cross_entropy(logits[keep], targets[keep], reduction="sum") / n.clamp(min=1)
        return {"loss": loss, "n_tokens": n}


def text_conversation(raw: RawSample) -> list[Message]:
    """The sample's key.json meta ``conversations`` (`training.codecs.conversation_messages`: the layout the
    image and video kinds read), text only: an ``<|image|>`` / ``<|video|>`` placeholder is a `BadSampleError`
    (a text LM sees no media)."""
    messages = conversation_messages(raw)
    for i, m in enumerate(messages):
        for placeholder in PLACEHOLDERS:
            if placeholder in m.content:
                raise BadSampleError(f"{raw.shard}: sample {raw.key}.json: conversations[{i}] holds {placeholder}, "
                                     "but the text kind trains the LM alone (media conversations are the image / "
                                     "video kinds' data)")
    return messages


class TextCodec:
    """key.json -> a chat example (``qa`` or ``conversation``, see the module docstring); no media."""

    def __init__(self, tok: "Tokenizer", fmt: str):
        self.tok, self.fmt = tok, fmt

    def decode(self, raw: RawSample) -> Example:
        if self.fmt == "qa":
            question, answer = qa_fields(raw)
            messages = [Message("user", question), Message("assistant", answer)]
        else:
            messages = text_conversation(raw)
        tokens, labels = encode_training_example(self.tok, messages)
        return Example(tokens, labels, None, raw)

    def collate(self, examples: list[Example]) -> dict:
        return {}


def text_codec(cfg: "RunConfig", tok: "Tokenizer", model: nn.Module) -> TextCodec:
    return TextCodec(tok, cfg.data.format)


def text_param_groups(cfg: "RunConfig", model: nn.Module) -> list[dict]:
    """Decay on matrices, none on norms and embedding rows (as `build_param_groups` does for adapters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "embeddings" in name else decay).append(p)
    o = cfg.optim
    return [g for g in ({"params": decay, "lr": o.lr, "weight_decay": o.weight_decay},
                        {"params": no_decay, "lr": o.lr, "weight_decay": 0.0}) if g["params"]]


def export_text(model: nn.Module, cfg: "RunConfig", out: Path) -> Path:
    """Meta's layout + tokenizer.model: what ``model.lm`` / ``model.tokenizer`` of the other kinds read."""
    from adapters.checkpoint import save_meta_checkpoint

    save_meta_checkpoint(model, out)
    shutil.copy(cfg.model.tokenizer, out / "tokenizer.model")
    return out
