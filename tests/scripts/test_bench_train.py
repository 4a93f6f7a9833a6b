"""scripts.bench_train: a 2-rank tiny run of both modes reports sane numbers; FLOPs and MFU arithmetic; the
trainer-overhead mode (trainer vs bare loop, data loader) reports its keys and consistent numbers.

The 2-rank run is one launch (gloo, 1 timed step per mode, no warm-up): ~40 s on 2 busy CPU cores,
mostly the ranks' start-up (imports, DeepSpeed engines); the overhead run is one more rank, ~30 s.
"""

import json
import math
import statistics
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adapters.multimodal import build_multimodal
from adapters.task import ImageTextTask
from scripts import bench_train
from training.bench import BenchError, forward_flops, mfu, peak_bf16_flops, train_flops


def test_tiny_dp_and_pipeline_json(capsys):
    assert bench_train.main(["--json", "--configs", "tiny", "--modes", "dp,pipeline", "--steps", "1",
                             "--warmup", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "gloo" and out["nproc"] == 2 and list(out["configs"]) == ["tiny"]
    tiny = out["configs"]["tiny"]
    model = tiny["model"]
    assert model["lm"]["n_layers"] == 8 and model["lm"]["n_xattn"] == 2 and model["global_batch"] == 8
    assert model["train_gflops_per_sample"]["model"] == pytest.approx(
        3 * model["forward_gflops_per_sample"]["total"], rel=1e-3)
    for mode, calls in (("dp", 2), ("pipeline", 4)):  # encoder runs per rank: accumulation steps x 1 step
        r = tiny[mode]
        assert r["ranks"] == 2 and r["steps_timed"] == 1 and r["samples_per_step"] == 8
        assert r["samples_per_s"] > 0 and r["wall_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * model["seq_len"], rel=1e-3)
        assert r["achieved_model_tflops"] > 0 and "mfu" not in r  # no MFU without a GPU peak
        assert [p["rank"] for p in r["per_rank"]] == [0, 1]
        for p in r["per_rank"]:
            assert 50 < p["peak_memory_mib"] < 20_000 and p["peak_window"] == "this mode only"
            assert 0 < p["encoder_fraction"] < 1
            assert p["encoder_forward_s"] > 0 and p["encoder_backward_s"] > 0
            assert p["encoder_calls_forward_backward"] == [calls, calls]
            assert math.isfinite(p["last_loss"]) and p["last_loss"] > 0
    stages = tiny["pipeline"]["encoder_fraction_per_stage"]
    assert set(stages) == {"0", "1"} and all(0 < f < 1 for f in stages.values())
    assert [p["stage"] for p in tiny["pipeline"]["per_rank"]] == [0, 1]


def test_forward_flops_equal_torch_flop_counter_on_the_tiny_model():
    """Parity with an independent count: torch's FlopCounterMode over the real forward (ImageTextTask).

    On CPU the fused SDPA kernel is not in its registry, so the attention products are compared apart:
    everything else (patch conv, every linear layer, the head on supervised rows) must agree exactly."""
    bench = bench_train.BENCH_CONFIGS["tiny"]
    cfg = bench.model_config()
    torch.manual_seed(0)
    model = build_multimodal(cfg)
    tokens, labels, images = bench_train.synthetic_batches(cfg, bench, 1, seed=0)[0]
    with FlopCounterMode(display=False) as counter:
        ImageTextTask(model)(tokens, labels, images)
    fwd = forward_flops(cfg, bench.seq_len, cfg.vision.max_tiles, bench.n_supervised)
    assert counter.get_total_flops() == bench.micro_batch * (fwd["total"] - fwd["attention_products"])
    # The attention products by hand: (8 + 2) encoder blocks over 4 tiles x (17 + 7 pad) tokens of width 64,
    # 8 causal self-attention layers over 32 tokens, 2 cross-attention layers over 4 x 17 vision tokens.
    L, T, D = 4 * 24, 32, 64
    assert fwd["attention_products"] == 10 * 4 * L * L * 64 + 8 * 4 * T * T * D + 2 * 4 * T * 68 * D
    assert sum(v for k, v in fwd.items() if k not in ("total", "attention_products")) == fwd["total"]


def test_train_flops_and_mfu_arithmetic():
    bench = bench_train.BENCH_CONFIGS["mid"]
    cfg = bench.model_config()
    fwd = forward_flops(cfg, bench.seq_len, cfg.vision.max_tiles, bench.n_supervised)
    flops = train_flops(cfg, fwd)
    assert flops["model"] == 3 * fwd["total"]
    trainable = fwd["vision"] + fwd["projector"] + fwd["cross_attention"]
    assert flops["executed_estimate"] == 3 * trainable + 2 * (fwd["lm"] + fwd["head"])
    frozen_encoder = train_flops(replace(cfg, train_vision=False), fwd)
    assert frozen_encoder["executed_estimate"] == flops["executed_estimate"] - fwd["vision"]

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Quadro RTX 6000") is None
    # 2 GPUs at 989 TFLOP/s, 100 samples/s of 1 TFLOP each: 1e14 / 1.978e15.
    assert mfu(1e12, 100.0, 2, 989e12) == pytest.approx(1e14 / 1.978e15)
    with pytest.raises(BenchError, match="n_devices"):
        mfu(1e12, 100.0, 0, 989e12)


def test_summary_of_cuda_ranks_reports_mfu():
    """The CUDA-only part of the summary, from rank records as a 2-GPU H100 run would write them."""
    bench = bench_train.BENCH_CONFIGS["mid"]
    rank = {"wall_s": 2.0, "steps": 4, "samples_per_step": 4, "stage": None, "peak_memory_mib": 900.0,
            "memory_source": "torch.cuda.max_memory_allocated", "memory_at_start_mib": 0.0, "peak_reset": True,
            "encoder_forward_s": 0.1, "encoder_backward_s": 0.2, "encoder_forward_calls": 8,
            "encoder_backward_calls": 8, "last_loss": 7.0, "device": "cuda:0",
            "device_name": "NVIDIA H100 80GB HBM3", "torch_threads": 1}
    out = bench_train.summarize("mid", "dp", [{**rank, "rank": 0}, {**rank, "rank": 1, "wall_s": 1.0}])
    assert out["samples_per_s"] == 8.0  # 16 samples over the slowest rank's 2 s
    assert out["tokens_per_s"] == 8.0 * bench.seq_len
    cfg = bench.model_config()
    model_flops = train_flops(cfg, forward_flops(cfg, bench.seq_len, cfg.vision.max_tiles, bench.n_supervised))["model"]
    assert out["peak_bf16_tflops_per_gpu"] == 989.0
    assert out["mfu"] == pytest.approx(model_flops * 8.0 / (2 * 989e12), abs=1e-5)
    assert out["per_rank"][0]["encoder_fraction"] == pytest.approx(0.15)


def test_a_failing_rank_surfaces_its_output():
    with pytest.raises(BenchError, match=r"(?s)tiny/nope: 1 ranks failed.*rank 0 \(exit 2\).*unknown mode 'nope'"):
        bench_train.launch("tiny", ["nope"], nproc=1, steps=1, warmup=0, threads=1, timeout=120, log=print)


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--configs", "huge"])
    assert e.value.code == 2 and "unknown config 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_train.main(["--modes", "pipeline", "--nproc", "3"])
    assert "multiple of 2" in capsys.readouterr().err


def test_tiny_overhead_json(capsys):
    """The trainer (training.trainer.train) against the bare loop on the same micro-batches: keys and sanity,
    no timing assertion (the machine is shared)."""
    assert bench_train.main(["--json", "--configs", "tiny", "--modes", "overhead", "--steps", "2",
                             "--warmup", "1"]) == 0
    tiny = json.loads(capsys.readouterr().out)["configs"]["tiny"]
    o, loader = tiny["overhead"], tiny["data_loader"]
    assert "dp" not in tiny and "pipeline" not in tiny
    assert o["trainer_step_s"] > 0 and o["bare_step_s"] > 0 and o["goal"] == 1.1
    assert o["ratio"] == pytest.approx(o["trainer_step_s"] / o["bare_step_s"], rel=1e-3)
    assert o["goal_met"] == (o["ratio"] <= 1.1)
    assert o["ratio_min"] == pytest.approx(o["trainer_min_step_s"] / o["bare_min_step_s"], rel=1e-3)
    bare = o["bare_step_s_each"]  # every step, the warm-up step first
    assert o["steps_timed"] == 2 and len(o["trainer_step_s_each"]) == len(bare["before"]) == len(bare["after"]) == 3
    assert o["trainer_step_s"] == pytest.approx(statistics.median(o["trainer_step_s_each"][1:]), abs=1e-5)
    assert o["bare_step_s"] == pytest.approx(statistics.median(bare["before"][1:] + bare["after"][1:]), abs=1e-5)
    assert o["dtype"] == "bfloat16" and o["micro_batches_per_step"] == 2 and o["device"] == "cpu"
    assert 0 < o["data_loading_s_per_step"] < o["trainer_step_s"]
    assert loader["micro_batches"] == 24 and loader["warmup_micro_batches"] == 2  # 1 warm-up step of 2
    assert loader["samples"] >= 24  # at least one sample per micro-batch
    assert loader["samples_per_s"] == pytest.approx(loader["samples"] / loader["seconds"], rel=1e-3)
    assert loader["tokens_per_s"] > loader["samples_per_s"] > 0


def test_overhead_of_a_config_without_trainer_preset_is_skipped(capsys):
    assert bench_train.main(["--json", "--configs", "mid", "--modes", "overhead"]) == 0
    mid = json.loads(capsys.readouterr().out)["configs"]["mid"]
    assert "presets" in mid["overhead"]["skipped"] and "data_loader" not in mid


def test_trainer_step_times_from_losses_jsonl(tmp_path):
    log = tmp_path / "losses.jsonl"
    # Step k ends at k / steps_per_s seconds after the loop started: 0.5, 1.5, 1.8.
    log.write_text("".join(json.dumps({"step": k, "loss": 1.0, "steps_per_s": k / end}) + "\n"
                           for k, end in ((1, 0.5), (2, 1.5), (3, 1.8))))
    assert bench_train.trainer_step_times(log) == pytest.approx([0.5, 1.0, 0.3])
    log.write_text(json.dumps({"step": 4, "loss": 1.0, "steps_per_s": 2.0}) + "\n")  # a resumed run
    with pytest.raises(BenchError, match="expected 1, 2"):
        bench_train.trainer_step_times(log)


def test_summarize_overhead_excludes_warmup_and_takes_medians():
    rec = {"trainer_step_s": [9.0, 1.2, 1.4, 1.3], "bare_step_s": {"before": [5.0, 1.0, 1.2], "after": [4.0, 1.1]},
           "micro_batches_per_step": 2,
           "loader": {"micro_batches": 4, "samples": 10, "seconds": 0.4, "samples_per_s": 25.0,
                      "micro_batches_per_s": 10.0, "tokens_per_s": 500.0, "median_micro_batch_s": 0.1},
           "preset": "tiny", "device": "cpu", "dtype": "bfloat16", "gradient_clipping": 1.0, "data": {},
           "torch_threads": 1, "loadavg_1_5_15": {"start": [1.0, 1.0, 1.0], "end": [2.0, 2.0, 2.0]}}
    o, loader = bench_train.summarize_overhead(rec, warmup=1)
    assert o["trainer_step_s"] == 1.3 and o["bare_step_s"] == 1.1 and o["steps_timed"] == 3
    assert o["ratio"] == pytest.approx(1.3 / 1.1, abs=1e-4) and o["goal_met"] is False
    assert o["trainer_min_step_s"] == 1.2 and o["bare_min_step_s"] == 1.0 and o["ratio_min"] == 1.2
    assert o["data_loading_s_per_step"] == 0.2  # 0.1 s per micro-batch x 2
    assert o["ratio_without_data_loading"] == pytest.approx(1.1 / 1.1, abs=1e-4)
    assert loader["samples_per_s"] == 25.0 and loader["what"].startswith("training.data.TrainBatches")
