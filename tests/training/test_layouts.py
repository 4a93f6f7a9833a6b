"""Combined layouts through the trainer on CPU: pipeline x data parallel (2 stages x 2 replicas) and pipeline x
tensor parallel (2 stages x TP 2), 4 gloo processes each, against the one-process data-parallel run of the same
micro-batches; their sharded exports (each rank its part, the LM referenced); loading both export layouts; a
resume at another data-parallel size refused.

The data is 8 shards of one sample read in order (``data.shuffle_buffer=1``, one sample per micro-batch): the
data-parallel ranks of a step together read exactly the micro-batches the one process reads with twice the
accumulation steps, so the losses agree up to bf16 rounding (test_pipeline.py's tolerance; the weights see
`assert_same_export`). The runs start from an export of the fresh model with its gates opened (zero gates
give the adapter near-zero gradients, whose sign bf16 rounding decides), so the per-rank LM reading of
`training.loading` is not on this path (test_loading.py covers it). Every image fills all ``max_tiles`` tile
slots: pipeline micro-batches are padded to ``max_tiles`` slots, data-parallel ones trimmed to their largest
image, and real tokens attend to padded slots (the released Mllama mask masks only padding x padding pairs,
vision/encoder.py), so a 1-tile image padded to 4 slots moves the fp32 loss by ~1%.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapters.checkpoint import load_llama, save_hf_checkpoint, save_meta_checkpoint
from adapters.llama import build_llama, llama_config
from adapters.model_io import (INDEX, begin_sharded_export, checkpoint_fingerprint, lm_fingerprint, load_checkpoint,
                               save_checkpoint, save_shard, shard_file, write_shard_index)
from adapters.multimodal import build_multimodal, multimodal_config
from common.export import ExportFormatError
from tests.tiny import build_tiny_tokenizer
from tests.training.ranks import open_gates, run_ranks
from tests.training.test_data import COLORS, caption_texts, jpeg, write_shards
from training.config import load_run_config
from training.spec import build_multimodal_model

STEPS, RTOL = 2, 2e-4  # RTOL: test_pipeline.py's, for losses after updates in bf16
DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
      "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
      "steps_per_print": 10**9}


def overrides(root: Path, run: str, *extra: str) -> list[str]:
    return [f"data.shards={root}/shard_{{00000..00007}}.tar", f"model.tokenizer={root}/tokenizer.model",
            f"model.lm={root}/lm", f"model.init_from={root}/init", f"train.run_dir={root / run}",
            f"train.steps={STEPS}", f"train.save_every={STEPS}", "train.progress=false", "optim.lr=3e-3",
            "optim.warmup=1", "data.max_rows=1", "data.max_tokens=40", "data.max_seq_len=40", "data.shuffle_buffer=1",
            *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    colors = list(COLORS)

    def sample(s: int, i: int) -> dict:  # 112 x 112: a 2 x 2 grid, every tile slot real (see the docstring)
        cap = f"a {colors[s % len(colors)]} square"
        return {"__key__": f"s{s}", "jpg": jpeg(COLORS[colors[s % len(colors)]], (112, 112)), "txt": cap,
                "json": {"caption": cap}}

    write_shards(root, "shard", 8, 1, sample)
    tok = build_tiny_tokenizer(root, texts=caption_texts())
    torch.manual_seed(1)
    save_hf_checkpoint(build_llama(replace(multimodal_config("tiny").lm, vocab_size=tok.n_words)).to(torch.bfloat16),
                       root / "lm")
    cfg = load_run_config(None, [o for o in overrides(root, "init") if not o.startswith("model.init_from")])
    save_checkpoint(open_gates(build_multimodal_model(cfg, tok)), root / "init", lm_path=str(root / "lm"))
    for gas in (2, 4):
        (root / f"ds{gas}.json").write_text(json.dumps({**DS, "gradient_accumulation_steps": gas}))
    return root


def reference(root: Path, gas: int):
    """The one-process data-parallel run reading each step's micro-batches of all replicas (``gas`` of them)."""
    from training.trainer import train

    return train(load_run_config(None, overrides(root, f"ref{gas}")), json.loads((root / f"ds{gas}.json").read_text()))


def four_ranks(root: Path, run: str, tp: int) -> dict[int, float]:
    """The 4-process run (once per module: the resume test reuses the pp2_dp2 run's checkpoint)."""
    out = root / f"{run}_logs"
    if (out / "losses.json").is_file():
        return {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}
    out.mkdir()
    run_ranks("tests.training.layout_worker", out,
              ["--ds", str(root / "ds2.json"), "--",
               *overrides(root, run, "parallel=pipeline", "pipeline_stages=2", f"tensor_parallel={tp}")],
              world=4, timeout=240)
    return {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}


def assert_same_export(got: Path, want: Path, init: Path) -> None:
    """Both exports load into one process, with the same config, LM (referenced by path and fingerprint) and
    trained weights. Weights are compared on the optimizer's scale, not elementwise to `RTOL`: AdamW moves an
    element by about +-lr per step whatever its gradient's size, so bf16 rounding of a small gradient (one with
    no true gradient at all: attention key biases) flips its update. Every element must agree within twice the
    largest move in its tensor, and the updates as a whole (export - init) within 15% (measured 8-9%)."""
    a, b, start = load_checkpoint(got), load_checkpoint(want), load_checkpoint(init).state_dict()
    assert a.cfg == b.cfg
    meta_a, meta_b = (json.loads((p / "config.json").read_text()) for p in (got, want))
    assert meta_a == {**meta_b, "lm_path_relative": meta_a["lm_path_relative"]}
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for name, value in sd_b.items():  # the frozen LM bitwise; a trained element within twice its tensor's largest move
        move = 0.0 if name.startswith("lm.") else 2 * (value - start[name]).abs().max().item()
        torch.testing.assert_close(sd_a[name], value, rtol=0, atol=move, msg=name)
    trained = [k for k in sd_b if not k.startswith("lm.")]
    diff = sum(((sd_a[k] - sd_b[k]) ** 2).sum() for k in trained) ** 0.5
    update = sum(((sd_b[k] - start[k]) ** 2).sum() for k in trained) ** 0.5
    assert diff < 0.15 * update, (diff, update)


@pytest.mark.parametrize("tp, gas", [(1, 4), (2, 2)], ids=["pp2_dp2", "pp2_tp2"])
def test_pipeline_with_data_or_tensor_parallel_matches_the_one_process_run(root, tp, gas):
    want = reference(root, gas)
    got = four_ranks(root, f"pp_tp{tp}", tp)
    assert sorted(got) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([got[s] for s in sorted(got)]),
                               torch.tensor([want.losses[s] for s in sorted(got)]), rtol=RTOL, atol=0)
    export = root / f"pp_tp{tp}" / "export"
    index = json.loads((export / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    # one shard per writing rank (stage x TP rank; data-parallel replicas write nothing), and no LM tensor
    assert files == [shard_file(i, 2 * tp) for i in range(2 * tp)]
    assert not (export / "model.safetensors").exists() and not any(k.startswith("lm.") for k in index["weight_map"])
    assert_same_export(export, want.export_dir, root / "init")


def test_resume_at_another_data_parallel_size_is_refused_before_anything_is_loaded(root, monkeypatch):
    from training import trainer

    assert sorted(four_ranks(root, "pp_tp1", 1)) == list(range(1, STEPS + 1))  # the 4-rank checkpoint (run once)

    def never(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(trainer, "build_rank_model", never)
    cfg = load_run_config(None, overrides(root, "pp_tp1", "parallel=pipeline", "pipeline_stages=2",
                                          f"train.steps={STEPS + 1}"))
    with pytest.raises(trainer.ResumeWorldError,
                       match=r"step_2: saved by world size 4 \(data-parallel 2 x tensor-parallel 1 x 2 stage\(s\)\), "
                             r"resumed with world size 1 \(not a multiple of tensor-parallel 1 x 2 stage\(s\)\): .*"
                             r"launch 4 processes"):
        trainer.train(cfg, json.loads((root / "ds2.json").read_text()))


# ----------------------------------------------------------------------------------------------
# The sharded layout and the LM fingerprint, in one process


def test_a_sharded_export_loads_as_the_single_file_one_and_a_bad_index_is_named(tmp_path):
    torch.manual_seed(0)
    model = build_multimodal(multimodal_config("tiny"))
    sd = {k: v for k, v in model.state_dict().items()}
    names = sorted(sd)
    begin_sharded_export(tmp_path / "out")
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    for i, part in enumerate(halves):
        save_shard({k: sd[k] for k in part}, tmp_path / "out", i, 2)
    weight_map = {k: shard_file(i, 2) for i, part in enumerate(halves) for k in part}
    write_shard_index(model.cfg, tmp_path / "out", weight_map)
    loaded = load_checkpoint(tmp_path / "out")
    assert loaded.state_dict().keys() == sd.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())

    index = json.loads((tmp_path / "out" / INDEX).read_text())
    moved = {**index, "weight_map": {**index["weight_map"], names[0]: shard_file(1, 2)}}
    (tmp_path / "out" / INDEX).write_text(json.dumps(moved))
    with pytest.raises(ExportFormatError, match=r"model-00001-of-00002\.safetensors: does not hold what model\."
                                                r"safetensors\.index\.json maps to it \(lacks \[\], has unlisted"):
        load_checkpoint(tmp_path / "out")
    escaped = {**index, "weight_map": {**index["weight_map"], names[0]: "../elsewhere.safetensors"}}
    (tmp_path / "out" / INDEX).write_text(json.dumps(escaped))
    with pytest.raises(ExportFormatError, match=r"shard '\.\./elsewhere\.safetensors' is not a file of"):
        load_checkpoint(tmp_path / "out")
    begin_sharded_export(tmp_path / "out")  # a new export starts: the old one is no export any more
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_the_checkpoint_fingerprint_is_the_loaded_lms_without_loading_it(tmp_path):
    torch.manual_seed(0)
    cfg = llama_config("tiny", n_layers=2)
    lm, tied = build_llama(cfg).to(torch.bfloat16), build_llama(replace(cfg, tie_embeddings=True)).to(torch.bfloat16)
    for path in (save_meta_checkpoint(lm, tmp_path / "meta", n_shards=2), save_hf_checkpoint(lm, tmp_path / "hf"),
                 save_hf_checkpoint(tied, tmp_path / "tied")):
        assert checkpoint_fingerprint(path) == lm_fingerprint(load_llama(path)), path.name
    assert checkpoint_fingerprint(tmp_path / "hf") != checkpoint_fingerprint(tmp_path / "tied")


def test_the_process_grid_puts_tensor_parallel_innermost_and_data_parallel_outermost():
    from training.pipeline import pipeline_topology

    topo = pipeline_topology(num_stages=2, data_parallel=2, tensor_parallel=2)
    assert topo.get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # consecutive ranks: one node
    assert topo.get_axis_comm_lists("pipe") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("data") == [[0, 4], [1, 5], [2, 6], [3, 7]]  # the farthest apart
    assert [tuple(topo.get_coord(r)) for r in (0, 3, 5)] == [(0, 0, 0), (0, 1, 1), (1, 0, 1)]  # (data, pipe, model)
    assert pipeline_topology(2, 2).get_axis_comm_lists("data") == [[0, 2], [1, 3]]
