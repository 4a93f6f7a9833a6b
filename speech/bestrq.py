"""BEST-RQ self-supervised pre-training of the speech encoder (Chiu et al. 2022, arXiv 2202.01855).

Llama 3 paper, sec. 8.1: mask 32-frame spans of the input mel-spectrogram with probability 2.5%;
targets from a random-projection quantizer (stack 4 mel frames -> 320 dims -> 16 dims -> cosine nearest
neighbour in 8,192 codes), 16 independent codebooks, projection and codebooks random and never updated;
one softmax per codebook on the masked frames only.

    model = BestRQ(ConformerEncoder(conformer_config("tiny")), dim=64)
    out = model(mel, lengths)            # mel (B, T, 80) log-mel, lengths (B,) in 10 ms frames
    out["loss"].backward()

Decisions (see also `BestRQConfig`):

* **Mask units.** ``mask_prob`` and ``mask_span`` are the paper's, in 10 ms mel frames (32 frames =
  320 ms, like BEST-RQ's original 40 frames = 400 ms). Masks are drawn on the 40 ms stacked grid, so an
  encoder frame is either fully masked or not (no NeMo-style "80% of sub-frames masked" threshold), with
  span 32 / 4 = 8 stacked frames and start probability 1 - (1 - p)^4 per stacked frame. That is exactly
  "each mel frame starts a span with p, starts snapped down to a multiple of 4": same expected masked
  fraction 1 - (1 - p)^32 = 55.5% and the same 320 ms spans.
* **Normalisation.** Features are normalised per utterance (zero mean, unit variance per mel bin over
  the valid frames) before anything else: unnormalised inputs collapse the random quantizer onto a few
  codes. Targets come from the normalised, unmasked features; no learnable norm before the quantizer
  (it would move the targets).
* **Noise.** Masked mel frames (valid ones only; padding stays 0) are replaced by N(0, noise_std^2)
  noise, noise_std = 0.1 relative to the unit-variance features (BEST-RQ paper; NeMo uses a mask
  embedding instead).
* **Frozen parts.** Projection and codebooks are persistent buffers, drawn from a local
  ``torch.Generator(seed)`` (never the global RNG: identical on every rank, and checkpoints carry them),
  kept in fp32 through ``model.to(bf16)``, and used in fp32 with autocast off: bf16 moves argmax ties.

Not here: the random crop of utterances over 60 s to 6,000 frames (sec. 8.1) belongs to the data loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech.conformer import length_mask
from speech.features import normalize_features


@dataclass(frozen=True, kw_only=True)
class BestRQConfig:
    n_mels: int = 80
    stack: int = 4  # mel frames per target / encoder frame: 10 ms -> 40 ms (sec. 8.1)
    codebook_dim: int = 16
    n_codebooks: int = 16  # independent (projection, codebook) pairs, one softmax each
    codebook_size: int = 8192
    mask_prob: float = 0.025  # span-start probability per 10 ms mel frame (sec. 8.1)
    mask_span: int = 32  # span length in 10 ms mel frames (320 ms); a multiple of `stack`
    noise_std: float = 0.1  # masked frames -> N(0, noise_std^2), features being unit-variance
    seed: int = 0  # of the frozen projection and codebooks

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"BestRQConfig.{f.name} must be an int, got {value!r}")
            if f.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"BestRQConfig.{f.name} must be a number, got {value!r}")
        for name in ("n_mels", "stack", "codebook_dim", "n_codebooks", "codebook_size", "mask_span"):
            if getattr(self, name) < 1:
                raise ValueError(f"BestRQConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"BestRQConfig.mask_prob must be in (0, 1), got {self.mask_prob!r}")
        if self.mask_span % self.stack:
            raise ValueError(f"BestRQConfig.mask_span {self.mask_span} must be a multiple of stack "
                             f"{self.stack}: masks are drawn on the stacked (encoder) frame grid")
        if not (self.noise_std >= 0.0 and math.isfinite(self.noise_std)):
            raise ValueError(f"BestRQConfig.noise_std must be finite and >= 0, got {self.noise_std!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"BestRQConfig.seed must be in [0, 2**63), got {self.seed!r}")

    @property
    def stacked_mask_prob(self) -> float:
        """Span-start probability per stacked frame: some of its `stack` mel frames starts a span."""
        return 1.0 - (1.0 - self.mask_prob) ** self.stack

    @property
    def stacked_mask_span(self) -> int:
        return self.mask_span // self.stack

    @property
    def expected_masked_fraction(self) -> float:
        """Away from the utterance start: 1 - (1 - p)^span (0.555 for the paper's values)."""
        return 1.0 - (1.0 - self.mask_prob) ** self.mask_span


def stack_frames(x: Tensor, stack: int) -> Tensor:
    """(B, T, F) -> (B, ceil(T / stack), stack * F), zero-padded at the end; frame-major, as the
    Conformer's `FrameStacker`, so a target and the encoder frame it labels see the same mel frames."""
    B, T, n = x.shape
    x = F.pad(x, (0, 0, 0, -T % stack))
    return x.reshape(B, x.shape[1] // stack, stack * n)


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projection + codebooks: stacked features (B, T', stack*n_mels) -> codes (B, T', K)."""

    def __init__(self, cfg: BestRQConfig):
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        in_dim = cfg.stack * cfg.n_mels
        projection = torch.empty(cfg.n_codebooks, in_dim, cfg.codebook_dim)
        for proj in projection:  # Xavier per codebook, as NeMo / lucidrains (BEST-RQ paper, sec. 3.1)
            nn.init.xavier_normal_(proj, generator=g)
        codebooks = torch.randn(cfg.n_codebooks, cfg.codebook_size, cfg.codebook_dim, generator=g)
        codebooks = F.normalize(codebooks, dim=-1)  # standard normal, then unit length (BEST-RQ)
        self.register_buffer("projection", projection)  # (K, in_dim, codebook_dim)
        self.register_buffer("codebooks", codebooks)  # (K, codebook_size, codebook_dim), unit rows

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would round the codebooks and so change the targets: keep the
        # fp32 originals (moved to the new device) whenever a conversion changes their dtype.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    @torch.no_grad()
    def targets(self, stacked: Tensor) -> Tensor:
        """stacked (B, T', stack*n_mels) -> (B, T', K) long: per codebook k, argmax_i <c_ki, l2norm(x A_k)>.

        fp32 whatever the input dtype or autocast state. One codebook at a time keeps the similarity
        tensor at (B, T', codebook_size), not (B, T', K, codebook_size) (0.5 GB per 1,000 frames).
        """
        if stacked.shape[-1] != self.projection.shape[1]:
            raise ValueError(f"stacked features have {stacked.shape[-1]} dims, the projection expects "
                             f"{self.projection.shape[1]}")
        with torch.autocast(device_type=stacked.device.type, enabled=False):
            y = torch.einsum("btd,kdc->btkc", stacked.float(), self.projection.float())
            y = F.normalize(y, dim=-1)
            codes = [(y[:, :, k] @ book.float().T).argmax(-1) for k, book in enumerate(self.codebooks)]
        return torch.stack(codes, dim=-1)


def span_mask(lengths: Tensor, prob: float, span: int, generator: torch.Generator | None = None,
              total: int | None = None) -> Tensor:
    """(B,) lengths in frames -> (B, total) bool span mask, total defaulting to max(lengths).

    Every valid frame starts a span with probability ``prob``, independently; a span masks
    [start, start + span) clipped to the sample's length, so padding is never masked. Spans may overlap:
    the expected masked fraction is 1 - (1 - prob)^span away from the start of the utterance (less in its
    first span - 1 frames). A non-empty sample that drew no start gets one uniformly random start, so
    every non-empty sample has a masked frame (a loss term); for the paper's values this only happens
    for utterances of a few seconds or less. Random numbers come from ``generator`` (default: global RNG).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"span_mask: prob must be in [0, 1], got {prob!r}")
    if span < 1:
        raise ValueError(f"span_mask: span must be >= 1, got {span!r}")
    if lengths.ndim != 1:
        raise ValueError(f"span_mask: lengths must be (B,), got shape {tuple(lengths.shape)}")
    B = lengths.shape[0]
    longest = int(lengths.max()) if B else 0
    total = longest if total is None else total
    if total < longest or bool((lengths < 0).any()):
        raise ValueError(f"span_mask: lengths must lie in [0, {total}], got {lengths.tolist()}")
    device = lengths.device
    rng_device = generator.device if generator is not None else device
    u = torch.rand(B, total, generator=generator, device=rng_device).to(device)
    fallback = torch.rand(B, generator=generator, device=rng_device).to(device)
    valid = length_mask(lengths, total)
    starts = (u < prob) & valid
    fallback = (fallback * lengths).long().clamp(max=max(total - 1, 0))  # uniform in [0, len)
    none = ~starts.any(-1) & (lengths > 0)
    starts[none, fallback[none]] = True
    # Frame t is masked iff a span starts in (t - span, t]: a windowed count of starts via cumsum.
    count = starts.long().cumsum(-1)
    before = torch.cat([count.new_zeros(B, span), count], dim=-1)[:, :total]
    return (count - before > 0) & valid


class BestRQ(nn.Module):
    """Encoder + frozen quantizer + one linear head per codebook; forward returns the loss and metrics.

    encoder: ``forward(mel (B, T, n_mels), lengths (B,)) -> (h (B, ceil(T / stack), dim), out_lengths)``
    with out_lengths = ceil(lengths / stack), as `speech.conformer.ConformerEncoder`.
    The heads are the only parameters added; the quantizer holds buffers, so an optimizer over
    ``parameters()`` never sees it.
    """

    def __init__(self, encoder: nn.Module, dim: int, cfg: BestRQConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else BestRQConfig()
        self.encoder = encoder
        self.quantizer = RandomProjectionQuantizer(cfg)
        self.heads = nn.ModuleList(nn.Linear(dim, cfg.codebook_size) for _ in range(cfg.n_codebooks))

    def forward(self, mel: Tensor, lengths: Tensor,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """mel (B, T, n_mels) log-mel, lengths (B,) valid mel frames -> dict of scalars (metrics detached):

        loss: mean over codebooks of the cross-entropy on masked valid encoder frames;
        accuracy: mean over codebooks of argmax == target on those frames;
        masked_fraction: masked / valid encoder frames;
        target_perplexity: exp(entropy) of each codebook's target histogram on valid frames, averaged
            (collapse check: near 1 means the quantizer sees nearly constant inputs);
        plus ``mask`` (B, T') bool and ``targets`` (B, T', K) long for analysis.
        ``generator`` drives the masks and the noise (default: the global RNG).
        """
        cfg = self.cfg
        B, T, n_mels = mel.shape
        if n_mels != cfg.n_mels:
            raise ValueError(f"mel has {n_mels} bins, BestRQConfig.n_mels is {cfg.n_mels}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths shape {tuple(lengths.shape)} should be ({B},)")
        if bool(((lengths < 0) | (lengths > T)).any()) or not bool((lengths > 0).any()):
            raise ValueError(f"lengths must lie in [0, {T}] with one > 0, got {lengths.tolist()}")
        valid = length_mask(lengths, T)
        x = normalize_features(mel.float(), lengths).masked_fill(~valid[..., None], 0.0)

        stacked_lengths = torch.div(lengths + cfg.stack - 1, cfg.stack, rounding_mode="floor")
        stacked = stack_frames(x, cfg.stack)
        targets = self.quantizer.targets(stacked)  # from the unmasked features
        mask = span_mask(stacked_lengths, cfg.stacked_mask_prob, cfg.stacked_mask_span, generator,
                         total=stacked.shape[1])

        mel_mask = mask.repeat_interleave(cfg.stack, dim=1)[:, :T] & valid
        rng_device = generator.device if generator is not None else mel.device
        noise = torch.randn(x.shape, generator=generator, device=rng_device).to(mel.device) * cfg.noise_std
        x = torch.where(mel_mask[..., None], noise, x).to(mel.dtype)

        h, out_lengths = self.encoder(x, lengths)
        if h.shape[:2] != mask.shape or bool((out_lengths != stacked_lengths).any()):
            raise ValueError(f"encoder gave (B, T') {tuple(h.shape[:2])}, lengths {out_lengths.tolist()}; "
                             f"expected {tuple(mask.shape)}, "
                             f"ceil(lengths / {cfg.stack}) = {stacked_lengths.tolist()}")
        h, picked = h[mask], targets[mask]  # (N, dim), (N, K): masked frames only, all valid by construction
        losses, correct = [], []
        for k, head in enumerate(self.heads):
            logits = head(h).float()
            losses.append(F.cross_entropy(logits, picked[:, k]))
            correct.append((logits.detach().argmax(-1) == picked[:, k]).float().mean())

        stacked_valid = length_mask(stacked_lengths, stacked.shape[1])
        return {
            "loss": torch.stack(losses).mean(),
            "accuracy": torch.stack(correct).mean(),
            "masked_fraction": mask.sum() / stacked_valid.sum(),
            "target_perplexity": code_perplexity(targets[stacked_valid], cfg.codebook_size),
            "mask": mask,
            "targets": targets,
        }


def code_perplexity(codes: Tensor, codebook_size: int) -> Tensor:
    """codes (N, K) long -> mean over the K codebooks of exp(entropy of the code histogram)."""
    K = codes.shape[1]
    offsets = torch.arange(K, device=codes.device) * codebook_size
    counts = torch.bincount((codes + offsets).flatten(), minlength=K * codebook_size).view(K, codebook_size)
    p = counts.float() / counts.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(-(p * p.clamp(min=1e-12).log()).sum(-1)).mean()
