"""Tensor parallelism: 2 processes (gloo, tp 2) against the single-process model, and the checks that
need no second process (divisibility errors, tp 1 is the identity).

The distributed run (``tp_worker.py``) shards the tiny model (4 heads, 2 KV heads, gates opened), runs
one forward/backward and one `tp_state_dict` export + reload, then two DeepSpeed ZeRO-1 FP32 steps with
clipping through ``mpu``. The reference for everything is the unsharded model here, in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from adapters.llama import llama_config
from adapters.multimodal import multimodal_config
from adapters.task import ImageTextTask, build_param_groups
from tests.training import tp_worker
from tests.training.pipe_worker import micro_batches
from tests.training.ranks import run_ranks
from tests.training.tp_worker import tp_state_dict
from training.tensor_parallel import TensorParallelError, apply_tensor_parallel, validate_tp_size

# ----------------------------------------------------------------------------------------------
# Single process


def test_sizes_that_do_not_split_heads_or_ffn_are_refused_by_name():
    tiny = multimodal_config("tiny").lm  # 4 heads, 2 KV heads, FFN 192
    validate_tp_size(tiny, 2)
    with pytest.raises(TensorParallelError, match=r"n_heads = 4 .* size 3"):
        validate_tp_size(tiny, 3)
    with pytest.raises(TensorParallelError, match=r"n_kv_heads = 2 .* size 4"):
        validate_tp_size(tiny, 4)
    with pytest.raises(TensorParallelError, match=r"ffn_dim = 191"):
        validate_tp_size(llama_config("tiny", ffn_dim=191), 2)
    validate_tp_size(llama_config("70B"), 8)  # KV heads cap TP at 8 for every Llama 3 size
    with pytest.raises(TensorParallelError, match="n_kv_heads = 8"):
        validate_tp_size(llama_config("70B"), 16)


@pytest.fixture()
def one_rank_group():
    if dist.is_initialized():  # e.g. the trainer tests' in-process one-rank group: use it as it is
        assert dist.get_world_size() == 1
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_tp_one_is_the_identity(one_rank_group):
    model = tp_worker.build_test_model()
    tokens, labels, images = micro_batches(model, 1)[0]
    params = dict(model.named_parameters())
    with torch.no_grad():
        ref = model(tokens, images)
    assert apply_tensor_parallel(model, one_rank_group) is model
    assert all(p is params[n] for n, p in model.named_parameters())  # nothing sliced, nothing marked
    with torch.no_grad():
        assert torch.equal(model(tokens, images), ref)
    full = model.state_dict()
    export = tp_state_dict(model, one_rank_group)
    assert export.keys() == full.keys() and all(torch.equal(export[k], full[k]) for k in full)


# ----------------------------------------------------------------------------------------------
# Two processes


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory) -> Path:
    return run_ranks("tests.training.tp_worker", tmp_path_factory.mktemp("tp2"), ["--deepspeed"])


def _reference_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = tp_worker.build_test_model()
    tokens, labels, images = micro_batches(model, 1)[0]
    with torch.no_grad():
        logits = model(tokens, images)
    ImageTextTask(model).train()(tokens, labels, images)["loss"].backward()
    return logits, {n: p.grad for n, p in model.trainable_named_parameters()}


def test_tp_logits_match_the_single_process_model(tp_run):
    want, _ = _reference_grads()
    got = [torch.load(tp_run / f"logits_{r}.pt") for r in range(2)]
    assert torch.equal(got[0], got[1])  # the residual stream and head are replicated
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def test_tp_gradients_match_and_replicated_ones_agree_across_ranks(tp_run):
    _, want = _reference_grads()
    grads = [load_file(str(tp_run / f"grads_{r}.safetensors")) for r in range(2)]
    dims = json.loads((tp_run / "dims_0.json").read_text())
    assert dims == json.loads((tp_run / "dims_1.json").read_text())
    assert grads[0].keys() == grads[1].keys() == want.keys()
    # every LM self-attention / FFN matrix and every cross-attention matrix is sharded, nothing else
    assert {n.rsplit(".", 2)[-2] for n in dims} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    assert sum(n.startswith("lm.layers.") for n in dims) == 7 * 4
    assert sum(n.startswith("cross_attention_layers.") for n in dims) == 7 * 2
    for n, g in want.items():
        if n in dims:
            got = torch.cat([grads[0][n], grads[1][n]], dim=dims[n])
        else:
            assert torch.equal(grads[0][n], grads[1][n]), n  # (c) replicated: bitwise identical
            got = grads[0][n]
        torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6, msg=n)
    assert any("q_norm" in n for n in want)  # per-head norms (replicated, summed over heads) covered


def test_tp_state_dict_round_trips_the_full_state_dict(tp_run):
    full = tp_worker.build_test_model().state_dict()
    for name in ("export", "reload"):  # gathered; then loaded into a seed-1 sharded model and gathered again
        got = load_file(str(tp_run / f"{name}.safetensors"))
        assert got.keys() == full.keys()
        for k, v in full.items():
            assert torch.equal(got[k], v), (name, k)


def test_deepspeed_zero1_steps_over_mpu_match_the_single_process_steps(tp_run):
    ds = json.loads((tp_run / "ds.json").read_text())
    assert ds["dp"] == 1  # world 2 = tp 2 x dp 1
    model = tp_worker.build_test_model()
    task = ImageTextTask(model).train()
    opt = torch.optim.AdamW(build_param_groups(model, tp_worker.LR), lr=tp_worker.LR)
    losses, norms = [], []
    for tokens, labels, images in micro_batches(model, tp_worker.DS_STEPS, seed=1):
        loss = task(tokens, labels, images)["loss"]
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), tp_worker.CLIP)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert min(norms) > tp_worker.CLIP  # clipping was active: DeepSpeed's TP-aware global norm mattered
    torch.testing.assert_close(ds["grad_norm"], norms[-1], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(ds["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    got = load_file(str(tp_run / "ds_export.safetensors"))
    trained = dict(model.trainable_named_parameters())
    assert got.keys() == trained.keys()
    # Adam divides each gradient element by its own RMS: elements near 0 turn last-bit differences (the
    # TP all-reduce sums in another order) into visible update differences, measured up to ~1% of the
    # 2 * lr that two steps move a weight; the forward pass above agrees to ~1e-7.
    step = tp_worker.DS_STEPS * tp_worker.LR
    for n, p in trained.items():
        torch.testing.assert_close(got[n], p.detach(), rtol=0, atol=0.02 * step, msg=n)
