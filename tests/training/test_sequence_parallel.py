"""Image-encoder sequence parallelism: 2 processes (gloo) against the unsplit encoder in this process, and the
size checks that need no second process.

The distributed run (``sp_worker.py``) splits the tiny encoder (tiles of 24 tokens: 12 per rank, the pad
tokens on rank 1; taps on block 0 and on consecutive blocks; gates opened), runs one forward/backward, then
one with activation checkpointing, and the same two with ``recompute_kv``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.training import sp_worker
from tests.training.ranks import run_ranks
from training.sequence_parallel import (
    SequenceParallelError,
    apply_encoder_sequence_parallel,
    tile_tokens,
    validate_sp_size,
)
from vision.encoder import vision_config


def test_sizes_that_do_not_split_tiles_are_refused_with_the_padding_that_works():
    tiny = vision_config("tiny")  # 17 tokens + 7 pad = 24
    assert tile_tokens(tiny) == 24
    for world in (1, 2, 3, 4):
        validate_sp_size(tiny, world)
    with pytest.raises(SequenceParallelError, match=r"pad_to_multiple = 8 gives tiles of 24 .* size 5: .* "
                                                    r"pad_to_multiple = 40 \(tiles of 40 tokens"):
        validate_sp_size(tiny, 5)
    with pytest.raises(SequenceParallelError, match=r"pad_to_multiple = 1 gives tiles of 17 .* "
                                                    r"pad_to_multiple = 2 \(tiles of 18 tokens"):
        validate_sp_size(vision_config("tiny", pad_to_multiple=1), 2)
    for tile in (336, 448, 560):  # released sizes: 584, 1032, 1608 tokens split over up to 8 ranks
        validate_sp_size(vision_config("vit_h14", tile_size=tile), 8)
    with pytest.raises(SequenceParallelError, match="size 16"):
        validate_sp_size(vision_config("vit_h14", tile_size=448), 16)
    with pytest.raises(SequenceParallelError, match="Linear"):
        apply_encoder_sequence_parallel(nn.Linear(2, 2), group=None)


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory) -> Path:
    return run_ranks("tests.training.sp_worker", tmp_path_factory.mktemp("sp2"), [])


def _reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    enc = sp_worker.build_test_encoder()
    out = enc(*sp_worker.test_batch(enc))
    sp_worker.loss(out).backward()
    return out.detach(), {n: p.grad for n, p in enc.named_parameters()}


def test_split_encoder_matches_the_unsplit_one(sp_run):
    want, grads = _reference()
    outs = [torch.load(sp_run / f"out_{rank}.pt") for rank in range(2)]
    assert torch.equal(outs[0], outs[1])  # gathered: the same tensor on every rank
    for name in ("grads", "ckpt_grads", "recompute_grads", "ckpt_recompute_grads"):
        got = [load_file(str(sp_run / f"{name}_{rank}.safetensors")) for rank in range(2)]
        assert got[0].keys() == got[1].keys() == grads.keys()
        for n in grads:  # replicated parameters need identical gradients (DeepSpeed counts them once)
            assert torch.equal(got[0][n], got[1][n]), (name, n)
    for rank in range(2):
        torch.testing.assert_close(outs[rank], want, rtol=0, atol=1e-5)
        for name in ("grads", "ckpt_grads", "recompute_grads", "ckpt_recompute_grads"):
            got = load_file(str(sp_run / f"{name}_{rank}.safetensors"))
            for n, g in grads.items():
                scale = g.abs().max()
                assert scale > 0, n  # every parameter takes part (gates opened)
                # fp32 sums in another order: ~1e-7 of the largest element (up to ~200 here)
                torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6 * scale, msg=f"{name} rank {rank}: {n}")
        errors = json.loads((sp_run / f"errors_{rank}.json").read_text())
        assert "already applied" in errors["twice"]
