"""Pipeline mode: stage layout, the inter-stage batch contract, and a 2-stage DeepSpeed run on CPU/gloo.

The distributed run (2 processes, ``pipe_worker.py``) trains the tiny 8-layer model (2 cross-attention
groups -> 2 stages) for 3 steps of 2 micro-batches with bf16 + FP32 gradient accumulation + ZeRO-1, and
non-reentrant activation checkpointing of each stage block.
Its losses are compared with a plain-PyTorch reference run here, in one process, through the model's
own ``ImageTextTask`` and the same optimizer arithmetic as DeepSpeed's BF16_Optimizer: bf16 parameters,
FP32 master weights, FP32 gradient accumulation over the micro-batches (loss / GAS), clipping at 1.0 on
the FP32 gradients, AdamW on the masters, bf16 copy back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.llama import llama_config
from adapters.model_io import read_shards, shard_file
from adapters.multimodal import build_multimodal, multimodal_config
from adapters.task import ImageTextTask, build_param_groups
from tests.training import pipe_worker
from tests.training.ranks import run_ranks
from training import pipeline

STEPS = 3


# ----------------------------------------------------------------------------------------------
# Single process: layout, batches, and the stage pieces against the model


def test_stage_layout_groups_four_self_attention_layers_around_each_cross_attention_block():
    model = pipe_worker.build_test_model()  # 8 layers, blocks before layers 3 and 7
    assert model.schedule == [3, 7]
    assert pipeline.stage_layer_ids(model, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pipeline.stage_layer_ids(model, 1) == [list(range(8))]
    with pytest.raises(pipeline.PipelineConfigError, match="num_stages"):
        pipeline.stage_layer_ids(model, 3)
    # 10 layers: the released-style schedule counts from the top ([5, 9]); the first group takes the rest.
    deep = build_multimodal(multimodal_config("tiny", lm=llama_config("tiny", n_layers=10), xattn_every=4))
    assert pipeline.stage_layer_ids(deep, 2) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]


def test_pipeline_batch_pads_to_fixed_integer_tensors():
    model = pipe_worker.build_test_model()
    tokens, labels, images = pipe_worker.micro_batches(model, 1)[0]
    trimmed = images.trimmed()  # 2 tile slots in use
    (tok, tiles, layouts, tile_mask, image_mask), (lab,) = pipeline.pipeline_batch(
        tokens, labels, trimmed, seq_len=20, n_images=2, n_tiles=4)
    assert [t.dtype for t in (tok, tiles, layouts, tile_mask, image_mask, lab)] == [
        torch.int64, torch.int32, torch.int64, torch.uint8, torch.uint8, torch.int64]
    assert tok.shape == lab.shape == (2, 20) and tiles.shape[1:3] == (2, 4) and image_mask.shape == (2, 2)
    assert torch.equal(tiles.view(torch.float32)[:, :1, :2], trimmed.tiles)  # bit-cast, exact
    assert not tiles.view(torch.float32)[:, 1:].any() and not image_mask[:, 1:].any()
    assert (lab[:, 16:] == -100).all() and torch.equal(tok[:, :16], tokens)
    with pytest.raises(pipeline.PipelineBatchError, match="seq_len=8"):
        pipeline.pipeline_batch(tokens, labels, images, seq_len=8)


def _run_stages(model, batch, num_stages):
    """The pipeline's layers in one process: encoder replica + block per stage, then the loss."""
    ids = pipeline.stage_layer_ids(model, num_stages)
    enc = pipeline.ImageEncoderPipe(*pipeline.ImageEncoderPipe.args_from(model))
    blocks = [pipeline.StageBlock(model, i, first=s == 0, last=s == num_stages - 1)
              for s, i in enumerate(ids)]
    x = batch[0]
    for blk in blocks:
        x = blk(enc(x))
    return blocks[-1].loss(x, batch[1])


def test_stage_pieces_compute_the_model_loss_and_gradients():
    model = pipe_worker.build_test_model()
    tokens, labels, images = pipe_worker.micro_batches(model, 1)[0]
    task = ImageTextTask(model).train()
    ref = task(tokens, labels, images)["loss"]
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = _run_stages(model, pipeline.pipeline_batch(tokens, labels, images), num_stages=2)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    assert {n for n, p in model.trainable_named_parameters() if p.grad is not None} == set(ref_grads)
    for n, p in model.trainable_named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_text_only_micro_batch_matches_the_model_that_skips_cross_attention():
    model = pipe_worker.build_test_model()
    tokens, labels, images = pipe_worker.micro_batches(model, 1)[0]
    tokens = tokens.clamp(max=model.cfg.lm.vocab_size - 1)  # no image token ...
    images.image_mask[:] = False  # ... and no image: the model skips its cross-attention layers
    images.tile_mask[:] = False
    with torch.no_grad():
        ref = ImageTextTask(model)(tokens, labels, images)["loss"]
        loss = _run_stages(model, pipeline.pipeline_batch(tokens, labels, images), num_stages=2)
    assert torch.equal(loss, ref)  # the gated blocks add exactly zero to rows that see no image


def test_a_micro_batch_of_another_shape_is_refused_on_the_first_stage():
    model = pipe_worker.build_test_model()
    tokens, labels, images = pipe_worker.micro_batches(model, 1)[0]
    block = pipeline.StageBlock(model, [0, 1, 2, 3], first=True, last=False)
    enc = pipeline.ImageEncoderPipe(*pipeline.ImageEncoderPipe.args_from(model))
    with torch.no_grad():
        block(enc(pipeline.pipeline_batch(tokens, labels, images)[0]))
        with pytest.raises(pipeline.PipelineBatchError, match="pad every batch"):
            block(enc(pipeline.pipeline_batch(tokens, labels, images, seq_len=20)[0]))


# ----------------------------------------------------------------------------------------------
# Two processes


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory) -> Path:
    return run_ranks("tests.training.pipe_worker", tmp_path_factory.mktemp("pipe2"), ["--stages", "2", "--steps", str(STEPS)])


def _reference_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch, one process, BF16_Optimizer arithmetic (see module docstring): the losses and the
    FP32 master weights after the steps."""
    torch.manual_seed(0)
    model = pipe_worker.build_test_model()
    for p in model.parameters():  # DeepSpeed's bf16 mode casts parameters only (RoPE table stays fp32)
        p.data = p.data.to(torch.bfloat16)
    task = ImageTextTask(model).train()
    groups = build_param_groups(model, pipe_worker.LR)
    masters = {id(p): p.detach().float().clone() for g in groups for p in g["params"]}
    opt = torch.optim.AdamW([{**g, "params": [masters[id(p)] for p in g["params"]]} for g in groups],
                            lr=pipe_worker.LR, betas=(0.9, 0.95))
    params = [p for g in groups for p in g["params"]]
    gas = pipe_worker.GRAD_ACCUM
    batches = pipe_worker.micro_batches(model, STEPS * gas)
    losses = []
    for step in range(STEPS):
        acc = {id(p): torch.zeros_like(masters[id(p)]) for p in params}
        total = 0.0
        for tokens, labels, images in batches[step * gas : (step + 1) * gas]:
            loss = task(tokens, labels, images)["loss"]
            (loss / gas).backward()
            total += loss.item()
            for p in params:
                acc[id(p)] += p.grad.float()
                p.grad = None
        for p in params:
            masters[id(p)].grad = acc[id(p)]
        torch.nn.utils.clip_grad_norm_(list(masters.values()), 1.0)
        opt.step()
        with torch.no_grad():
            for p in params:
                p.copy_(masters[id(p)])
        losses.append(total / gas)
    names = {id(p): n for n, p in model.named_parameters()}
    return losses, {names[id(p)]: masters[id(p)] for p in params}


def test_two_stage_losses_match_the_single_process_reference(two_stage_run):
    got = json.loads((two_stage_run / "losses.json").read_text())["losses"]
    want, _ = _reference_run()
    assert len(got) == STEPS
    # Before any update the two compute the same bf16 function: equal up to summation order.
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    # After updates they round differently (encoder gradients summed across stages in FP32 vs in one
    # backward pass; DeepSpeed's flat FP32 norm for clipping): measured ~5e-5 relative on these losses.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-4, atol=0)


def test_encoder_replicas_identical_and_trained(two_stage_run):
    model = pipe_worker.build_test_model()
    every = [f"vision.{n}" for n, _ in model.vision.named_parameters()]
    every += [f"projector.{n}" for n, _ in model.projector.named_parameters()]
    for r in range(2):  # the tie names every encoder and projector parameter, on both stages
        assert json.loads((two_stage_run / f"tied_{r}.json").read_text()) == every
    r0, r1 = (load_file(str(two_stage_run / f"encoder_{r}.safetensors")) for r in range(2))
    assert r0.keys() == r1.keys() and any(k.startswith("fp32.vision.") for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    init = dict(model.named_parameters())
    fp32 = [k for k in r0 if k.startswith("fp32.")]
    changed = [k for k in fp32 if not torch.equal(r0[k], init[k.removeprefix("fp32.")])]
    assert len(changed) > 0.9 * len(fp32)  # the encoder did train


def test_lm_weights_bitwise_unchanged(two_stage_run):
    model = pipe_worker.build_test_model()
    lm = {k: v for r in range(2) for k, v in load_file(str(two_stage_run / f"lm_{r}.safetensors")).items()}
    full = {n: p for n, p in model.named_parameters() if n.startswith("lm.")}
    assert lm.keys() == full.keys()  # the two stages hold the whole LM, each layer once
    for n, p in full.items():
        assert torch.equal(lm[n], p.detach().to(torch.bfloat16)), n


def test_export_has_every_trainable_weight_under_model_names(two_stage_run):
    export = read_shards(two_stage_run / "export")  # each stage wrote its own shard, nothing was gathered
    assert sorted(p.name for p in (two_stage_run / "export").glob("model-*")) == [shard_file(i, 2) for i in range(2)]
    model = pipe_worker.build_test_model()
    trainable = dict(model.trainable_named_parameters())
    assert export.keys() == trainable.keys()
    enc = load_file(str(two_stage_run / "encoder_0.safetensors"))
    assert torch.equal(export["vision.conv1.weight"], enc["fp32.vision.conv1.weight"])
    assert all(v.dtype == torch.float32 and v.shape == trainable[k].shape for k, v in export.items())
    # No stage lost its gradients: every trainable tensor moved (both stages' cross-attention blocks,
    # the first stage's image-token rows, encoder and projector).
    assert [k for k, v in export.items() if torch.equal(v, trainable[k].detach())] == []
    model.load_state_dict(export, strict=False)  # loads into the full model for save_checkpoint
