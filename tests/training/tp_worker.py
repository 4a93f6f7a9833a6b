"""One rank of the tensor-parallel test (tests/training/test_tensor_parallel.py).

Launched with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (world 2, tp 2); writes into ``--out``:
``logits_{rank}.pt`` (TP forward), ``grads_{rank}.safetensors`` (local gradients after one backward, with
``dims_{rank}.json`` naming the sharded ones and their split dim), ``export.safetensors`` (rank 0,
`tp_state_dict`), ``reload.safetensors`` (rank 0: the export loaded into a differently seeded sharded
model and gathered again) and, with DeepSpeed, ``ds.json`` (losses of ZeRO-1 steps) and
``ds_export.safetensors`` (rank 0, trainable weights after the steps).
The model, batch and config builders import without DeepSpeed, so the parent can rebuild the reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adapters.multimodal import MultimodalLlama, build_multimodal, multimodal_config
from tests.training.pipe_worker import micro_batches
from tests.training.ranks import open_gates

LR, CLIP, DS_STEPS = 1e-3, 0.5, 2


def build_test_model(seed: int = 0) -> MultimodalLlama:
    """Tiny model (4 heads, 2 KV heads, FFN 192: all split by 2); gates opened so cross-attention and
    the encoder contribute to logits and gradients."""
    torch.manual_seed(seed)
    return open_gates(build_multimodal(multimodal_config("tiny")))


def ds_config() -> dict:
    """FP32 ZeRO-1 with clipping (active at these gradient norms, so the TP-aware norm is exercised)."""
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
            "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": CLIP, "steps_per_print": 10**9}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--deepspeed", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    from adapters.task import ImageTextTask, build_param_groups  # noqa: PLC0415
    from training.tensor_parallel import (  # noqa: PLC0415
        apply_tensor_parallel, init_tp_grid, load_full_state_dict, tp_state_dict)

    if args.deepspeed:
        import deepspeed  # noqa: PLC0415

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    else:
        dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(args.out)
    mpu = init_tp_grid(2)
    tokens, labels, images = micro_batches(build_test_model(), 1)[0]

    model = apply_tensor_parallel(build_test_model(), mpu.tp_group)
    task = ImageTextTask(model).train()
    with torch.no_grad():
        torch.save(model(tokens, images), out / f"logits_{rank}.pt")
    task(tokens, labels, images)["loss"].backward()
    save_file({n: p.grad.contiguous() for n, p in model.trainable_named_parameters()},
              str(out / f"grads_{rank}.safetensors"))
    (out / f"dims_{rank}.json").write_text(json.dumps(
        {n: p.partition_dim for n, p in model.named_parameters()
         if getattr(p, "tensor_model_parallel", False)}))

    export = tp_state_dict(model, mpu.tp_group)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in export.items()}, str(out / "export.safetensors"))
    shared = [export]
    dist.broadcast_object_list(shared, src=0, group=mpu.tp_group)
    other = apply_tensor_parallel(build_test_model(seed=1), mpu.tp_group)
    load_full_state_dict(other, shared[0], mpu.tp_group)
    again = tp_state_dict(other, mpu.tp_group)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in again.items()}, str(out / "reload.safetensors"))

    if args.deepspeed:
        model = apply_tensor_parallel(build_test_model(), mpu.tp_group)
        opt = torch.optim.AdamW(build_param_groups(model, LR), lr=LR)
        engine, *_ = deepspeed.initialize(model=ImageTextTask(model), optimizer=opt, config=ds_config(),
                                          mpu=mpu)
        losses = []
        for tokens, labels, images in micro_batches(model, DS_STEPS, seed=1):
            loss = engine(tokens, labels, images)["loss"]
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        final = tp_state_dict(model, mpu.tp_group, trainable_only=True)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in final.items()}, str(out / "ds_export.safetensors"))
            (out / "ds.json").write_text(json.dumps({
                "losses": losses, "dp": mpu.get_data_parallel_world_size(),
                "grad_norm": float(engine.get_global_grad_norm())}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
