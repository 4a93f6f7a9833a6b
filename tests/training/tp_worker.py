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
import torch.distributed as dist
from torch import Tensor

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


# The full state dict of a sharded model and back: what the tests compare against the one-process model (the
# trainer never gathers: its exports are written per rank, `training.loading.export_shards`).


def _sharded_dims(model: torch.nn.Module) -> dict[str, int]:
    return {n: p.partition_dim for n, p in model.named_parameters(remove_duplicate=False)
            if getattr(p, "tensor_model_parallel", False)}


def tp_state_dict(model, tp_group, trainable_only: bool = False) -> dict[str, Tensor]:
    """The full (unsharded) state dict under ``MultimodalLlama.state_dict()`` names, on TP rank 0;
    ``{}`` on the other ranks. Collective: every rank of ``tp_group`` must call it.
    ``trainable_only`` keeps the parameters that train (the export that leaves out the frozen LM)."""
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    dims = _sharded_dims(model)
    keep = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if keep is not None and name not in keep:
            continue
        if name in dims:
            t = t.contiguous()
            parts = [torch.empty_like(t) for _ in range(tp)] if rank == 0 else None
            dist.gather(t, parts, group=tp_group, group_dst=0)
            if rank == 0:
                out[name] = torch.cat(parts, dim=dims[name])
        elif rank == 0:
            out[name] = t
    return out


def load_full_state_dict(model, state_dict: dict[str, Tensor], tp_group,
                         strict: bool = True):
    """Load a full (unsharded) state dict, e.g. a `tp_state_dict` export, into a sharded model: each rank
    copies its slice. No communication. Returns ``load_state_dict``'s result."""
    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    dims = _sharded_dims(model)
    local = {}
    for name, t in state_dict.items():
        if name in dims:
            size = t.shape[dims[name]] // tp
            t = t.narrow(dims[name], rank * size, size)
        local[name] = t
    return model.load_state_dict(local, strict=strict)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--deepspeed", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from safetensors.torch import save_file  # noqa: PLC0415

    from adapters.task import ImageTextTask, build_param_groups  # noqa: PLC0415
    from training.tensor_parallel import apply_tensor_parallel, init_tp_grid  # noqa: PLC0415

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
