"""Preference training (Llama 3 sec. 7.5): the vision reward model and DPO, two kinds of the one trainer.

Samples (``data.format: preference``): key.json meta ``conversations`` is the prompt (an optional system turn,
then user and assistant alternating, ending with a user turn; ``<|image|>`` placeholders for the sample's
images key.0.jpg, key.1.jpg, ... as in the conversation format) and ``chosen`` / ``rejected`` are the two
answers; an optional ``edited`` answer (a human's edit of the chosen one) ranks above both, as in the paper.
Each answer is a row of its own (`Example.extra_rows`) with the sample's images repeated for it, TRL's
vision collator's layout; the micro-batch carries ``pairs`` (P, 2), the row indices (better, worse) of every
ranked pair: (chosen, rejected), and with ``edited`` also (edited, chosen) and (edited, rejected). Identical
answers, a prompt not ending with a user turn and every conversation-format error are `BadSampleError`\\ s.

``reward`` kind: the image model of ``model.init_from`` (the vision SFT export: encoder and cross-attention
layers, trained) around the frozen LM of ``model.lm`` with ``model.swap_lm`` (the paper takes the
self-attention layers from the text reward model; where none exists, as for our tiny LM, the frozen LM itself
stands in) and a scalar head on the final token (`MultimodalLlama.reward`). Loss: the Bradley-Terry pairwise
loss ``-log sigmoid(r_better - r_worse)`` over the pairs plus ``preference.reward_reg`` x the squared reward
averaged over the batch. Logged: pairwise ``accuracy`` and ``margin``.

``dpo`` kind: the policy is the image model of ``model.init_from`` (the SFT export). The reference is a copy
of its trainable weights kept as buffers of the task (so checkpoints carry it and a resume is exact) and used
through ``torch.func.functional_call`` on the same module (the frozen LM is held once); every
``preference.ref_every`` steps it moves towards the policy by ``preference.ema`` (0: frozen). Log-probabilities
are summed over the answer's own tokens only: the role headers and the closing ``<|eot_id|>`` (formatting
tokens) are masked. Loss: ``-log sigmoid(beta * (policy - reference log-ratio margin))`` plus
``preference.nll_weight`` x the NLL (mean per token) of the preferred answers. Logged: ``reward_chosen``,
``reward_rejected`` (beta x log-ratio, means over the pairs' better and worse rows), ``margin`` and
``accuracy`` (pairs whose implicit reward margin is positive).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.chat import IGNORE_INDEX, Message, encode_header
from adapters.multimodal import ImageBatch, MultimodalLlama, build_multimodal
from adapters.task import shift_targets
from adapters.tokenizer import Tokenizer
from common.conversation import IMAGE_PLACEHOLDER, ConversationError, check_conversation
from training.codecs import (check_placeholders, encode_conversation, sample_media, sample_meta,
                             tile_member)
from training.data import BadSampleError, Example, RawSample
from vision.tiling import TilingConfig, collate_tiled

if TYPE_CHECKING:
    from training.config import RunConfig
    from training.spec import TrainSpec

ANSWERS = ("edited", "chosen", "rejected")  # best first; edited is optional


# ---------------------------------------------------------------------------------------------- samples


def preference_answers(raw: RawSample, meta: dict) -> list[tuple[str, str]]:
    """[(field, answer)] best first: edited (when given), chosen, rejected; each a non-empty string, all
    different, else a `BadSampleError` naming the field."""
    where = f"{raw.shard}: sample {raw.key}.json"
    answers = []
    for name in ANSWERS:
        if name not in meta and name == "edited":
            continue
        value = meta.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadSampleError(f"{where}: meta {name!r} must be a non-empty string (data.format preference needs "
                                 f"chosen and rejected, edited is optional; got {value!r})")
        answers.append((name, value.strip()))
    for i, (a, text_a) in enumerate(answers):
        for b, text_b in answers[i + 1:]:
            if text_a == text_b:
                raise BadSampleError(f"{where}: meta {a!r} and {b!r} are the same answer ({text_a[:60]!r}): a "
                                     "preference pair needs two different answers")
    return answers


def preference_prompt(raw: RawSample, meta: dict, answer: str) -> list[Message]:
    """The prompt turns of ``meta`` with ``answer`` as the closing assistant turn, checked as a conversation
    (`common.conversation.check_conversation`); the prompt must end with a user turn."""
    where = f"{raw.shard}: sample {raw.key}.json"
    turns = meta.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") != "user":
        raise BadSampleError(f"{where}: conversations[{len(turns) - 1}].role is {turns[-1].get('role')!r}: a "
                             "preference prompt ends with the user turn the answers reply to")
    try:
        pairs = check_conversation([*turns, {"role": "assistant", "content": answer}] if isinstance(turns, list)
                                   else turns)
    except ConversationError as e:
        raise BadSampleError(f"{where}: {e}") from None
    return [Message(role, content) for role, content in pairs]


def answer_only(labels: list[int], n_prompt: int, mask_eot: bool) -> list[int]:
    """Labels on the closing answer only (positions from ``n_prompt`` on): earlier assistant turns of the
    prompt are context here; with ``mask_eot`` its ``<|eot_id|>`` is masked too (DPO's formatting tokens)."""
    labels = [IGNORE_INDEX] * n_prompt + labels[n_prompt:]
    if mask_eot:
        labels[-1] = IGNORE_INDEX
    return labels


class PreferenceCodec:
    """key.json meta ``conversations`` + ``chosen`` / ``rejected`` (+ ``edited``) + key.N.jpg -> one `Example`
    per sample whose rows are its answers, best first (see the module docstring)."""

    def __init__(self, tok: Tokenizer, tiling: TilingConfig, mask_eot: bool):
        self.tok, self.tiling, self.mask_eot = tok, tiling, mask_eot

    def decode(self, raw: RawSample) -> Example:
        meta = sample_meta(raw, "preference")
        answers = preference_answers(raw, meta)
        names = sample_media(raw)
        rows = []
        for _, answer in answers:
            messages = preference_prompt(raw, meta, answer)
            tokens, labels = encode_conversation(self.tok, messages)
            n_prompt = len(encode_conversation(self.tok, messages[:-1])[0]) + len(encode_header(self.tok, "assistant"))
            rows.append((tokens, answer_only(labels, n_prompt, self.mask_eot)))
        check_placeholders(raw, messages, names, IMAGE_PLACEHOLDER, "image")
        images = [tile_member(raw, name, self.tiling) for name in names]
        (tokens, labels), *extra = rows
        return Example(tokens, labels, images, raw, extra_rows=extra)

    def collate(self, examples: list[Example]) -> dict:
        """``images`` for every row (each sample's images repeated per answer), ``pairs`` (P, 2) row indices
        (better, worse) and ``lengths`` (R,) tokens per row."""
        images, pairs, lengths = [], [], []
        for e in examples:
            first = len(lengths)
            for tokens, _ in e.rows:
                images.append(list(e.media))
                lengths.append(len(tokens))
            n = len(e.rows)
            pairs += [(first + i, first + j) for i in range(n) for j in range(i + 1, n)]
        collated = collate_tiled(images, max_images=max(1, *map(len, images)), cfg=self.tiling)
        return {"images": ImageBatch.from_collated(collated).trimmed(), "pairs": torch.tensor(pairs),
                "lengths": torch.tensor(lengths)}


def preference_codec(cfg: "RunConfig", tok: Tokenizer, model: nn.Module) -> PreferenceCodec:
    v = model.cfg.vision
    return PreferenceCodec(tok, TilingConfig(tile_size=v.tile_size, max_tiles=v.max_tiles), mask_eot=cfg.kind == "dpo")


# ---------------------------------------------------------------------------------------------- reward model


def build_reward_model(cfg: "RunConfig", tok: Tokenizer) -> MultimodalLlama:
    """The image model of ``model.init_from`` (usually with ``model.swap_lm``: the text reward model's LM) with
    a reward head added when it has none (zero: every answer starts at reward 0)."""
    from training.spec import TrainError, build_multimodal_model

    sft = build_multimodal_model(cfg, tok)
    if sft.cfg.reward_head:
        return sft
    model = build_multimodal(replace(sft.cfg, reward_head=True), sft.lm)
    missing, unexpected = model.load_state_dict(sft.state_dict(), strict=False)
    if unexpected or any(not k.startswith("reward_head.") for k in missing):
        raise TrainError(f"{cfg.model.init_from}: weights do not fit the reward model: {missing} {unexpected}")
    return model


def pair_stats(better: Tensor, worse: Tensor) -> dict[str, Tensor]:
    """Pairwise ``accuracy`` (better scored higher) and mean ``margin``, detached."""
    diff = (better - worse).detach()
    return {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}


class RewardTask(nn.Module):
    """Bradley-Terry loss over the ranked pairs + ``reward_reg`` x mean squared reward (module docstring)."""

    def __init__(self, model: MultimodalLlama, reward_reg: float):
        super().__init__()
        self.model, self.reward_reg = model, reward_reg

    def forward(self, tokens: Tensor, labels: Tensor, images: ImageBatch, pairs: Tensor,
                lengths: Tensor) -> dict[str, Tensor]:
        r = self.model.reward(tokens, lengths, images)
        better, worse = r[pairs[:, 0]], r[pairs[:, 1]]
        loss = -F.logsigmoid(better - worse).mean() + self.reward_reg * r.pow(2).mean()
        return {"loss": loss, "n_tokens": pairs.new_tensor(len(pairs)), **pair_stats(better, worse)}


def reward_task(cfg: "RunConfig", model: nn.Module) -> nn.Module:
    return RewardTask(model, cfg.preference.reward_reg)


# ---------------------------------------------------------------------------------------------- DPO


def sequence_logps(model: MultimodalLlama, tokens: Tensor, labels: Tensor, images: ImageBatch,
                   weights: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(sum of log-probabilities of each row's labelled tokens (R,), labelled tokens per row (R,)); with
    ``weights``, of ``model`` with those tensors in place of its own (``torch.func.functional_call``)."""
    targets = shift_targets(labels, model.cfg.lm.vocab_size)
    if weights is None:
        hidden = model(tokens, images, return_hidden=True)
    else:
        hidden = torch.func.functional_call(model, weights, (tokens, images), {"return_hidden": True})
    keep = targets != IGNORE_INDEX
    logits = model.lm.output(hidden[keep]).float()
    token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(keep)[keep]
    sums = torch.zeros(tokens.shape[0], device=tokens.device).index_add(0, rows, token_logps)
    return sums, keep.sum(1)


class DPOTask(nn.Module):
    """The DPO loss of the policy ``model`` against its EMA reference (module docstring)."""

    def __init__(self, model: MultimodalLlama, beta: float, nll_weight: float, ema: float):
        super().__init__()
        self.model, self.beta, self.nll_weight, self.ema = model, beta, nll_weight, ema
        self.names = [n for n, _ in model.trainable_named_parameters()]
        self.reference = nn.Module()  # the reference's trainable weights, as buffers: saved, resumed, cast
        for name, p in model.trainable_named_parameters():
            self.reference.register_buffer(name.replace(".", "__"), p.detach().clone())

    def reference_weights(self) -> dict[str, Tensor]:
        return {n: getattr(self.reference, n.replace(".", "__")) for n in self.names}

    @torch.no_grad()
    def refresh_reference(self) -> None:
        """``reference <- (1 - ema) * reference + ema * policy``."""
        params = dict(self.model.named_parameters())
        for name, ref in self.reference_weights().items():
            ref.lerp_(params[name].detach().to(ref.dtype), self.ema)

    def forward(self, tokens: Tensor, labels: Tensor, images: ImageBatch, pairs: Tensor,
                lengths: Tensor) -> dict[str, Tensor]:
        logps, n_tokens = sequence_logps(self.model, tokens, labels, images)
        with torch.no_grad():
            ref_logps, _ = sequence_logps(self.model, tokens, labels, images, self.reference_weights())
        rewards = self.beta * (logps - ref_logps)
        better, worse = rewards[pairs[:, 0]], rewards[pairs[:, 1]]
        loss = -F.logsigmoid(better - worse).mean()
        if self.nll_weight:
            preferred = pairs[:, 0].unique()
            loss = loss + self.nll_weight * -logps[preferred].sum() / n_tokens[preferred].sum().clamp(min=1)
        if not loss.requires_grad:  # no image in the micro-batch: tie to the trainable weights, zero gradients
            loss = loss + sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        return {"loss": loss, "n_tokens": n_tokens.sum(), "reward_chosen": better.detach().mean(),
                "reward_rejected": worse.detach().mean(), **pair_stats(better, worse)}


def dpo_task(cfg: "RunConfig", model: nn.Module) -> nn.Module:
    p = cfg.preference
    return DPOTask(model, p.beta, p.nll_weight, p.ema)


def refresh_reference(cfg: "RunConfig", task: nn.Module, step: int) -> None:
    """After optimizer step ``step``: the EMA refresh every ``preference.ref_every`` steps (none with ema 0)."""
    if cfg.preference.ema > 0 and step % cfg.preference.ref_every == 0:
        task.refresh_reference()


# ---------------------------------------------------------------------------------------------- registry


def reward_spec() -> "TrainSpec":
    from training.spec import TrainSpec, export_multimodal, multimodal_param_groups

    return TrainSpec("reward", build_reward_model, reward_task, preference_codec, multimodal_param_groups,
                     export_multimodal, formats=("preference",), swap_lm=True)


def dpo_spec() -> "TrainSpec":
    from training.spec import TrainSpec, build_multimodal_model, export_multimodal, multimodal_param_groups

    return TrainSpec("dpo", build_multimodal_model, dpo_task, preference_codec, multimodal_param_groups,
                     export_multimodal, formats=("preference",), swap_lm=True, after_step=refresh_reference)
