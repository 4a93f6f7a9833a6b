"""Per-rank building (`training.loading`) against today's full build sliced by hand, on a tiny bf16 LM written
in Meta's layout (2 model-parallel shards) and HF's (2 indexed files; and a tied one): what each rank holds,
what it read, and the layouts and checkpoints refused before any read. A 2-process run checks that a per-rank TP model
gives the full model's logits through `apply_tensor_parallel`, with the same parameters trainable.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapters.checkpoint import (CheckpointError, LlamaCheckpoint, load_llama, save_hf_checkpoint,
                                 save_meta_checkpoint)
from adapters.llama import build_llama, llama_config
from adapters.multimodal import MultimodalLlama, build_multimodal, multimodal_config
from tests.training.pipe_worker import micro_batches
from tests.training.ranks import open_gates, run_ranks
from training.loading import LayoutError, RankLayout, build_rank_model
from training.tensor_parallel import tp_split_dims

SEED = 3
CFG = multimodal_config("tiny", lm=llama_config("tiny", n_layers=8), xattn_every=4)  # blocks before 3 and 7


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(1)
    lm = build_llama(CFG.lm).to(torch.bfloat16)
    tied = build_llama(replace(CFG.lm, tie_embeddings=True)).to(torch.bfloat16)
    return {"meta": save_meta_checkpoint(lm, root / "meta", n_shards=2),
            "hf": save_hf_checkpoint(lm, root / "hf", n_files=2), "hf_tied": save_hf_checkpoint(tied, root / "tied")}


def full_build(path: Path) -> MultimodalLlama:
    """Today's build (training.spec): seed, load the whole LM, compose."""
    torch.manual_seed(SEED)
    lm = load_llama(path)
    return build_multimodal(replace(CFG, lm=lm.cfg), lm)


def rank_build(path: Path, layout: RankLayout) -> tuple[MultimodalLlama, LlamaCheckpoint]:
    torch.manual_seed(SEED)
    ckpt = LlamaCheckpoint(path)
    return build_rank_model(replace(CFG, lm=ckpt.cfg), ckpt, layout), ckpt


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_a_slice_of_whole_heads_equals_the_slice_of_the_whole_converted_tensor(lm_dirs, layout):
    ckpt = LlamaCheckpoint(lm_dirs[layout])
    hd = CFG.lm.head_dim
    for key in ("layers.2.attention.wq.weight", "layers.2.attention.wk.weight", "layers.5.attention.wo.weight",
                "tok_embeddings.weight"):
        whole = ckpt.read(key)
        assert whole.dtype == torch.bfloat16  # as stored, no fp32 copy
        assert torch.equal(ckpt.read(key, 0, hd, 2 * hd), whole[hd : 2 * hd]), key  # one head (shard 0 only)
        assert torch.equal(ckpt.read(key, 0, hd // 2, hd + 3), whole[hd // 2 : hd + 3]), key  # not head-aligned
        assert torch.equal(ckpt.read(key, 1, 8, 40), whole[:, 8:40]), key
    assert ckpt.reads[0] == ("layers.2.attention.wq.weight", None, 0, 0)
    with pytest.raises(CheckpointError, match=r"wk\.weight of shape \(32, 64\) has no slice \[16, 48\) along dim 0"):
        ckpt.read("layers.2.attention.wk.weight", 0, 16, 48)
    other = LlamaCheckpoint(lm_dirs["hf" if layout == "meta" else "meta"])
    assert all(torch.equal(ckpt.read(k), other.read(k)) for k in ckpt.keys())  # the two layouts agree


def _held(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if not p.is_meta}


@pytest.mark.parametrize("layout", ["meta", "hf", "hf_tied"])
def test_each_pipeline_stage_holds_and_reads_exactly_its_part_of_the_full_build(lm_dirs, layout):
    full = full_build(lm_dirs[layout])
    ids = [[0, 1, 2, 3], [4, 5, 6, 7]]  # training.pipeline.stage_layer_ids (test_pipeline.py)
    blocks = {0: "cross_attention_layers.0.", 1: "cross_attention_layers.1."}
    for stage in (0, 1):
        model, ckpt = rank_build(lm_dirs[layout], RankLayout(stages=2, stage=stage))
        lm_own = {f"layers.{i}." for i in ids[stage]} | ({"tok_embeddings."} if stage == 0 else {"norm.", "output."})
        if layout == "hf_tied":  # the last stage's head is the embedding matrix
            lm_own.add("tok_embeddings.")
        want = {n for n, _ in full.named_parameters()
                if n.startswith(("vision.", "projector.", blocks[stage])) or (stage == 0 and "learnable" in n)
                or (n.startswith("lm.") and n[3:].startswith(tuple(lm_own)))}
        held = _held(model)
        assert set(held) == want
        for n, p in held.items():  # the adapter's fresh init too: same seed, same values
            want_p = full.get_parameter(n)
            assert (p.dtype, p.requires_grad) == (want_p.dtype, want_p.requires_grad) and torch.equal(p, want_p), n
        assert sorted(ckpt.reads) == sorted((n[3:], None, 0, 0) for n in want if n.startswith("lm."))


def test_each_tensor_parallel_rank_holds_and_reads_its_slices_of_the_full_build(lm_dirs):
    full = full_build(lm_dirs["meta"])
    dims = tp_split_dims(full)
    for rank in (0, 1):
        model, ckpt = rank_build(lm_dirs["meta"], RankLayout(tp=2, tp_rank=rank))
        held = _held(model)
        assert held.keys() == dict(full.named_parameters()).keys()  # one stage: every layer, sliced
        reads = set()
        for n, p in held.items():
            want = full.get_parameter(n)
            assert p.requires_grad == want.requires_grad, n
            if n in dims:
                size = want.shape[dims[n]] // 2
                want = want.narrow(dims[n], rank * size, size)
            assert torch.equal(p, want), n
            if n.startswith("lm."):
                reads.add((n[3:], dims[n], rank * size, (rank + 1) * size) if n in dims else (n[3:], None, 0, 0))
        assert len(ckpt.reads) == len(reads) and set(ckpt.reads) == reads
        assert model.lm.layers[0].attention.wq.out_features == CFG.lm.dim  # apply_tensor_parallel finishes it


def test_layouts_that_do_not_divide_the_model_are_refused_before_any_read(lm_dirs):
    refused = {RankLayout(tp=3): r"tensor_parallel=3: .*n_heads = 4 .*sizes that split this model: \[1, 2\]",
               RankLayout(tp=4): r"n_kv_heads = 2 .*\[1, 2\]",
               RankLayout(stages=3): r"pipeline_stages=3: num_stages must be in \[1, 2\].* evenly: \[1, 2\]"}
    for layout, match in refused.items():
        torch.manual_seed(SEED)
        ckpt = LlamaCheckpoint(lm_dirs["meta"])
        with pytest.raises(LayoutError, match=match):
            build_rank_model(replace(CFG, lm=ckpt.cfg), ckpt, layout)
        assert ckpt.reads == []


def test_a_checkpoint_missing_a_stages_tensors_is_refused_on_every_stage_before_any_read(lm_dirs, tmp_path):
    src = lm_dirs["meta"]
    (tmp_path / "params.json").write_text((src / "params.json").read_text())
    for f in sorted(src.glob("consolidated.*.pth")):  # drop layer 6 (stage 1's) from both shards
        shard = torch.load(f, weights_only=True)
        torch.save({k: v for k, v in shard.items() if not k.startswith("layers.6.")}, tmp_path / f.name)
    for stage in (0, 1):
        torch.manual_seed(SEED)
        ckpt = LlamaCheckpoint(tmp_path)
        with pytest.raises(LayoutError, match=r"stage 1 lacks 9 tensor\(s\): \['layers\.6\.attention\.wk\.weight'"
                                              r".*stages complete in this checkpoint: \[0\]"):
            build_rank_model(replace(CFG, lm=ckpt.cfg), ckpt, RankLayout(stages=2, stage=stage))
        assert ckpt.reads == []


# ----------------------------------------------------------------------------------------------
# Two processes: a per-rank TP model through apply_tensor_parallel computes the full model's logits


def test_per_rank_tensor_parallel_model_computes_the_full_models_logits(lm_dirs, tmp_path):
    run_ranks("tests.training.test_loading", tmp_path, ["--lm", str(lm_dirs["hf"])])
    full = open_gates(full_build(lm_dirs["hf"]).float())
    tokens, _, images = micro_batches(full, 1)[0]
    with torch.no_grad():
        want = full(tokens, images)
    trainable = sorted(n for n, _ in full.trainable_named_parameters())
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"logits_{rank}.pt"), want, rtol=1e-5, atol=1e-5)
        assert json.loads((tmp_path / f"trainable_{rank}.json").read_text()) == trainable  # sharded ones train too


def main(argv: list[str] | None = None) -> None:
    """One rank of the 2-process test: build per rank, shard with `apply_tensor_parallel`, save the logits."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lm", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from training.tensor_parallel import apply_tensor_parallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, _ = rank_build(Path(args.lm), RankLayout(tp=2, tp_rank=rank))
    model = open_gates(apply_tensor_parallel(model.float(), dist.group.WORLD))
    tokens, _, images = micro_batches(model, 1)[0]
    with torch.no_grad():
        torch.save(model(tokens, images), Path(args.out) / f"logits_{rank}.pt")
    names = sorted(n for n, _ in model.trainable_named_parameters())
    (Path(args.out) / f"trainable_{rank}.json").write_text(json.dumps(names))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
