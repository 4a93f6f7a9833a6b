"""Generation for the multimodal model: self-attention KV cache, vision K/V computed once per image.

`decode` is the one decoding loop (sampling, stop ids) of every model: ``generate`` drives it for the
image / video model, ``speech.adapter.speech_decode`` for the speech model; both yield one token per row per
step (streaming), `collect_ids` gathers them and ``stream_text`` turns them into text pieces that never
split a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.multimodal import ImageBatch, MultimodalLlama, VideoBatch


class GenerationLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context (its ``max_seq_len``)."""


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def check_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse, before any cache is allocated, a request whose positions would run past ``max_seq_len``."""
    if prompt_len + max_new_tokens > max_seq_len:
        raise GenerationLengthError(
            f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceed the model's "
            f"max_seq_len ({max_seq_len}); ask for at most {max(max_seq_len - prompt_len, 0)} new tokens")


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> ids (B,): greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode(logits: Tensor, step: Callable[[Tensor, int], Tensor], sampling: SamplingConfig,
           stop_ids: Iterable[int] = (), pad_id: int = 0) -> Iterator[Tensor]:
    """The one decoding loop (image, video and speech models): from the prompt's last logits (B, V), yield
    the next token of every row (B,) and feed it back through ``step(tokens, i) -> logits (B, V)`` (``i``:
    tokens generated before these), until every row hit a stop id or ``sampling.max_new_tokens`` are out.
    Rows that already stopped yield ``pad_id``."""
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(sampling.seed)
    stops = torch.tensor(sorted(set(stop_ids)), device=logits.device, dtype=torch.long)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(sampling.max_new_tokens):
        nxt = sample_next(logits.float(), sampling.temperature, sampling.top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        yield nxt
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or i == sampling.max_new_tokens - 1:
            return
        logits = step(nxt, i)


def collect_ids(steps: Iterable[Tensor], stop_ids: Iterable[int] = ()) -> list[list[int]]:
    """A decoding loop's tokens per row, each row cut before its first stop id (the stop id dropped)."""
    stops = set(stop_ids)
    rows: list[list[int]] | None = None
    finished: list[bool] = []
    for nxt in steps:
        if rows is None:
            rows, finished = [[] for _ in range(nxt.shape[0])], [False] * nxt.shape[0]
        for b, t in enumerate(nxt.tolist()):
            if not finished[b]:
                if t in stops:
                    finished[b] = True
                else:
                    rows[b].append(t)
        if all(finished):
            break
    return rows or []


@torch.inference_mode()
def generate(
    model: MultimodalLlama,
    prompt: Tensor,
    images: ImageBatch | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    videos: VideoBatch | None = None,
) -> Iterator[Tensor]:
    """`decode` for equal-length prompts (B, T) of the image / video model.

    The vision encoder (and the video aggregator) and each cross-attention layer's K/V run once, on the
    prompt; every decoding step reuses them.
    """
    B, T = prompt.shape
    check_length(T, sampling.max_new_tokens, model.cfg.lm.max_seq_len)
    cache = model.lm.new_cache(B, T + sampling.max_new_tokens)
    context = None
    if images is not None and bool(images.image_mask.any()):
        context = model.vision_context(prompt, images)
    video_context = None
    if videos is not None and bool(videos.video_mask.any()):
        video_context = model.video_context(prompt, videos)
    hidden = model(prompt, context=context, video_context=video_context, cache=cache, return_hidden=True)

    def step(nxt: Tensor, i: int) -> Tensor:
        return model(nxt[:, None], context=context, video_context=video_context, start_pos=T + i, cache=cache)[:, -1]

    yield from decode(model.lm.output(hidden[:, -1]), step, sampling, stop_ids, pad_id)


def stream_text(tokenizer, ids: Iterable[int], stop_ids: Iterable[int] = ()) -> Iterator[str]:
    """Decode a token stream into text pieces; bytes of an unfinished UTF-8 character are held back."""
    stops = set(stop_ids)
    pending = b""
    for t in ids:
        if t in stops:
            break
        pending += tokenizer.decode_bytes([t])
        try:
            text = pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":  # wait for the rest of the character
                text = pending[: e.start].decode("utf-8")
                pending = pending[e.start :]
                if text:
                    yield text
                continue
            text = pending.decode("utf-8", errors="replace")
        pending = b""
        if text:
            yield text
    if pending:
        yield pending.decode("utf-8", errors="replace")
