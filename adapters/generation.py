"""Generation for the multimodal model: self-attention KV cache, vision K/V computed once per image.

The public surface, lowest level first:

- `SamplingConfig`: max_new_tokens, temperature (0 = greedy), top_k (0 = off), top_p, seed, stop strings.
- `decode`: the one decoding loop of every model (``generate`` drives it for the image / video model,
  ``speech.adapter.speech_decode`` for the speech model); it yields one token per row per step, (B,), and steps
  the model only when asked for the next token, so a consumer that stops pulling stops the model.
- `generate`: `decode` for the image / video model; prompts of equal length (B, T) or a list of id rows of any
  lengths (left-padded, padding masked), rows with images, without, or with several in one batch.
- `stream`: the text surface (CLI and web demos): per step, the new text piece of every row; stop ids and
  ``SamplingConfig.stop`` strings end a row, and once every row has ended the model takes no further step.
- `TextStreamer` / `stream_text`: token ids -> text pieces of one row (UTF-8 characters kept whole, the tail
  that may still begin a stop string held back); `collect_ids`: a loop's tokens per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from adapters.multimodal import ImageBatch, MultimodalLlama, VideoBatch


class GenerationLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context (its ``max_seq_len``)."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked: greedy at temperature 0; else the logits divided by ``temperature``, cut to
    the ``top_k`` most likely tokens, then to the nucleus of mass ``top_p`` (HF's Temperature, TopK and TopP
    warpers, in that order). ``stop`` strings end a row's text before the string; they are applied to text,
    by `stream` / `TextStreamer` (`generate` yields tokens and refuses them)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if type(self.top_k) is not int or self.top_k < 0:  # a bool is no count
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        # one string is one stop string (as HF's stop_strings), not a tuple of its characters
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")


def check_length(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse, before any cache is allocated, a request whose positions would run past ``max_seq_len``."""
    if prompt_len + max_new_tokens > max_seq_len:
        raise GenerationLengthError(
            f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceed the model's "
            f"max_seq_len ({max_seq_len}); ask for at most {max(max_seq_len - prompt_len, 0)} new tokens")


def sampling_probs(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> Tensor:
    """logits (B, V) -> the fp32 distribution (B, V) that sampling draws from (temperature > 0): softmax of
    ``logits / temperature`` restricted to the ``top_k`` largest (0 = all), then to the smallest prefix, by
    descending probability, whose mass reaches ``top_p`` (the first token always stays), renormalised."""
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p / sorted_p.sum(-1, keepdim=True))
    return probs


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                top_k: int = 0) -> Tensor:
    """logits (B, V) -> ids (B,): greedy at temperature 0, else a draw from `sampling_probs`."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_p, top_k)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode(logits: Tensor, step: Callable[[Tensor, int], Tensor], sampling: SamplingConfig,
           stop_ids: Iterable[int] = (), pad_id: int = 0) -> Iterator[Tensor]:
    """The one decoding loop (image, video and speech models): from the prompt's last logits (B, V), yield
    the next token of every row (B,) and feed it back through ``step(tokens, i) -> logits (B, V)`` (``i``:
    tokens generated before these), until every row hit a stop id or ``sampling.max_new_tokens`` are out.
    Rows that already stopped yield ``pad_id``. ``step`` runs only when the next token is asked for: a consumer
    that stops iterating (or closes the iterator) takes no further model step."""
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(sampling.seed)
    stops = torch.tensor(sorted(set(stop_ids)), device=logits.device, dtype=torch.long)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(sampling.max_new_tokens):
        nxt = sample_next(logits.float(), sampling.temperature, sampling.top_p, generator, sampling.top_k)
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


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """Token-id rows of any lengths -> tokens (B, T) left-padded with ``pad_id`` and valid (B, T) bool (False
    on padding), T the longest row: every row's next token then goes to the same cache slot."""
    if not len(rows) or any(not len(r) for r in rows):
        raise ValueError(f"generate: every prompt row needs at least one token, got lengths {[len(r) for r in rows]}")
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        valid[b, T - len(r):] = True
    return tokens.to(device), valid.to(device)


@torch.inference_mode()
def generate(
    model: MultimodalLlama,
    prompt: Tensor | Sequence[Sequence[int]],
    images: ImageBatch | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    videos: VideoBatch | None = None,
) -> Iterator[Tensor]:
    """`decode` for the image / video model: yields the next token of every row, (B,), per step.

    ``prompt``: equal-length rows (B, T), or a list of B id rows of any lengths, left-padded here (`left_pad`)
    with their padding masked in self-attention at every step (RoPE scores are relative: a row shifted right
    computes what it would alone; padding precedes every image token, so it sees no image); the longest row
    decides the length check. ``images`` / ``videos`` rows may hold no media at all (a text-only row beside image
    rows). With no padding no mask is built (the equal-length path). The vision encoder (and the video
    aggregator) and each cross-attention layer's K/V run once, on the prompt; every decoding step reuses them.
    """
    if sampling.stop:
        raise ValueError("SamplingConfig.stop: stop strings are matched on text; generate yields tokens. "
                         "Decode with adapters.generation.stream (or a TextStreamer per row)")
    device = model.lm.tok_embeddings.weight.device
    valid = None
    if not isinstance(prompt, Tensor):
        prompt, valid = left_pad(prompt, pad_id, device)
    B, T = prompt.shape
    check_length(T, sampling.max_new_tokens, model.cfg.lm.max_seq_len)
    key_valid = None  # (B, T + max_new_tokens): False on padding keys; None when no row is padded
    if valid is not None and not bool(valid.all()):
        key_valid = torch.cat([valid, valid.new_ones(B, sampling.max_new_tokens)], 1)
    cache = model.lm.new_cache(B, T + sampling.max_new_tokens)
    context = None
    if images is not None and bool(images.image_mask.any()):
        context = model.vision_context(prompt, images)
    video_context = None
    if videos is not None and bool(videos.video_mask.any()):
        video_context = model.video_context(prompt, videos)
    hidden = model(prompt, context=context, video_context=video_context, cache=cache, return_hidden=True,
                   key_valid=None if key_valid is None else key_valid[:, :T])

    def step(nxt: Tensor, i: int) -> Tensor:
        pos = T + i
        return model(nxt[:, None], context=context, video_context=video_context, start_pos=pos, cache=cache,
                     key_valid=None if key_valid is None else key_valid[:, : pos + 1])[:, -1]

    yield from decode(model.lm.output(hidden[:, -1]), step, sampling, stop_ids, pad_id)


class TextStreamer:
    """One row's token ids -> text pieces, as they come (`push`).

    Bytes of an unfinished UTF-8 character are held back, and so is the longest tail that could still be the
    start of a stop string. A stop id ends the row (its held text released); a stop string ends it with the text
    cut before the string's first occurrence. ``done`` says the row has ended; `finish` releases what is held
    when the tokens run out first. ``text`` is everything released so far.
    """

    def __init__(self, tokenizer, stop_ids: Iterable[int] = (), stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.stop_strings = tuple(stop_strings)
        self.done = False
        self.text = ""
        self._bytes = b""  # an unfinished UTF-8 character
        self._held = ""  # text that may begin a stop string

    def push(self, token: int) -> str:
        """The text that ``token`` releases ('' when none, and always once ``done``)."""
        if self.done:
            return ""
        if token in self.stop_ids:
            return self.finish()
        self._bytes += self.tokenizer.decode_bytes([token])
        try:
            new = self._bytes.decode("utf-8")
            self._bytes = b""
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":  # wait for the rest of the character
                new, self._bytes = self._bytes[: e.start].decode("utf-8"), self._bytes[e.start :]
            else:
                new, self._bytes = self._bytes.decode("utf-8", errors="replace"), b""
        return self._release(self._held + new)

    def finish(self) -> str:
        """End the row: release the held text (no stop string can complete any more)."""
        if self.done:
            return ""
        self.done = True
        piece = self._held + self._bytes.decode("utf-8", errors="replace")
        self._held, self._bytes = "", b""
        self.text += piece
        return piece

    def _release(self, pending: str) -> str:
        hits = [i for i in (pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            piece = pending[: min(hits)]
            self.done, self._held, self._bytes = True, "", b""
        else:
            longest = max(map(len, self.stop_strings), default=0)
            keep = next((k for k in range(min(len(pending), longest - 1), 0, -1)
                         if any(s.startswith(pending[-k:]) for s in self.stop_strings)), 0)
            piece, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += piece
        return piece


def stream_text(tokenizer, ids: Iterable[int], stop_ids: Iterable[int] = (),
                stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Decode one row's token stream into text pieces (`TextStreamer`); stops pulling ``ids`` at a stop id or
    when a stop string completes."""
    streamer = TextStreamer(tokenizer, stop_ids, stop_strings)
    for t in ids:
        piece = streamer.push(t)
        if piece:
            yield piece
        if streamer.done:
            return
    piece = streamer.finish()
    if piece:
        yield piece


def stream(
    model: MultimodalLlama,
    tokenizer,
    prompt: Tensor | Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    images: ImageBatch | None = None,
    videos: VideoBatch | None = None,
) -> Iterator[list[str]]:
    """The streaming surface of the image / video model: per decoding step, the new text piece of every row
    ('' when a row has nothing new: half a UTF-8 character, a tail that may begin a stop string, or a row that
    has ended). Joined, a row's pieces are its whole answer.

    ``prompt``, ``images`` and ``videos`` as in `generate` (ragged rows, mixed image / text-only rows). A row ends
    at one of ``tokenizer.stop_ids`` or at one of ``sampling.stop`` (its text cut before the stop string); once
    every row has ended this iterator returns and closes the token loop, so the model takes no further step.
    Closing it early (``break``, ``.close()``) stops the model too. The last step's pieces include what was held.
    """
    steps = generate(model, prompt, images, replace(sampling, stop=()), tokenizer.stop_ids, videos=videos)
    streamers: list[TextStreamer] = []
    try:
        for i, nxt in enumerate(steps):
            if not streamers:
                streamers = [TextStreamer(tokenizer, tokenizer.stop_ids, sampling.stop) for _ in range(len(nxt))]
            last = i == sampling.max_new_tokens - 1
            yield [s.push(t) + (s.finish() if last else "") for s, t in zip(streamers, nxt.tolist())]
            if all(s.done for s in streamers):
                return
    finally:
        steps.close()
