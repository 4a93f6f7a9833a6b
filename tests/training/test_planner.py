"""The memory / throughput planner: arithmetic on hand-checkable examples, FLOPs against torch's counter,
layouts that cannot split the model, and the CLI."""

import dataclasses
import json

import pytest
import torch

from adapters.multimodal import ImageBatch, build_multimodal, multimodal_config
from adapters.task import ImageTextTask
from scripts import plan as plan_cli
from scripts.bench_planner import flop_counter_flops
from training.planner import (GIB, Hardware, Layout, ModelShape, Workload, enumerate_layouts, executed_flops,
                              layout_problems, model_shape, plan, plan_layout, stage_memory, step_time,
                              trainer_gaps)

TINY = multimodal_config("tiny")  # 4 LM layers, a cross-attention block every 2: 2 groups of 2 layers


@pytest.fixture(scope="module")
def tiny() -> ModelShape:
    return model_shape(TINY)


def round_shape(**kw) -> ModelShape:
    """Round numbers to check by hand: 4 LM layers of 1000 parameters (900 split by TP), 2 blocks of 500 (400)."""
    counts = {"lm_layer": 1000, "lm_layer_sharded": 900, "xattn_block": 500, "xattn_block_sharded": 400,
              "embeddings": 300, "head": 310, "vision": 2000, "projector": 100, "learnable_embedding": 8,
              "stage_layers": (2, 2)}
    return ModelShape(TINY, **{**counts, **kw})


def test_parameter_counts_match_the_built_model(tiny):
    model = build_multimodal(TINY)
    assert tiny.total == sum(p.numel() for p in model.parameters())
    D, q, kv, F = 64, 64, 32, 192  # the tiny LM: 4 heads of 16, 2 KV heads
    assert tiny.lm_layer_sharded == 2 * D * q + 2 * D * kv + 3 * D * F  # wq wo, wk wv, w1 w2 w3
    assert tiny.lm_layer == tiny.lm_layer_sharded + 2 * D  # + two RMSNorms, replicated
    assert tiny.xattn_block == tiny.xattn_block_sharded + 2 * D + 2 * 16 + 2  # + q/k norms (head_dim) + 2 gates
    assert tiny.stage_layers == (2, 2)


def test_weights_and_optimizer_states_by_hand():
    shape, work = round_shape(), Workload(micro_batch=1, seq_len=8, tiles=1, grad_accum=4)
    # dp 4, ZeRO 1: frozen = 4 layers x 1000 + embeddings 300 + head 310 = 4610 params, 2 bytes each;
    # trainable = 2 x 500 + projector 100 + vision 2000 + 8 rows = 3108: bf16 weights and grads 2 bytes,
    # FP32 accumulation 4 (not partitioned), master + Adam 12 / dp.
    mem = stage_memory(shape, work, Layout(1, 1, 4, zero=1), 0)
    assert mem["frozen_weights_bf16"] == 2 * 4610
    assert mem["trainable_weights_bf16"] == mem["gradients_bf16"] == 2 * 3108
    assert mem["fp32_accumulation"] == 4 * 3108
    assert mem["optimizer_states"] == 12 * 3108 / 4
    assert mem["optimizer_step_temp"] == 4 * 3108 / 4
    assert mem["total"] == pytest.approx(2 * 4610 + 4 * 3108 + 4 * 3108 + 3 * 3108
                                         + max(mem["activations"], mem["optimizer_step_temp"]))
    zero0 = stage_memory(shape, work, Layout(1, 1, 4, zero=0), 0)
    assert zero0["optimizer_states"] == 12 * 3108
    zero2 = stage_memory(shape, work, Layout(1, 1, 4, zero=2), 0)
    assert zero2["fp32_accumulation"] == 4 * 3108 / 4
    assert zero2["gradients_bf16"] == 2 * (3108 / 4 + 3108)  # the partition + DeepSpeed's reduce bucket (> 3108)
    # tp 2: a layer keeps 100 replicated + 900 / 2; a block 100 + 400 / 2; the encoder stays whole.
    tp2 = stage_memory(shape, work, Layout(2, 1, 2, zero=1), 0)
    assert tp2["frozen_weights_bf16"] == 2 * (4 * 550 + 300 + 310)
    assert tp2["trainable_weights_bf16"] == 2 * (2 * 300 + 100 + 2000 + 8)


def test_pipeline_stages_split_layers_and_replicate_the_encoder():
    shape, work = round_shape(), Workload(micro_batch=1, seq_len=8, tiles=1, grad_accum=4)
    layout = Layout(1, 2, 1)
    first, last = (stage_memory(shape, work, layout, s) for s in (0, 1))
    assert first["frozen_weights_bf16"] == 2 * (2 * 1000 + 300)  # 2 layers + embeddings
    assert last["frozen_weights_bf16"] == 2 * (2 * 1000 + 310)  # 2 layers + norm and head
    assert first["trainable_weights_bf16"] == 2 * (500 + 100 + 2000 + 8)  # encoder + projector on every stage
    assert last["trainable_weights_bf16"] == 2 * (500 + 100 + 2000)
    # 1F1B: stage 0 holds pp = 2 micro-batches in flight, the last stage 1
    one = stage_memory(shape, work, Layout(1, 1, 2), 0)["activations_detail"]
    assert first["activations_detail"]["encoder"] == 2 * one["encoder"]
    assert last["activations_detail"]["encoder"] == one["encoder"]


def test_activations_scale_with_tokens_and_checkpointing_saves(tiny):
    work = Workload(micro_batch=2, seq_len=32, tiles=4)
    base = stage_memory(tiny, work, Layout(1, 1, 1), 0)["activations_detail"]
    double = stage_memory(tiny, dataclasses.replace(work, micro_batch=4), Layout(1, 1, 1), 0)["activations_detail"]
    for k in base:
        assert double[k] == pytest.approx(2 * base[k])
    ckpt = stage_memory(tiny, work, Layout(1, 1, 1, checkpointing=True), 0)
    assert ckpt["activations"] < stage_memory(tiny, work, Layout(1, 1, 1), 0)["activations"]
    sp = stage_memory(tiny, work, Layout(2, 1, 1, encoder_sp=True), 0)["activations_detail"]["encoder"]
    no_sp = stage_memory(tiny, work, Layout(2, 1, 1), 0)["activations_detail"]["encoder"]
    assert sp == pytest.approx(no_sp / 2)


def test_activations_match_what_autograd_saves(tiny):
    """The per-op activation model against the storages autograd actually saves (parameters excluded) in one
    bf16 forward of the training task on the tiny model."""
    work = Workload(micro_batch=2, seq_len=32, tiles=4, supervised=30)
    torch.manual_seed(0)
    model = build_multimodal(TINY).to(torch.bfloat16)
    task = ImageTextTask(model).train()
    tokens = torch.randint(0, TINY.lm.vocab_size, (2, 32))
    tokens[:, 1] = TINY.image_token_id
    labels = torch.full_like(tokens, -100)
    labels[:, 2:] = tokens[:, 2:]
    S = TINY.vision.tile_size
    images = ImageBatch(torch.randn(2, 1, 4, 3, S, S, dtype=torch.bfloat16), torch.tensor([[[2, 2]]] * 2),
                        torch.ones(2, 1, 4, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task(tokens, labels, images)
    predicted = stage_memory(tiny, work, Layout(1, 1, 1), 0)["activations"]
    assert predicted == pytest.approx(sum(saved.values()), rel=0.1)


def test_step_time_of_one_gpu_is_flops_over_rate(tiny):
    work = Workload(micro_batch=2, seq_len=32, tiles=4, grad_accum=3)
    hw = Hardware(peak_flops=1e12, efficiency=0.5)
    ex = executed_flops(tiny, work)
    per_sample = sum(ex[k] for k in ("vision", "projector", "cross_attention", "lm", "head"))
    t = step_time(tiny, work, Layout(1, 1, 1), hw)
    assert t["step_s"] == pytest.approx(3 * 2 * per_sample / 0.5e12)  # no communication on one GPU
    assert t["mfu"] == pytest.approx(ex["model"] * 6 / (t["step_s"] * 1e12))
    # 2 stages: (grad_accum + pp - 1) micro-batch slots of the slowest stage, plus the sends between stages
    t2 = step_time(tiny, work, Layout(1, 2, 1), hw)
    assert t2["bubble_s"] > 0 and t2["pp_comm_per_micro_batch_s"] > 0
    assert t2["step_s"] >= 4 * t2["compute_per_micro_batch_s"]


def test_flops_match_torch_flop_counter(tiny):
    work = Workload(micro_batch=2, seq_len=32, tiles=4, supervised=30)
    ex = executed_flops(tiny, work)
    planned = sum(ex[k] for k in ("vision", "projector", "cross_attention", "lm", "head"))
    assert planned == pytest.approx(flop_counter_flops(TINY, work), rel=0.02)


def test_layouts_that_do_not_divide_are_rejected(tiny):
    work, hw = Workload(micro_batch=1, seq_len=16, tiles=1), Hardware()
    assert any(r.startswith("tp:") and "n_heads" in r for r in layout_problems(tiny, Layout(3, 1, 1)))
    assert any(r.startswith("tp:") and "n_kv_heads" in r for r in layout_problems(tiny, Layout(4, 1, 1)))
    assert any(r.startswith("pp:") for r in layout_problems(tiny, Layout(1, 3, 1)))  # 2 groups
    assert any(r.startswith("zero:") for r in layout_problems(tiny, Layout(1, 2, 1, zero=2)))
    assert any(r.startswith("encoder_sp:") for r in layout_problems(tiny, Layout(1, 1, 2, encoder_sp=True)))
    assert layout_problems(tiny, Layout(2, 2, 1)) == []
    small = plan_layout(tiny, work, Layout(1, 1, 1), dataclasses.replace(hw, gpu_memory_gib=1e-3,
                                                                          runtime_reserve_gib=0))
    assert small.rejected and small.rejected[0].startswith("memory:")
    plans = plan(tiny, 6, work, hw)
    assert {p.layout.gpus for p in plans} == {6} and len(plans) == len(enumerate_layouts(tiny, 6))
    fit = [p for p in plans if not p.rejected]
    assert fit and all(p.layout.tp in (1, 2) and p.layout.pp in (1, 2) for p in fit)
    assert [p.time["mfu"] for p in fit] == sorted((p.time["mfu"] for p in fit), reverse=True)
    assert plans[: len(fit)] == fit and all(p.rejected for p in plans[len(fit):])


def test_trainer_only_keeps_what_the_trainer_runs(tiny):
    work = Workload(micro_batch=1, seq_len=16, tiles=1)
    assert not trainer_gaps(Layout(2, 2, 1)) and not trainer_gaps(Layout(2, 1, 1, encoder_sp=True))
    assert trainer_gaps(Layout(2, 2, 1, encoder_sp=True))
    assert trainer_gaps(Layout(1, 1, 2, checkpointing=True)) and not trainer_gaps(Layout(1, 2, 1, checkpointing=True))
    plans = plan(tiny, 4, work, Hardware(), trainer_only=True)
    assert plans and all(p.layout.zero == 1 and not p.notes for p in plans)
    assert {(p.layout.tp, p.layout.pp) for p in plans if not p.rejected} == {(1, 1), (2, 1), (1, 2), (2, 2)}


def test_cli_json(capsys):
    assert plan_cli.main(["--model", "tiny", "--gpus", "4", "--seq-len", "32", "--micro-batch", "2", "--json",
                          "--rejected", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["layouts"][0]
    assert best["fits"] and best["layout"]["tp"] * best["layout"]["pp"] * best["layout"]["dp"] == 4
    assert best["memory_gib"]["total"] <= 80 and best["time"]["mfu"] > 0
    assert set(best["memory_gib"]) >= {"frozen_weights_bf16", "optimizer_states", "fp32_accumulation", "activations"}
    assert out["hardware"]["peak_flops"] == 989e12 and len(out["rejected"]) == 2 and out["rejected_count"] > 0


def test_cli_text_and_help(capsys):
    assert plan_cli.main(["--model", "tiny", "--gpus", "2", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "assumptions:" in out and "layouts fit" in out and "rejected" in out
    with pytest.raises(SystemExit) as e:
        plan_cli.main(["--help"])
    assert e.value.code == 0 and "--gpu-memory" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--model", "999B", "--gpus", "8"], "999B"),
    (["--model", "tiny", "--gpus", "12"], "whole number"),
    (["--model", "tiny", "--gpus", "0"], "--gpus"),
    (["--model", "tiny", "--gpus", "2", "--tiles", "9"], "max_tiles"),
    (["--model", "tiny", "--gpus", "two"], "invalid int"),
    (["--gpus", "8"], "--model"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, words):
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("plan: error:") and words in err


def test_real_sizes_plan(capsys):
    """90B on 512 80-GiB GPUs at the paper's 192 text tokens: some layout fits, none is pure data parallel
    (70B of frozen bf16 weights alone is 130 GiB)."""
    shape = model_shape(multimodal_config("90B"))
    plans = plan(shape, 512, Workload(micro_batch=8, seq_len=192, tiles=4), Hardware())
    fit = [p for p in plans if not p.rejected]
    assert fit and all(p.layout.tp * p.layout.pp > 1 for p in fit)
    assert all(p.memory["total"] <= 80 * GIB for p in fit)
