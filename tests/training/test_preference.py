"""Preference training (`training.preference`): preference samples -> ranked rows and pairs, the reward model's
and DPO's losses against brute force, the EMA reference, bad samples named, and tiny runs of the shipped
configs/train/reward.yaml and dpo.yaml (one CPU process, fp32)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adapters.chat import IGNORE_INDEX, image_input_id
from adapters.model_io import load_checkpoint, save_checkpoint
from training.config import load_run_config
from training.data import BadSampleError, ShardStream, TrainBatches
from training.preference import DPOTask, PreferenceCodec, RewardTask, build_reward_model
from training.trainer import train
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model
from tests.training.test_conversation import TILING, two_images, write
from tests.training.test_data import COLORS, jpeg
from tests.training.test_trainer import copy_run

QUESTION = "<|image|>What color is the square?"


def pref(key: str, prompt: list[tuple[str, str]], images=None, **answers) -> dict:
    turns = [{"role": r, "content": c} for r, c in prompt]
    return {"__key__": key, "json": {"meta": {"conversations": turns, **answers}}, **(images or {})}


def color_pair(i: int) -> dict:
    color, wrong = list(COLORS)[i % 4], list(COLORS)[(i + 1) % 4]
    return pref(f"p{i:03d}", [("user", QUESTION)], {"jpg": jpeg(COLORS[color])}, chosen=color, rejected=wrong)


def texts() -> list[str]:
    return [QUESTION, "Which image is red, <|image|> or <|image|>?", "Answer in one word.", "first", "second",
            "It is", *COLORS]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    tok = build_tiny_tokenizer(root, texts=texts())
    for s in range(2):
        write(root / f"pref_{s:05d}.tar", [color_pair(s * 8 + i) for i in range(8)])
    model = build_tiny_vqa_model(tok)
    save_checkpoint(model, root / "sft", tokenizer_path=tok.path)
    return root, tok


def raw_of(tmp_path: Path, sample: dict):
    shard = write(tmp_path / "one_00000.tar", [sample])
    return next(ShardStream([shard], shuffle_buffer=1).epoch(0))


def labelled(tokens, labels) -> list[int]:
    return [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX]


def test_rows_are_the_answers_best_first_labelled_on_the_final_answer_only(root, tmp_path):
    _, tok = root
    prompt = [("system", "Answer in one word."), ("user", "Which image is red, <|image|> or <|image|>?"),
              ("assistant", "first"), ("user", "What color is the other one?")]
    raw = raw_of(tmp_path, pref("k", prompt, two_images(), chosen="blue", rejected="green", edited="It is blue"))
    for mask_eot, end in ((False, [tok.eot_id]), (True, [])):
        ex = PreferenceCodec(tok, TILING, mask_eot=mask_eot).decode(raw)
        rows = ex.rows
        assert [labelled(*r) for r in rows] == [tok.encode(a) + end for a in ("It is blue", "blue", "green")]
        prefix = rows[0][0][: -len(tok.encode("It is blue")) - 1]  # every row shares the prompt (earlier answer too)
        assert all(t[: len(prefix)] == prefix for t, _ in rows) and prefix.count(image_input_id(tok)) == 2
        assert len(ex.media) == 2
    mb = PreferenceCodec(tok, TILING, mask_eot=True).collate([ex, ex])
    assert mb["pairs"].tolist() == [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]]
    assert mb["lengths"].tolist() == [len(t) for t, _ in rows] * 2
    assert mb["images"].image_mask.tolist() == [[True, True]] * 6  # the sample's images on each of its rows


def test_a_micro_batch_takes_whole_samples_and_counts_every_answer_as_a_row(root):
    root, tok = root
    batches = TrainBatches(ShardStream([root / "pref_00000.tar"], shuffle_buffer=1),
                           PreferenceCodec(tok, TILING, mask_eot=False), tok.pad_id, 64, 4096, max_rows=5)
    mb = next(batches)
    assert mb.tokens.shape[0] == 4 and mb.media["pairs"].tolist() == [[0, 1], [2, 3]]  # 2 samples: 5 rows < 6
    assert mb.keys[0] == mb.keys[1] != mb.keys[2] == mb.keys[3]


BAD = {
    "same": (dict(chosen="red", rejected=" red "), r"meta 'chosen' and 'rejected' are the same answer"),
    "edited": (dict(chosen="red", rejected="blue", edited="red"), r"meta 'edited' and 'chosen' are the same"),
    "norejected": (dict(chosen="red"), r"meta 'rejected' must be a non-empty string"),
    "emptyedited": (dict(chosen="red", rejected="blue", edited=""), r"meta 'edited' must be a non-empty string"),
}


def test_bad_preference_samples_are_named_or_counted(root, tmp_path):
    _, tok = root
    image = {"jpg": jpeg(COLORS["red"])}
    samples = [pref(k, [("user", QUESTION)], image, **a) for k, (a, _) in BAD.items()]
    samples += [pref("endsassistant", [("user", QUESTION), ("assistant", "red")], image, chosen="a", rejected="b"),
                pref("placeholders", [("user", "What color?")], image, chosen="red", rejected="blue"),
                pref("order", [("assistant", "hi"), ("user", QUESTION)], image, chosen="red", rejected="blue")]
    messages = {**{k: m for k, (_, m) in BAD.items()},
                "endsassistant": r"conversations\[1\].role is 'assistant': a preference prompt ends with the user",
                "placeholders": r"0 <\|image\|> placeholder\(s\) but the sample has 1 image",
                "order": r"conversations\[0\].role is 'assistant' where 'user' belongs"}
    shard = write(tmp_path / "bad_00000.tar", [color_pair(0), *samples])
    codec = PreferenceCodec(tok, TILING, mask_eot=True)
    found = {r.key: r for r in ShardStream([shard], shuffle_buffer=1).epoch(0)}
    for key, message in messages.items():
        with pytest.raises(BadSampleError, match=rf"bad_00000.tar: sample {key}\.json:? .*{message}"):
            codec.decode(found[key])
    batches = TrainBatches(ShardStream([shard], shuffle_buffer=1), codec, tok.pad_id, 64, 4096, 2, on_error="count")
    assert next(batches).keys == [f"{shard}:p000"] * 2
    next(batches)
    assert batches.bad == {str(shard): list(messages)}


def micro_batch(root, codec):
    root, tok = root
    return next(TrainBatches(ShardStream([root / "pref_00000.tar"], shuffle_buffer=1), codec, tok.pad_id, 64,
                             4096, max_rows=4))


def test_reward_model_reads_the_final_token_and_starts_at_zero(root):
    root_dir, tok = root
    cfg = load_run_config(None, ["kind=reward", "data.format=preference", f"model.init_from={root_dir / 'sft'}",
                                 f"model.tokenizer={tok.path}"])
    model = build_reward_model(cfg, tok)
    mb = micro_batch(root, PreferenceCodec(tok, TILING, mask_eot=False))
    out = RewardTask(model, reward_reg=0.5)(mb.tokens, mb.labels, **mb.media)
    assert out["loss"].item() == pytest.approx(math.log(2)) and out["margin"].item() == 0  # a zero head
    torch.manual_seed(0)
    torch.nn.init.normal_(model.reward_head.weight)
    rewards = model.reward(mb.tokens, mb.media["lengths"], mb.media["images"])
    hidden = model(mb.tokens, mb.media["images"], return_hidden=True)
    last = torch.stack([hidden[i, n - 1] for i, n in enumerate(mb.media["lengths"].tolist())])
    torch.testing.assert_close(rewards, model.reward_head(last).squeeze(-1))
    assert mb.tokens[torch.arange(4), mb.media["lengths"] - 1].tolist() == [tok.eot_id] * 4
    out = RewardTask(model, reward_reg=0.5)(mb.tokens, mb.labels, **mb.media)
    pairs = mb.media["pairs"]
    want = (-F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).mean() + 0.5 * rewards.pow(2).mean())
    torch.testing.assert_close(out["loss"], want)
    out["loss"].backward()
    assert model.cross_attention_layers[0].gate_attn.grad is not None  # the image side trains
    assert all(p.grad is None for p in model.lm.parameters())


def brute_logps(model, tokens, labels, images) -> torch.Tensor:
    """Sum of log_softmax over the full vocabulary at each labelled next token, row by row."""
    logits = model(tokens, images)
    out = []
    for i in range(tokens.shape[0]):
        total = 0.0
        for t in range(tokens.shape[1] - 1):
            if labels[i, t + 1] != IGNORE_INDEX:
                total = total + torch.log_softmax(logits[i, t].double(), -1)[labels[i, t + 1]]
        out.append(total)
    return torch.stack(out).float()


def test_dpo_loss_against_brute_force_and_the_ema_reference(root):
    _, tok = root
    model = build_tiny_vqa_model(tok)
    task = DPOTask(model, beta=0.5, nll_weight=0.25, ema=0.5)
    mb = micro_batch(root, PreferenceCodec(tok, TILING, mask_eot=True))
    images, pairs = mb.media["images"], mb.media["pairs"]
    preferred = pairs[:, 0].unique()
    n_answer = (mb.labels[preferred] != IGNORE_INDEX).sum()
    out = task(mb.tokens, mb.labels, **mb.media)
    start = brute_logps(model, mb.tokens, mb.labels, images)
    torch.testing.assert_close(out["loss"], math.log(2) - 0.25 * start[preferred].sum() / n_answer)
    assert out["reward_chosen"].item() == 0 and out["margin"].item() == 0  # policy == reference at the start
    before = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    policy = brute_logps(model, mb.tokens, mb.labels, images)
    with torch.no_grad():
        state = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
        for n, p in model.trainable_named_parameters():
            p.copy_(before[n])
        reference = brute_logps(model, mb.tokens, mb.labels, images)
        for n, p in model.trainable_named_parameters():
            p.copy_(state[n])
    r = 0.5 * (policy - reference)
    want = -F.logsigmoid(r[pairs[:, 0]] - r[pairs[:, 1]]).mean() - 0.25 * policy[preferred].sum() / n_answer
    out = task(mb.tokens, mb.labels, **mb.media)
    torch.testing.assert_close(out["loss"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["accuracy"], (r[pairs[:, 0]] > r[pairs[:, 1]]).float().mean())
    task.refresh_reference()  # halfway from the start towards the policy
    for n, ref in task.reference_weights().items():
        torch.testing.assert_close(ref, (before[n] + state[n]) / 2)


def preference_cfg(root_dir: Path, tok, config: str, run: str, *extra: str):
    return load_run_config(Path("configs/train") / f"{config}.yaml", [
        f"data.shards={root_dir}/pref_{{00000..00001}}.tar", f"model.tokenizer={tok.path}",
        f"model.init_from={root_dir / 'sft'}", f"train.run_dir={root_dir / run}", "train.progress=false",
        "deepspeed=configs/deepspeed/cpu_fp32.json", "data.max_seq_len=64", "data.max_tokens=512",
        "data.max_rows=4", "data.shuffle_buffer=4", "optim.warmup=1", "optim.lr=1e-3", *extra])


def test_a_reward_run_learns_to_rank_and_exports_a_model_with_its_head(root):
    root_dir, tok = root
    cfg = preference_cfg(root_dir, tok, "reward", "rm", "model.lm=null", "model.swap_lm=false", "train.steps=4")
    result = train(cfg)
    records = [json.loads(ln) for ln in (root_dir / "rm" / "losses.jsonl").read_text().splitlines()]
    assert [set(r) >= {"loss", "accuracy", "margin"} for r in records] == [True] * 4
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    model = load_checkpoint(result.export_dir)
    assert model.cfg.reward_head and model.reward_head.weight.abs().sum() > 0
    sft = load_checkpoint(root_dir / "sft")
    assert all(torch.equal(a, b) for a, b in zip(model.lm.state_dict().values(), sft.lm.state_dict().values()))


def test_dpo_runs_with_a_frozen_or_ema_reference_and_resumes_exactly(root):
    root_dir, tok = root
    frozen = train(preference_cfg(root_dir, tok, "dpo", "dpo_frozen", "train.steps=4", "preference.ema=0"))
    records = [json.loads(ln) for ln in (root_dir / "dpo_frozen" / "losses.jsonl").read_text().splitlines()]
    assert {"reward_chosen", "reward_rejected", "margin", "accuracy"} <= set(records[0])
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    ema = ["preference.ema=0.5", "preference.ref_every=1"]
    whole = train(preference_cfg(root_dir, tok, "dpo", "dpo_whole", "train.steps=4", "train.save_every=2", *ema))
    copy_run(root_dir / "dpo_whole", root_dir / "dpo_cut", "step_2")  # the reference is in the checkpoint
    resumed = train(preference_cfg(root_dir, tok, "dpo", "dpo_cut", "train.steps=4", "train.save_every=2", *ema))
    assert resumed.losses == {k: v for k, v in whole.losses.items() if k > 2}
    assert frozen.losses[1] == whole.losses[1] and frozen.losses[2] != pytest.approx(whole.losses[2], rel=1e-6)
    policy = load_checkpoint(resumed.export_dir)
    assert not policy.cfg.reward_head
