"""One rank of the pipeline test (tests/training/test_pipeline.py): a few ``engine.train_batch`` steps.

Launched by the test with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; writes what
the parent asserts on into ``--out``: ``losses.json`` (last stage), ``lm_{rank}.safetensors`` (the
stage's LM weights after the steps), ``encoder_{rank}.safetensors`` (its encoder + projector replica,
bf16 parameters and FP32 master weights), ``tied_{rank}.json`` (the tied parameter names) and
``export/`` (the trainable weights as each stage writes them, `training.loading.write_rank_shards`, with the
index rank 0 writes).
The model and batch builders are importable without DeepSpeed, so the parent can rebuild both.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from adapters.llama import llama_config
from adapters.multimodal import ImageBatch, MultimodalLlama, build_multimodal, multimodal_config
from tests.training.ranks import open_gates

MICRO_BATCH, GRAD_ACCUM, SEQ_LEN = 2, 2, 16
LR = 1e-3


def build_test_model() -> MultimodalLlama:
    """Tiny model through the real factories: 8 LM layers, a cross-attention block every 4 -> 2 groups.
    Gates opened (they start at 0, which would give the encoder no gradient on the first steps)."""
    torch.manual_seed(0)
    cfg = multimodal_config("tiny", lm=llama_config("tiny", n_layers=8), xattn_every=4)
    return open_gates(build_multimodal(cfg))


def micro_batches(model: MultimodalLlama, n: int,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, ImageBatch]]:
    """``n`` micro-batches of (tokens, labels, images): one image per row (1x2 or 2x1 tiles, so both
    tile slots are sometimes padding), the image token early, answers supervised after it."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    S, tiles = cfg.vision.tile_size, cfg.vision.max_tiles
    out = []
    for k in range(n):
        B = MICRO_BATCH
        tokens = torch.randint(0, cfg.lm.vocab_size, (B, SEQ_LEN), generator=g)
        labels = torch.full_like(tokens, -100)
        tile_mask = torch.zeros(B, 1, tiles, dtype=torch.bool)
        layouts = torch.ones(B, 1, 2, dtype=torch.long)
        for b in range(B):
            pos = 1 + (k + b) % 3
            tokens[b, pos] = cfg.image_token_id
            labels[b, pos + 2 :] = tokens[b, pos + 2 :]
            r, c = ((1, 2), (2, 1), (1, 1))[(k + 2 * b) % 3]
            layouts[b, 0] = torch.tensor([r, c])
            tile_mask[b, 0, : r * c] = True
        images = ImageBatch(torch.randn(B, 1, tiles, 3, S, S, generator=g), layouts, tile_mask,
                            torch.ones(B, 1, dtype=torch.bool))
        out.append((tokens, labels, images))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpoint-interval", type=int, default=1, help="activation checkpointing (0: off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import deepspeed  # noqa: PLC0415 (the parent imports this file for its builders, without DeepSpeed)
    from safetensors.torch import save_file  # noqa: PLC0415
    from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

    from adapters.model_io import INDEX  # noqa: PLC0415
    from training.loading import RankLayout, write_rank_shards  # noqa: PLC0415
    from training.pipeline import (  # noqa: PLC0415
        ENCODER_KEY, build_pipeline_module, pipeline_batch, pipeline_ds_config, pipeline_param_groups,
        stage_parameters)

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, out = int(os.environ["RANK"]), Path(args.out)
    model = build_test_model()
    module = build_pipeline_module(model, args.stages,
                                   activation_checkpoint_interval=args.checkpoint_interval)
    opt = torch.optim.AdamW(pipeline_param_groups(module, model, LR), lr=LR, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt,
                                      config=pipeline_ds_config(MICRO_BATCH, GRAD_ACCUM))
    batches = [pipeline_batch(*mb, n_tiles=model.cfg.vision.max_tiles)
               for mb in micro_batches(model, args.steps * GRAD_ACCUM)]
    data = iter(batches)
    losses = [float(engine.train_batch(data_iter=data)) for _ in range(args.steps)]

    names = module.model_names
    lm = {names[n]: p.detach().contiguous() for n, p in module.named_parameters()
          if names[n].startswith("lm.")}
    save_file(lm, str(out / f"lm_{rank}.safetensors"))
    enc = {}
    for n, p in module.tied_modules[ENCODER_KEY].named_parameters():
        enc[f"bf16.{n}"] = p.detach().contiguous()
        enc[f"fp32.{n}"] = safe_get_full_fp32_param(p).contiguous()
    save_file(enc, str(out / f"encoder_{rank}.safetensors"))
    (out / "export").mkdir(exist_ok=True)
    weight_map = write_rank_shards(stage_parameters(engine), RankLayout(args.stages, engine.stage_id), 0, None,
                                   out / "export", with_lm=False, master=safe_get_full_fp32_param)
    if rank == 0:
        (out / "export" / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if engine.is_last_stage():
        (out / "losses.json").write_text(json.dumps({"losses": losses, "stages": args.stages}))
    (out / f"tied_{rank}.json").write_text(json.dumps(module.tied_weight_attrs.get(ENCODER_KEY)))


if __name__ == "__main__":
    main()
