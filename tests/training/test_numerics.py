"""bf16 numerics of the vision-token gradient: every cross-attention layer reads the same projected image
tokens, so their gradient is a sum over layers; ``MultimodalLlama`` keeps the tokens FP32 and casts per
consumer so that sum runs in FP32 (Llama 3, "Model scaling": bf16 accumulation diverged).

The per-layer gradients themselves carry bf16 compute error (a few % against an FP32 model, measured
below and identical for both accumulation paths); what the accumulation dtype changes is how those
same per-layer gradients are added up. The reference is therefore their exact (fp64) sum, taken from
one backward pass in which every layer reads its own copy of the tokens.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from adapters.chat import IGNORE_INDEX
from adapters.cross_attention import text_image_mask
from adapters.llama import llama_config
from adapters.multimodal import (ImageBatch, MultimodalLlama, VisionContext, build_multimodal,
                                 multimodal_config)
from adapters.task import shift_targets

N_XATTN = 16  # one block per LM layer: 16 gradients to add up


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = multimodal_config("tiny", lm=llama_config("tiny", n_layers=N_XATTN), xattn_every=1)
    model = build_multimodal(cfg)
    with torch.no_grad():  # open the gates: closed ones pass no gradient to the vision tokens
        for blk in model.cross_attention_layers:
            blk.gate_attn.fill_(0.5)
            blk.gate_ffwd.fill_(-0.5)
    g = torch.Generator().manual_seed(1)
    B, T, S, n_tiles = 2, 24, cfg.vision.tile_size, cfg.vision.max_tiles
    tokens = torch.randint(0, cfg.lm.vocab_size, (B, T), generator=g)
    tokens[:, 1] = cfg.image_token_id
    labels = tokens.clone()
    labels[:, :3] = IGNORE_INDEX
    tile_mask = torch.zeros(B, 1, n_tiles, dtype=torch.bool)
    tile_mask[:, :, :2] = True
    images = ImageBatch(torch.randn(B, 1, n_tiles, 3, S, S, generator=g), torch.tensor([[[1, 2]], [[2, 1]]]),
                        tile_mask, torch.ones(B, 1, dtype=torch.bool))
    with torch.no_grad():
        feats = model.encode_images(images)  # (B, I * tiles * N, D) fp32
    bf16 = copy.deepcopy(model)
    for p in bf16.parameters():  # parameters only, as DeepSpeed's bf16 mode (RoPE buffer stays fp32)
        p.data = p.data.to(torch.bfloat16)
    return model, bf16, tokens, labels, images, feats


def _loss(model: MultimodalLlama, tokens, labels, ctx: VisionContext) -> torch.Tensor:
    targets = shift_targets(labels, model.cfg.lm.vocab_size)
    keep = targets != IGNORE_INDEX
    hidden = model(tokens, context=ctx, return_hidden=True)
    return F.cross_entropy(model.lm.output(hidden[keep]).float(), targets[keep])


def _grad_through_model(model, tokens, labels, images, feats) -> torch.Tensor:
    """The model's own path: ``vision_context`` gets ``feats`` from a patched ``encode_images``."""
    leaf = feats.detach().clone().requires_grad_()
    model.encode_images = lambda _images: leaf
    try:
        _loss(model, tokens, labels, model.vision_context(tokens, images)).backward()
    finally:
        del model.encode_images
    return leaf.grad


def _context(model, tokens, images, vis: list[torch.Tensor]) -> VisionContext:
    """A VisionContext whose layer j reads ``vis[j]`` (the pre-FP32 behaviour when all are one tensor)."""
    kv = [blk.attention.vision_kv(v) for blk, v in zip(model.cross_attention_layers, vis)]
    text_image = text_image_mask(tokens, model.cfg.image_token_id, images.image_mask)
    return VisionContext(kv, text_image, images.tile_mask, model.cfg.vision.n_tokens)


def test_vision_token_gradient_accumulates_in_fp32(setup):
    model, bf16, tokens, labels, images, feats = setup
    feats16 = feats.to(torch.bfloat16)
    # Path under test: the model's FP32 tokens, cast per consumer. (A bf16 projector's output is upcast
    # the same way; the leaf here is that FP32 copy, so its gradient is the FP32 sum itself.)
    fp32_acc = _grad_through_model(bf16, tokens, labels, images, feats16.float())
    assert fp32_acc.dtype == torch.float32
    # Plain bf16 accumulation: one bf16 tensor read by every layer.
    leaf = feats16.detach().clone().requires_grad_()
    _loss(bf16, tokens, labels, _context(bf16, tokens, images, [leaf] * N_XATTN)).backward()
    bf16_acc = leaf.grad
    assert bf16_acc.dtype == torch.bfloat16
    # Reference: the same per-layer bf16 gradients (one copy of the tokens per layer), summed exactly.
    copies = [feats16.detach().clone().requires_grad_() for _ in range(N_XATTN)]
    _loss(bf16, tokens, labels, _context(bf16, tokens, images, copies)).backward()
    parts = torch.stack([c.grad.double() for c in copies])
    exact = parts.sum(0)
    assert parts.flatten(1).norm(dim=1).min() > 0.05 * exact.norm()  # every layer contributes

    def err(g: torch.Tensor, ref: torch.Tensor) -> float:
        return ((g.double() - ref.double()).norm() / ref.double().norm()).item()

    e_fp32, e_bf16 = err(fp32_acc, exact), err(bf16_acc, exact)
    # What reaches the encoder in a bf16 model: the FP32 sum rounded once (the projector's cast).
    e_fp32_rounded = err(fp32_acc.to(torch.bfloat16), exact)
    # Measured: e_fp32 ~ 0 (16 bf16 values add exactly in fp32), e_fp32_rounded ~ 0.17 %, e_bf16 ~ 0.43 %.
    assert e_fp32 < 1e-6, e_fp32
    assert e_fp32_rounded < 0.6 * e_bf16, (e_fp32_rounded, e_bf16)
    assert e_bf16 > 1e-3, e_bf16  # bf16 accumulation really loses precision here (the test can tell)

    # Against a full-FP32 model both bf16 paths are dominated by per-layer compute error (a few %),
    # which the accumulation dtype does not touch; check it stays the same order, and report.
    ref32 = _grad_through_model(model, tokens, labels, images, feats)
    e32_fp32, e32_bf16 = err(fp32_acc, ref32), err(bf16_acc, ref32)
    assert e32_fp32 < 0.1 and abs(e32_fp32 - e32_bf16) < 0.1 * e32_bf16, (e32_fp32, e32_bf16)


def test_fp32_tokens_leave_the_forward_unchanged(setup):
    """Casting per consumer instead of once gives bitwise the same logits in a bf16 model."""
    _, bf16, tokens, _, images, feats = setup
    feats16 = feats.to(torch.bfloat16)
    with torch.no_grad():
        once = bf16(tokens, context=_context(bf16, tokens, images, [feats16] * N_XATTN))
        bf16.encode_images = lambda _images: feats16
        try:
            per_consumer = bf16(tokens, images)
        finally:
            del bf16.encode_images
    assert torch.equal(once, per_consumer)
