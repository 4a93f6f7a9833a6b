"""Tiny end-to-end VQA pipeline on the rendered set: tokenise, batch, train the adapter, answer, score.

Shared by ``scripts.bench_learning image`` and ``video`` (the CPU learning proofs) and the tests; the
image road (``scripts/learning_image.py``: make_synthetic -> build_shards -> scripts.train -> export ->
demo_vqa) is to replace it once it reaches the same bars. Single process, plain PyTorch.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from adapters.chat import Message, encode_dialog, encode_training_example
from adapters.generation import SamplingConfig, generate_ids
from adapters.llama import Llama, build_llama
from adapters.multimodal import ImageBatch, MultimodalConfig, MultimodalLlama, build_multimodal, multimodal_config
from adapters.task import IGNORE_INDEX, ImageTextTask, build_param_groups
from adapters.tokenizer import Tokenizer
from adapters.tokenizer import build_tiny_tokenizer as _build_tiny_tokenizer
from synthetic.shapes import VQARecord, corpus_text
from vision.tiling import TilingConfig, collate_tiled, tile_image


@dataclass(frozen=True)
class VQATrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-2  # the fresh projector + cross-attention layers
    encoder_lr_scale: float = 0.03  # the pre-trained encoder trains at 3e-4 so its features survive
    weight_decay: float = 0.0
    warmup: int = 30
    seed: int = 0


def build_tiny_tokenizer(out_dir: str | Path, n_merges: int = 120, texts: list[str] | None = None) -> Tokenizer:
    """`adapters.tokenizer.build_tiny_tokenizer` on the shapes-VQA strings unless ``texts`` are given.

    Kept only for the in-process recipes still here (video.vqa, speech.asr) and their tests; the image
    road writes its tokenizer through ``scripts.make_synthetic``."""
    return _build_tiny_tokenizer(out_dir, texts or corpus_text(), n_merges)


def tiny_vqa_config(tok: Tokenizer) -> MultimodalConfig:
    cfg = multimodal_config("tiny")
    return replace(cfg, lm=replace(cfg.lm, vocab_size=tok.n_words))


def _tiling(cfg: MultimodalConfig) -> TilingConfig:
    return TilingConfig(tile_size=cfg.vision.tile_size, max_tiles=cfg.vision.max_tiles)


class VQAEncoder:
    """Turns records into model batches; tiles each distinct image once."""

    def __init__(self, tok: Tokenizer, cfg: MultimodalConfig):
        self.tok, self.tiling = tok, _tiling(cfg)
        self._tiles: dict[int, object] = {}

    def tiled(self, img):
        key = id(img)
        if key not in self._tiles:
            self._tiles[key] = tile_image(img, self.tiling)
        return self._tiles[key]

    def prompt(self, r: VQARecord) -> list[int]:
        return encode_dialog(self.tok, [Message("user", r.question, n_images=1)])

    def train_batch(self, records: list[VQARecord]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> tokens (B, T), labels (B, T), and the model's media keyword arguments."""
        tokens, labels = pad_examples(self.tok, [
            encode_training_example(self.tok, [Message("user", r.question, n_images=1), Message("assistant", r.answer)])
            for r in records])
        return tokens, labels, self.media(records)

    def images(self, records: list[VQARecord]) -> ImageBatch:
        return ImageBatch.from_collated(collate_tiled([[self.tiled(r.image)] for r in records])).trimmed()

    def media(self, records: list[VQARecord]) -> dict:
        return {"images": self.images(records)}


def pad_examples(tok: Tokenizer, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) pairs -> right-padded (B, T) tensors (pad id / ignored labels)."""
    T = max(len(t) for t, _ in rows)
    tokens = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (t, lab) in enumerate(rows):
        tokens[i, : len(t)], labels[i, : len(lab)] = torch.tensor(t), torch.tensor(lab)
    return tokens, labels


def train_vqa(model: MultimodalLlama, enc, records: list, cfg: VQATrainConfig, progress: bool = True) -> list[float]:
    """AdamW with warmup + cosine decay on the adapter (LM frozen). Returns the loss curve.

    ``enc`` turns records into batches (`VQAEncoder` for images, ``video.vqa.VideoQAEncoder`` for videos).
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task = ImageTextTask(model).train()
    opt = torch.optim.AdamW(build_param_groups(model, cfg.lr, cfg.weight_decay, cfg.encoder_lr_scale), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / cfg.steps * 3.14159)).item())
    )
    losses = []
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, mininterval=2)
    for _ in bar:
        tokens, labels, media = enc.train_batch(rng.sample(records, cfg.batch_size))
        loss = task(tokens, labels, **media)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.inference_mode()
def answer(model: MultimodalLlama, enc, records: list, max_new_tokens: int = 6,
           batch_size: int = 64) -> list[str]:
    """Greedy answers, batched by prompt length (prompts of one question kind have equal length)."""
    out: dict[int, str] = {}
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_len.setdefault(len(enc.prompt(r)), []).append(i)
    for idxs in by_len.values():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s : s + batch_size]
            prompt = torch.tensor([enc.prompt(records[i]) for i in chunk])
            ids = generate_ids(model, prompt, sampling=SamplingConfig(max_new_tokens=max_new_tokens),
                               stop_ids=enc.tok.stop_ids, **enc.media([records[i] for i in chunk]))
            for i, row in zip(chunk, ids):
                out[i] = enc.tok.decode(row).strip()
    return [out[i] for i in range(len(records))]


@torch.inference_mode()
def candidate_accuracy(model: MultimodalLlama, enc, records: list, use_media: bool) -> float:
    """Accuracy when choosing the most likely answer among the candidates (log-likelihood of answer + eot).

    With ``use_media=False`` the images/videos are withheld: this is the frozen LM on its own.
    """
    correct = 0
    for r in records:
        prompt = enc.prompt(r)
        if not use_media:  # the LM's own vocabulary has no image/video token: drop it
            prompt = [t for t in prompt if t < model.cfg.lm.vocab_size]
        rows = [prompt + enc.tok.encode(c) + [enc.tok.eot_id] for c in r.candidates]
        T = max(map(len, rows))
        n_prompt = len(prompt)
        tokens = torch.tensor([row + [enc.tok.pad_id] * (T - len(row)) for row in rows])
        if use_media:
            logp = model(tokens, **enc.media([r] * len(rows))).log_softmax(-1)
        else:
            logp = model.lm(tokens).log_softmax(-1)  # the frozen LM alone, no adapter at all
        scores = []
        for b, row in enumerate(rows):
            tgt = torch.tensor(row[n_prompt:])
            scores.append(logp[b, n_prompt - 1 : len(row) - 1].gather(-1, tgt[:, None]).sum().item())
        correct += int(r.candidates[max(range(len(scores)), key=scores.__getitem__)] == r.answer)
    return correct / max(1, len(records))


def pretrain_text_lm(lm: Llama, tok: Tokenizer, steps: int = 200, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0, progress: bool = True, questions: dict | None = None) -> list[float]:
    """Stage 1 of the recipe in miniature: train the tiny LM on text-only dialogs, then it gets frozen.

    The dialogs are the VQA questions (``questions``: kind -> (question, candidates); default the image
    set's) with answers drawn uniformly from each question's candidates, so the LM learns the chat
    format and the answer vocabulary but, never seeing an image, stays at chance.
    """
    from synthetic.shapes import QUESTIONS

    rng = random.Random(seed)
    torch.manual_seed(seed)
    lm.train()
    for p in lm.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    kinds = list((questions or QUESTIONS).values())
    losses = []
    for _ in tqdm(range(steps), desc="pretrain LM", disable=not progress, mininterval=2):
        rows = []
        for _ in range(batch_size):
            q, cands = rng.choice(kinds)
            rows.append(encode_training_example(tok, [Message("user", q), Message("assistant", rng.choice(cands))]))
        tokens, labels = pad_examples(tok, rows)
        logits = lm(tokens)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    lm.freeze()
    return losses


def build_tiny_vqa_model(tok: Tokenizer, seed: int = 0, lm: Llama | None = None,
                         encoder_checkpoint: str | Path | None = None) -> MultimodalLlama:
    """The tiny multimodal model; ``encoder_checkpoint`` is an open_clip state dict for the encoder."""
    torch.manual_seed(seed)
    cfg = tiny_vqa_config(tok)
    if encoder_checkpoint is not None:
        cfg = replace(cfg, vision=replace(cfg.vision, pretrained=str(encoder_checkpoint)))
    lm = lm if lm is not None else build_llama(cfg.lm)
    return build_multimodal(cfg, lm)


def run_vqa_benchmark(steps: int, seed: int, work_dir: str | Path, clip_steps: int = 600, n_train: int = 1000,
                      n_test: int = 60, progress: bool = True) -> tuple[dict, MultimodalLlama, VQAEncoder, list[VQARecord]]:
    """The recipe in miniature, then held-out scoring. Returns metrics, the model, its encoder, the test set.

    1. CLIP-pretrain the tiny image encoder on the ``n_train`` training scenes with their captions
       (``clip_steps``; 0 skips it and the encoder starts from random weights);
    2. pre-train the tiny LM on text-only dialogs and freeze it;
    3. train encoder (at a tenth of the rate) + projector + cross-attention for ``steps`` on the same
       scenes' questions; 4. answer ``n_test`` unseen scenes' questions greedily.
    """
    from synthetic.shapes import chance_accuracy, make_caption_set, make_vqa_set
    from vision.clip_pretrain import ClipTrainConfig, save_clip, train_clip

    t0 = time.perf_counter()
    work_dir = Path(work_dir)
    tok = build_tiny_tokenizer(work_dir)
    encoder_ckpt, clip_losses = None, []
    if clip_steps > 0:
        images, captions = make_caption_set(n_train, seed=seed)  # the training scenes, captioned
        clip, clip_losses = train_clip(images, captions, tiny_vqa_config(tok).vision,
                                       ClipTrainConfig(steps=clip_steps, seed=seed), progress)
        encoder_ckpt = save_clip(clip, work_dir / "clip_encoder.pt")
    t_clip = time.perf_counter() - t0
    torch.manual_seed(seed)
    lm = build_llama(tiny_vqa_config(tok).lm)
    lm_losses = pretrain_text_lm(lm, tok, seed=seed, progress=progress)
    model = build_tiny_vqa_model(tok, seed, lm, encoder_ckpt)
    enc = VQAEncoder(tok, model.cfg)
    train = make_vqa_set(n_train, seed=seed)
    test = make_vqa_set(n_test, seed=seed + 10_000)
    frozen_alone = candidate_accuracy(model, enc, test, use_media=False)
    t_adapter = time.perf_counter()
    losses = train_vqa(model, enc, train, VQATrainConfig(steps=steps, seed=seed), progress)
    t_adapter = time.perf_counter() - t_adapter
    t_train = time.perf_counter() - t0
    preds = answer(model, enc, test)
    acc = sum(p == r.answer for p, r in zip(preds, test)) / len(test)
    by_kind: dict[str, list[int]] = {}
    for p, r in zip(preds, test):
        by_kind.setdefault(r.kind, []).append(int(p == r.answer))
    mean_tail = lambda xs: sum(xs[-20:]) / min(20, len(xs)) if xs else None  # noqa: E731
    metrics = {
        "heldout_accuracy": acc,
        "heldout_accuracy_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
        "chance_accuracy": chance_accuracy(test),
        "frozen_lm_alone_accuracy": frozen_alone,
        "steps": steps,
        "clip_steps": clip_steps,
        "train_scenes": n_train,
        "train_examples": len(train),
        "heldout_examples": len(test),
        "final_loss": mean_tail(losses),
        "clip_final_loss": mean_tail(clip_losses),
        "lm_pretrain_final_loss": mean_tail(lm_losses),
        "clip_seconds": round(t_clip, 1),
        "adapter_seconds": round(t_adapter, 1),
        "train_seconds": round(t_train, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "seed": seed,
    }
    return metrics, model, enc, test
