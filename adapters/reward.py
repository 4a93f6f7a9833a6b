"""Scoring answers with a reward model (an image export with ``reward_head``, trained by the ``reward`` kind).

    rewards = score_answers(model, tok, prompt_ids, tiled_images, ["red", "blue"])

A row is the prompt (``encode_dialog``: BOS, the turns, the assistant header) followed by the answer and its
``<|eot_id|>``: exactly the row the reward model was trained on (`training.preference`), read at its last
token. Used by ``scripts.evaluate --task preference`` (held-out pairwise accuracy) and
``scripts.rejection_sample`` (ranking sampled answers).
"""

from __future__ import annotations

import torch

from adapters.multimodal import ImageBatch, MultimodalLlama
from adapters.tokenizer import Tokenizer
from vision.tiling import TiledImage, collate_tiled


def answer_row(tok: Tokenizer, prompt_ids: list[int], answer: str) -> list[int]:
    """The prompt ids (ending with the assistant header), the answer and ``<|eot_id|>``."""
    return [*prompt_ids, *tok.encode(answer.strip()), tok.eot_id]


@torch.inference_mode()
def score_answers(model: MultimodalLlama, tok: Tokenizer, prompt_ids: list[int], images: list[TiledImage],
                  answers: list[str], batch_size: int = 16) -> list[float]:
    """The reward of each answer to one prompt with its images (in placeholder order), ``batch_size`` rows at a
    time (right-padded; each row is read at its own last token, so padding changes nothing)."""
    if not model.cfg.reward_head:
        raise ValueError("score_answers: the model has no reward head (train one with kind: reward)")
    rewards: list[float] = []
    for start in range(0, len(answers), batch_size):
        rows = [answer_row(tok, prompt_ids, a) for a in answers[start : start + batch_size]]
        lengths = torch.tensor([len(r) for r in rows])
        tokens = torch.full((len(rows), int(lengths.max())), tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        batch = None
        if images:
            batch = ImageBatch.from_collated(collate_tiled([list(images)] * len(rows))).trimmed()
        rewards += model.reward(tokens, lengths, batch).tolist()
    return rewards
