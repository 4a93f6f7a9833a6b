"""One rank of the encoder sequence-parallel test (tests/training/test_sequence_parallel.py).

Launched with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (world 2, one group); writes into ``--out``:
``out_{rank}.pt`` (split encoder output), ``grads_{rank}.safetensors`` (every parameter's gradient after one
backward of `loss`), ``ckpt_grads_{rank}.safetensors`` (the same with activation checkpointing),
``recompute_grads_{rank}.safetensors`` / ``ckpt_recompute_grads_{rank}.safetensors`` (``recompute_kv=True``,
without and with activation checkpointing) and ``errors_{rank}.json`` (the message of a second
`apply_encoder_sequence_parallel`).
The encoder, batch and loss builders are importable alone, so the parent computes the unsplit reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from vision.encoder import VisionEncoder, build_vision_encoder, vision_config


def build_test_encoder() -> VisionEncoder:
    """Tiny encoder (tiles of 17 + 7 pad tokens, 8 blocks, 2 global) with a tap on block 0's input too, and
    every gate opened so all parameters get gradients."""
    torch.manual_seed(0)
    enc = build_vision_encoder(vision_config("tiny", taps=(0, 3, 5, 6, 7)))
    with torch.no_grad():
        enc.gated_positional_embedding_gate.fill_(0.5)
        enc.pre_tile_pos_embed.gate.fill_(0.4)
        enc.post_tile_pos_embed.gate.fill_(-0.3)
        for blk in enc.global_transformer.resblocks:
            blk.gate_attn.fill_(0.6)
            blk.gate_ffn.fill_(-0.5)
    return enc


def test_batch(enc: VisionEncoder) -> tuple[Tensor, Tensor, Tensor]:
    """Two images of 4 tile slots: a 2x2 grid and a 1x3 grid (one padded tile)."""
    g = torch.Generator().manual_seed(1)
    S = enc.cfg.tile_size
    tiles = torch.randn(2, 4, 3, S, S, generator=g)
    layout = torch.tensor([[2, 2], [1, 3]])
    tile_mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    return tiles, layout, tile_mask


def loss(out: Tensor) -> Tensor:
    """A fixed random projection of the output: every output element gets its own gradient."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    return (out * w).sum()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    from training.sequence_parallel import SequenceParallelError, apply_encoder_sequence_parallel

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(args.out)
    enc = apply_encoder_sequence_parallel(build_test_encoder(), dist.group.WORLD)
    batch = test_batch(enc)
    feats = enc(*batch)
    torch.save(feats.detach(), out / f"out_{rank}.pt")
    loss(feats).backward()
    save_file({n: p.grad for n, p in enc.named_parameters()}, str(out / f"grads_{rank}.safetensors"))

    recompute = apply_encoder_sequence_parallel(build_test_encoder(), dist.group.WORLD, recompute_kv=True)
    for name, model in (("ckpt", enc), ("recompute", recompute), ("ckpt_recompute", recompute)):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(name.startswith("ckpt"))
        loss(model(*batch)).backward()
        save_file({n: p.grad for n, p in model.named_parameters()}, str(out / f"{name}_grads_{rank}.safetensors"))

    errors = {}
    try:
        apply_encoder_sequence_parallel(enc, dist.group.WORLD)
    except SequenceParallelError as e:
        errors["twice"] = str(e)
    (out / f"errors_{rank}.json").write_text(json.dumps(errors))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
