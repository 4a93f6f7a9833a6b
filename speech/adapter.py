"""The speech adapter and the speech model: log-mel -> Conformer -> adapter -> frozen Llama 3.

Llama 3 paper, sec. 8.1: "The speech adapter contains about 100M parameters. It is composed of a
convolution layer, a rotary Transformer layer, and a linear layer. The convolution layer has a kernel
size of 3 and a stride of 2 ... reduce the speech frame length to 80ms ... The Transformer layer has a
latent dimension of 3072 and a feed-forward network with a dimension of 4096." Its outputs enter the
frozen LM as token embeddings (sec. 8.3: the LM stays frozen; encoder and adapter train).

Token stream: one ``<|audio|>`` placeholder per clip, placed where ``<|image|>`` goes (before the user
text). It enters as the model id ``vocab_size + 2`` (`audio_input_id`): the third learnable-row slot,
after ``<|image|>`` (+0) and ``<|video|>`` (+1), as ``adapters.chat.video_input_id`` does for video. It
never reaches an embedding table: `SpeechLlama.prepare_inputs` replaces its single position by the
clip's N adapter outputs (NeMo SALM's ``replace_placeholders_and_build_targets``; LLaMA-Omni's splice).
The paper [recall, notes sec. 4] may enclose the span in two extra special tokens; we do not, so the
model has no new embedding rows and a fresh model on text alone is exactly the frozen LM.

Splice rules (the SALMONN / LLaMA-Omni bugs of notes sec. 4 are the reason for each):

* every text token keeps its label; the labels move with their tokens (shift N - 1 per clip before
  them) and the N audio positions get -100;
* nothing is ever truncated: a spliced row longer than ``max_seq_len`` raises ``ValueError`` (LLaMA-Omni
  truncates after splicing and silently cuts answer labels; cropping the audio instead would make an ASR
  target describe audio the model never heard). Shorten the audio upstream (60 s = 750 positions);
* rows stay contiguous: padding only ever goes after (training) or before (generation) a whole row,
  never between prompt and target (SALMONN's ``padding="longest"`` prompt pieces put it in the middle).
  Right padding needs no attention mask (causal attention never lets a real position see a later pad)
  and positions are 0..L-1; left padding (generation) masks the pad keys and starts positions at 0 on
  each row's first real position.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.chat import AUDIO_TOKEN_ROW, IGNORE_INDEX, encode_header
from adapters.generation import SamplingConfig, check_length, decode
from adapters.llama import FeedForward, KVCache, Llama, LlamaConfig, RMSNorm, build_llama, llama_config
from adapters.task import shift_targets
from adapters.tokenizer import Tokenizer
from common.presets import preset_config
from common.rope import apply_rope, rope_frequencies, rope_table
from speech.conformer import ConformerConfig, ConformerEncoder, conformer_config, length_mask
from speech.features import LogMel, LogMelConfig, normalize_features


def audio_input_id(tok: Tokenizer) -> int:
    """The id of ``<|audio|>`` in the model's token stream (``tok.n_words + 2``; cf. ``video_input_id``)."""
    return tok.n_words + AUDIO_TOKEN_ROW


# ----------------------------------------------------------------------------------------------
# Adapter


@dataclass(frozen=True, kw_only=True)
class SpeechAdapterConfig:
    enc_dim: int  # Conformer width (paper 1536)
    dim: int  # Transformer latent (paper 3072)
    ffn_dim: int  # paper 4096
    n_heads: int
    lm_dim: int  # the LM's embedding size
    conv_kernel: int = 3  # paper: kernel 3, stride 2 -> 40 ms encoder frames to 80 ms
    conv_stride: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("enc_dim", "dim", "ffn_dim", "n_heads", "lm_dim", "conv_kernel", "conv_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SpeechAdapterConfig.{name} must be an int >= 1, got {value!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"SpeechAdapterConfig: n_heads {self.n_heads} must divide dim {self.dim} into an "
                             f"even head dim (RoPE)")
        if not self.rope_theta > 0:
            raise ValueError(f"SpeechAdapterConfig.rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def conv_padding(self) -> int:
        return (self.conv_kernel - 1) // 2  # kernel 3: one zero frame each side, ceil(T / 2) outputs

    def out_lengths(self, lengths: Tensor) -> Tensor:
        """Per-sample output frames of the strided conv: (L + 2p - k) // s + 1, and 0 for an empty input."""
        n = torch.div(lengths + 2 * self.conv_padding - self.conv_kernel, self.conv_stride, rounding_mode="floor")
        n = n + 1
        return torch.where(lengths > 0, n.clamp(min=0), torch.zeros_like(n))


SPEECH_ADAPTER_PRESETS: dict[str, SpeechAdapterConfig] = {
    "tiny": SpeechAdapterConfig(enc_dim=64, dim=64, ffn_dim=128, n_heads=4, lm_dim=64),
    # Paper, sec. 8.1: latent 3072, FFN 4096, "about 100M parameters" (this one: 102M).
    "8B": SpeechAdapterConfig(enc_dim=1536, dim=3072, ffn_dim=4096, n_heads=24, lm_dim=4096),
    "70B": SpeechAdapterConfig(enc_dim=1536, dim=3072, ffn_dim=4096, n_heads=24, lm_dim=8192),
}


def speech_adapter_config(name: str, **overrides) -> SpeechAdapterConfig:
    """A preset with overrides; an unknown preset raises ``ValueError``, an unknown field ``TypeError``."""
    return preset_config(SPEECH_ADAPTER_PRESETS, name, "speech adapter", **overrides)


class AdapterAttention(nn.Module):
    """Bidirectional multi-head self-attention with RoPE (interleaved pairs, as the LM) and a key mask."""

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, key_mask: Tensor) -> Tensor:
        """x (B, T, D); rope (T, head_dim/2) complex; key_mask (B, T) bool, a True in every row."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class AdapterLayer(nn.Module):
    """Pre-norm Transformer layer: x + attn(RMSNorm x), then + SwiGLU(RMSNorm x).

    SwiGLU (the LM's own FFN, three matrices) rather than GELU (two): the paper says only "a rotary
    Transformer layer ... FFN 4096"; with SwiGLU the 8B adapter has 102M parameters, with GELU 90M,
    and the paper's figure is "about 100M".
    """

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = AdapterAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: Tensor, rope: Tensor, key_mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, key_mask)
        return h + self.feed_forward(self.ffn_norm(h))


class SpeechAdapter(nn.Module):
    """enc_out (B, T', enc_dim) + lengths (B,) -> (emb (B, T'', lm_dim), out_lengths (B,)), 0 at padding.

    Conv1d(k=3, s=2, p=1) over time (T'' = ceil(T' / 2); 40 ms -> 80 ms), one rotary Transformer layer,
    Linear(dim, lm_dim). Padded input frames are zeroed before the conv, so they read exactly as the conv's
    own zero padding would for the sample alone, and masked as keys: a sample's output does not depend on
    its batch-mates.
    """

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.conv = nn.Conv1d(cfg.enc_dim, cfg.dim, cfg.conv_kernel, stride=cfg.conv_stride,
                              padding=cfg.conv_padding)
        self.layer = AdapterLayer(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # a pre-norm stack ends with a norm (as the LM's ``norm``)
        self.output = nn.Linear(cfg.dim, cfg.lm_dim)

    def forward(self, enc_out: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        B, T, D = enc_out.shape
        if D != self.cfg.enc_dim:
            raise ValueError(f"encoder output has width {D}, SpeechAdapterConfig.enc_dim is {self.cfg.enc_dim}")
        if lengths.shape != (B,) or bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"lengths must be ({B},) in [0, {T}], got {lengths.tolist()}")
        x = enc_out.masked_fill(~length_mask(lengths, T)[..., None], 0.0).to(self.conv.weight.dtype)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T'', dim)
        out_lengths = self.cfg.out_lengths(lengths)
        valid = length_mask(out_lengths, x.shape[1])
        key_mask = valid | ~valid.any(-1, keepdim=True)  # an empty clip attends to its padding (zeroed later)
        # fp32 table rebuilt per call (cast at use): nothing for model.to(bf16) to round (as the Conformer).
        inv_freq = rope_frequencies(self.cfg.head_dim, self.cfg.rope_theta, None)
        rope = rope_table(inv_freq, torch.arange(x.shape[1], device=x.device))
        x = self.output(self.norm(self.layer(x, rope, key_mask)))
        return x.masked_fill(~valid[..., None], 0.0), out_lengths


def adapter_param_count(name: str) -> int:
    """Parameters of an adapter preset, built on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in SpeechAdapter(speech_adapter_config(name)).parameters())


# ----------------------------------------------------------------------------------------------
# Speech model


@dataclass(frozen=True)
class SpeechLlamaConfig:
    lm: LlamaConfig = field(default_factory=lambda: llama_config("8B"))
    encoder: ConformerConfig = field(default_factory=lambda: conformer_config("1B"))
    adapter: SpeechAdapterConfig = field(default_factory=lambda: speech_adapter_config("8B"))
    features: LogMelConfig = field(default_factory=LogMelConfig)
    max_seq_len: int | None = None  # longest spliced row; None = lm.max_seq_len

    def __post_init__(self) -> None:
        if self.adapter.enc_dim != self.encoder.dim:
            raise ValueError(f"adapter.enc_dim {self.adapter.enc_dim} != encoder.dim {self.encoder.dim}")
        if self.adapter.lm_dim != self.lm.dim:
            raise ValueError(f"adapter.lm_dim {self.adapter.lm_dim} != lm.dim {self.lm.dim}")
        if self.features.n_mels != self.encoder.n_mels:
            raise ValueError(f"features.n_mels {self.features.n_mels} != encoder.n_mels {self.encoder.n_mels}")

    @property
    def audio_token_id(self) -> int:
        return self.lm.vocab_size + AUDIO_TOKEN_ROW

    @property
    def seq_limit(self) -> int:
        return self.max_seq_len if self.max_seq_len is not None else self.lm.max_seq_len


SPEECH_PRESETS: dict[str, SpeechLlamaConfig] = {
    "tiny": SpeechLlamaConfig(lm=llama_config("tiny"), encoder=conformer_config("tiny"),
                              adapter=speech_adapter_config("tiny")),
    "8B": SpeechLlamaConfig(lm=llama_config("8B"), encoder=conformer_config("1B"),
                            adapter=speech_adapter_config("8B")),
    "70B": SpeechLlamaConfig(lm=llama_config("70B"), encoder=conformer_config("1B"),
                             adapter=speech_adapter_config("70B")),
}


def speech_llama_config(name: str, **overrides) -> SpeechLlamaConfig:
    return preset_config(SPEECH_PRESETS, name, "speech", **overrides)


@dataclass
class SpeechInputs:
    """The LM's input after the splice. ``valid`` (B, S) marks real positions; ``positions`` (B, S) are
    RoPE positions (0 at each row's first real position); ``lengths`` (B,) real positions per row.
    ``left_padded`` rows (generation) need ``attention_mask``; right-padded rows are plain causal."""

    embeds: Tensor  # (B, S, D)
    labels: Tensor | None  # (B, S), IGNORE_INDEX on audio and padding
    valid: Tensor
    positions: Tensor
    lengths: Tensor
    left_padded: bool = False

    def attention_mask(self) -> Tensor | None:
        """None (SDPA's causal path) for right padding; else (B, 1, S, S) bool, True = may attend."""
        if not self.left_padded:
            return None
        S = self.valid.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=self.valid.device).tril()
        self_only = torch.eye(S, dtype=torch.bool, device=self.valid.device)
        # A pad query sees only itself (no fully masked row, no NaN); real queries never see a pad key.
        return ((causal & self.valid[:, None, :]) | self_only)[:, None]


@dataclass
class SpeechOutput:
    logits: Tensor | None  # (B, S, vocab) fp32 over the spliced sequence
    loss: Tensor | None  # mean next-token CE over the supervised (non-ignored) targets
    n_tokens: Tensor | None
    inputs: SpeechInputs


class SpeechLlama(nn.Module):
    """Frozen Llama + log-mel front end + Conformer encoder + speech adapter (the latter two train)."""

    def __init__(self, cfg: SpeechLlamaConfig, lm: Llama | None = None):
        super().__init__()
        self.cfg = cfg
        self.lm = (lm if lm is not None else Llama(cfg.lm)).freeze()
        self.features = LogMel(cfg.features)  # no parameters
        self.encoder = ConformerEncoder(cfg.encoder)
        self.adapter = SpeechAdapter(cfg.adapter)

    def encode_audio(self, waves: Tensor, wave_lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """waves (N, samples) at 16 kHz -> adapter outputs (N, L, lm_dim) in the LM's dtype, lengths (N,)."""
        feats, frames = self.features(waves, wave_lengths)
        enc, enc_lengths = self.encoder(normalize_features(feats, frames), frames)
        emb, lengths = self.adapter(enc, enc_lengths)
        return emb.to(self.lm.tok_embeddings.weight.dtype), lengths

    def prepare_inputs(
        self,
        tokens: Tensor,
        labels: Tensor | None = None,
        audio_emb: Tensor | None = None,
        audio_lengths: Tensor | None = None,
        *,
        token_lengths: Tensor | None = None,
        left_pad: bool = False,
    ) -> SpeechInputs:
        """Splice clips into the token stream.

        tokens (B, T) with one ``audio_token_id`` per clip; labels (B, T) token-aligned (as
        ``encode_training_example``: labels[t] = tokens[t] or -100); audio_emb (N, L, D) and
        audio_lengths (N,) hold the clips in row-major placeholder order (N = placeholders in the batch);
        token_lengths (B,) real tokens per row (None: whole rows; trailing pads then count as content,
        harmless under causal attention). Raises ``ValueError`` rather than truncate anything.
        """
        B, T = tokens.shape
        vocab, audio_id = self.cfg.lm.vocab_size, self.cfg.audio_token_id
        is_audio = tokens == audio_id
        if bool(((tokens >= vocab) & ~is_audio).any()) or bool((tokens < 0).any()):
            raise ValueError(f"token ids must lie in [0, {vocab}) or be <|audio|> = {audio_id}")
        n_clips, n_given = int(is_audio.sum()), 0 if audio_emb is None else audio_emb.shape[0]
        if n_clips != n_given:
            raise ValueError(f"{n_clips} <|audio|> placeholders in the batch but {n_given} clips")
        if labels is not None and bool((labels[is_audio] != IGNORE_INDEX).any()):
            raise ValueError("an <|audio|> placeholder carries a label: it would be dropped by the splice")
        if token_lengths is None:
            token_lengths = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        if audio_lengths is None and audio_emb is not None:
            audio_lengths = torch.full((n_clips,), audio_emb.shape[1], dtype=torch.long, device=tokens.device)
        if audio_emb is not None and bool(((audio_lengths < 0) | (audio_lengths > audio_emb.shape[1])).any()):
            raise ValueError(f"audio_lengths must lie in [0, {audio_emb.shape[1]}], got {audio_lengths.tolist()}")
        text = self.lm.tok_embeddings(tokens.masked_fill(is_audio, 0))
        D = text.shape[-1]
        rows, row_labels, clip = [], [], 0
        for b in range(B):
            n_tok = int(token_lengths[b])
            if bool(is_audio[b, n_tok:].any()):
                raise ValueError(f"row {b}: an <|audio|> placeholder lies past token_lengths[{b}] = {n_tok}")
            pieces, lab_pieces, prev = [], [], 0
            for p in is_audio[b, :n_tok].nonzero().flatten().tolist():
                n = int(audio_lengths[clip])
                pieces += [text[b, prev:p], audio_emb[clip, :n].to(text.dtype)]
                if labels is not None:
                    lab_pieces += [labels[b, prev:p], labels.new_full((n,), IGNORE_INDEX)]
                prev, clip = p + 1, clip + 1
            pieces.append(text[b, prev:n_tok])
            rows.append(torch.cat(pieces))
            if labels is not None:
                row_labels.append(torch.cat([*lab_pieces, labels[b, prev:n_tok]]))
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=tokens.device)
        if B and int(lengths.max()) > self.cfg.seq_limit:
            b = int(lengths.argmax())
            raise ValueError(f"row {b}: {int(lengths[b])} positions after splicing audio exceed max_seq_len "
                             f"{self.cfg.seq_limit}; labels are never truncated: shorten the audio or the text")
        S = int(lengths.max()) if B else 0
        embeds = text.new_zeros(B, S, D)
        out_labels = None if labels is None else labels.new_full((B, S), IGNORE_INDEX)
        ar = torch.arange(S, device=tokens.device)
        start = (S - lengths) if left_pad else torch.zeros_like(lengths)
        for b, r in enumerate(rows):
            s = int(start[b])
            embeds[b, s : s + len(r)] = r
            if out_labels is not None:
                out_labels[b, s : s + len(r)] = row_labels[b]
        valid = (ar[None, :] >= start[:, None]) & (ar[None, :] < (start + lengths)[:, None])
        positions = (ar[None, :] - start[:, None]).clamp(min=0)
        return SpeechInputs(embeds, out_labels, valid, positions, lengths, left_pad)

    def hidden(self, embeds: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
               cache: list[KVCache] | None = None, start_pos: int = 0) -> Tensor:
        """The frozen LM's layer loop on input embeddings (B, S, D) -> final-normed hidden (B, S, D).

        ``positions`` None means start_pos.. (exactly ``Llama.forward``); ``mask`` None means causal.
        """
        rope = self.lm.rope(embeds.shape[1], start_pos, positions)
        h = embeds
        for i, layer in enumerate(self.lm.layers):
            h = layer(h, rope, mask, cache[i] if cache is not None else None, start_pos)
        return self.lm.norm(h)

    def forward(
        self,
        tokens: Tensor,
        labels: Tensor | None = None,
        waves: Tensor | None = None,
        wave_lengths: Tensor | None = None,
        *,
        token_lengths: Tensor | None = None,
        return_logits: bool = True,
    ) -> SpeechOutput:
        """tokens (B, T) with <|audio|> placeholders; waves (N, samples), one clip per placeholder.

        -> `SpeechOutput`: logits over the spliced sequence and, with labels, the mean CE over the
        supervised targets (only those positions go through the LM head for the loss).
        """
        audio_emb = audio_lengths = None
        if waves is not None and waves.shape[0]:
            audio_emb, audio_lengths = self.encode_audio(waves, wave_lengths)
        inputs = self.prepare_inputs(tokens, labels, audio_emb, audio_lengths, token_lengths=token_lengths)
        h = self.hidden(inputs.embeds)  # right-padded: causal, positions 0.. (see the module docstring)
        loss = n = None
        if labels is not None:
            targets = shift_targets(inputs.labels, self.cfg.lm.vocab_size)
            keep = targets != IGNORE_INDEX
            n = keep.sum()
            loss = F.cross_entropy(self.lm.output(h[keep]).float(), targets[keep], reduction="sum")
            loss = loss / n.clamp(min=1)
        logits = self.lm.output(h).float() if return_logits else None
        return SpeechOutput(logits, loss, n, inputs)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "SpeechLlama":
        super().train(mode)
        self.lm.eval()  # frozen LM: always eval
        return self


def build_speech_llama(cfg: SpeechLlamaConfig | str, lm: Llama | None = None) -> SpeechLlama:
    """The composed speech model around a (given or randomly initialised) frozen LM."""
    if isinstance(cfg, str):
        cfg = speech_llama_config(cfg)
    if lm is None:
        lm = build_llama(cfg.lm)
    elif lm.cfg != cfg.lm:
        raise ValueError(f"the given LM's config {lm.cfg} differs from cfg.lm {cfg.lm}")
    return SpeechLlama(cfg, lm)


# ----------------------------------------------------------------------------------------------
# Generation


@torch.inference_mode()
def speech_decode(
    model: SpeechLlama,
    tokens: Tensor,
    waves: Tensor | None,
    lengths: Tensor | None,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: Iterable[int] = (),
    token_lengths: Tensor | None = None,
) -> Iterator[Tensor]:
    """`adapters.generation.decode` for the speech model, with the LM's KV cache: yields the next token of
    every row, (B,), until every row hit a stop id or ``sampling.max_new_tokens`` are out.

    tokens (B, T) prompts (placeholders as in `SpeechLlama.prepare_inputs`), waves (N, samples) and
    lengths (N,) the clips. Rows of different spliced lengths are left-padded so every row's next token
    goes to the same cache slot; each row's positions start at 0 and its pad keys are masked.
    """
    audio_emb = audio_lengths = None
    if waves is not None and waves.shape[0]:
        audio_emb, audio_lengths = model.encode_audio(waves, lengths)
    inputs = model.prepare_inputs(tokens, None, audio_emb, audio_lengths, token_lengths=token_lengths,
                                  left_pad=True)
    B, S, _ = inputs.embeds.shape
    check_length(S, sampling.max_new_tokens, model.lm.cfg.max_seq_len)
    cache = model.lm.new_cache(B, S + sampling.max_new_tokens)
    h = model.hidden(inputs.embeds, inputs.positions, inputs.attention_mask(), cache)
    key_valid = torch.cat([inputs.valid, inputs.valid.new_ones(B, sampling.max_new_tokens)], 1)

    def step(nxt: Tensor, i: int) -> Tensor:
        pos = S + i
        h = model.hidden(model.lm.tok_embeddings(nxt[:, None]), (inputs.lengths + i)[:, None],
                         key_valid[:, None, None, : pos + 1], cache, pos)
        return model.lm.output(h[:, -1])

    yield from decode(model.lm.output(h[:, -1]), step, sampling, stop_ids)


# ----------------------------------------------------------------------------------------------
# Prompts (system prompts select the task, sec. 8.1)


def asr_prompt(language: str = "English") -> str:
    return f"Repeat after me in {language}:"


def ast_prompt(target: str = "English") -> str:
    return f"Translate the audio into {target}:"


def encode_speech_dialog(tok: Tokenizer, system: str, n_audio: int = 1, user_text: str = "",
                         add_generation_prompt: bool = True) -> list[int]:
    """Llama 3 chat prompt: BOS, system turn (skipped if empty), user turn with ``n_audio`` placeholders
    before its text (where ``adapters.chat`` puts <|image|>), then the assistant header."""
    ids = [tok.bos_id]
    if system:
        ids += [*encode_header(tok, "system"), *tok.encode(system.strip()), tok.eot_id]
    ids += [*encode_header(tok, "user"), *([audio_input_id(tok)] * n_audio), *tok.encode(user_text.strip()),
            tok.eot_id]
    if add_generation_prompt:
        ids += encode_header(tok, "assistant")
    return ids


def encode_speech_training_example(tok: Tokenizer, system: str, answer: str, n_audio: int = 1,
                                   user_text: str = "") -> tuple[list[int], list[int]]:
    """(tokens, labels): only the answer and its eot are labelled (as ``encode_training_example``)."""
    prompt = encode_speech_dialog(tok, system, n_audio, user_text)
    target = [*tok.encode(answer.strip()), tok.eot_id]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target
