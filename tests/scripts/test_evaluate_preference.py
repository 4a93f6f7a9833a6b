"""scripts.evaluate --task preference: a reward model's held-out pairwise accuracy, checked against its rewards
computed by hand; bad pairs and the wrong kind of export are refused in one line."""

import json
from dataclasses import replace

import pytest
import torch

from adapters.chat import Message, encode_dialog
from adapters.model_io import save_checkpoint
from adapters.multimodal import ImageBatch, build_multimodal
from media.image import load_image
from scripts import evaluate
from tests.scripts.test_demo_vqa import read_jsonl, write_jsonl
from tests.scripts.test_evaluate import open_gates, run
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model
from vision.tiling import TilingConfig, collate_tiled, tile_image

COLOUR, SHAPE = "What colour are the shapes?", "What shape is it?"


@pytest.fixture(scope="module")
def rm_task(tmp_path_factory):
    """A reward model with a random (hand-set) head, a plain image export, and pairs: rows "a"/"b" and "c"/"d"
    are the same pair both ways round, so exactly one of each is right whatever the head."""
    from PIL import Image

    root = tmp_path_factory.mktemp("evaluate_preference")
    tok = build_tiny_tokenizer(root)
    base = build_tiny_vqa_model(tok, seed=0)
    policy = save_checkpoint(base, root / "policy", tokenizer_path=root / "tokenizer.model")
    model = build_multimodal(replace(base.cfg, reward_head=True), base.lm)
    model.load_state_dict(base.state_dict(), strict=False)
    open_gates(model)
    torch.manual_seed(3)
    with torch.no_grad():
        torch.nn.init.normal_(model.reward_head.weight)
        model.reward_head.bias.fill_(0.25)
    ckpt = save_checkpoint(model, root / "rm", tokenizer_path=root / "tokenizer.model")
    folder = root / "task"
    (folder / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "img" / "red.png")
    Image.new("RGB", (300, 70), (30, 30, 200)).save(folder / "img" / "wide.png")
    rows = [{"id": "a", "image": "img/red.png", "question": COLOUR, "chosen": "red", "rejected": "blue"},
            {"id": "b", "image": "img/red.png", "question": COLOUR, "chosen": "blue", "rejected": "red"},
            {"id": "c", "image": "img/wide.png", "question": SHAPE, "chosen": "a circle", "rejected": "two squares"},
            {"id": "d", "image": "img/wide.png", "question": SHAPE, "chosen": "two squares", "rejected": "a circle"},
            {"id": "e", "image": "img/wide.png", "question": COLOUR, "chosen": "blue", "rejected": "green"},
            {"id": "f", "image": "img/red.png", "question": SHAPE, "chosen": "square", "rejected": "3"}]
    data = write_jsonl(folder / "pairs.jsonl", rows)
    return {"ckpt": ckpt, "policy": policy, "data": data, "rows": rows, "tok": tok, "model": model.eval()}


def brute_reward(model, tok, row, folder) -> dict[str, float]:
    """The head on the final hidden state of prompt + answer + <|eot_id|>, one unpadded row."""
    tiling = TilingConfig(tile_size=model.cfg.vision.tile_size, max_tiles=model.cfg.vision.max_tiles)
    images = ImageBatch.from_collated(collate_tiled([[tile_image(load_image(folder / row["image"]), tiling)]]))
    prompt = encode_dialog(tok, [Message("user", row["question"], n_images=1)])
    with torch.no_grad():
        out = {}
        for key in ("chosen", "rejected"):
            tokens = prompt + tok.encode(row[key]) + [tok.eot_id]
            hidden = model(torch.tensor([tokens]), images.trimmed(), return_hidden=True)[0, -1]
            out[key] = model.reward_head(hidden).item()
    return out


@pytest.mark.parametrize("batch_size", ["1", "4"])
def test_pairwise_accuracy_is_the_fraction_of_pairs_the_rewards_order_right(rm_task, tmp_path, capsys, batch_size):
    out = tmp_path / "out"
    assert run(rm_task["ckpt"], "preference", rm_task["data"], out, "--batch-size", batch_size) == 0
    rewards = {r["id"]: brute_reward(rm_task["model"], rm_task["tok"], r, rm_task["data"].parent)
               for r in rm_task["rows"]}
    assert all(r["chosen"] != r["rejected"] for r in rewards.values())
    right = {k: int(r["chosen"] > r["rejected"]) for k, r in rewards.items()}
    assert right["a"] + right["b"] == 1 and right["c"] + right["d"] == 1
    scores = read_jsonl(out / "scores.jsonl")
    assert [s["id"] for s in scores] == list("abcdef")
    for s in scores:
        assert s == {"id": s["id"], "score": right[s["id"]],
                     "reward_chosen": pytest.approx(rewards[s["id"]]["chosen"], abs=1e-5),
                     "reward_rejected": pytest.approx(rewards[s["id"]]["rejected"], abs=1e-5)}
    assert read_jsonl(out / "predictions.jsonl") == [{"id": k, "answer": "chosen" if v else "rejected"}
                                                     for k, v in right.items()]
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = sum(right.values()) / 6
    assert 0 < accuracy < 1
    assert metrics == {"task": "preference", "metric": "pairwise_accuracy", "score": pytest.approx(accuracy), "n": 6,
                       "checkpoint": str(rm_task["ckpt"]), "data": str(rm_task["data"])}
    assert f"preference: pairwise_accuracy {accuracy:.4f} over 6 rows" in capsys.readouterr().out


def test_a_tie_counts_as_wrong(rm_task, tmp_path):
    """A zero head scores every answer alike: no pair is ordered right."""
    model = build_tiny_vqa_model(rm_task["tok"], seed=0)
    model = build_multimodal(replace(model.cfg, reward_head=True), model.lm)
    ckpt = save_checkpoint(model, tmp_path / "zero", tokenizer_path=rm_task["tok"].path)
    assert run(ckpt, "preference", rm_task["data"], tmp_path / "out") == 0
    assert [s["score"] for s in read_jsonl(tmp_path / "out" / "scores.jsonl")] == [0] * 6
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["score"] == 0


@pytest.fixture()
def media(tmp_path):
    (tmp_path / "red.png").write_bytes(b"never decoded: the checks fail first")
    return tmp_path


PAIR = {"id": "p", "image": "red.png", "question": "q?", "chosen": "red", "rejected": "blue"}


@pytest.mark.parametrize("lines, message", [
    ([{k: v for k, v in PAIR.items() if k != "rejected"}], ":1 (id 'p'): no 'rejected' key"),
    ([{**PAIR, "chosen": ""}], ":1 (id 'p'): 'chosen' must be a non-empty string, got ''"),
    ([{**PAIR, "rejected": ["blue"]}], ":1 (id 'p'): 'rejected' must be a non-empty string, got ['blue']"),
    ([PAIR, {**PAIR, "id": "q", "chosen": " blue"}],
     ":2 (id 'q'): 'chosen' and 'rejected' are the same answer ('blue'): a preference pair needs two different"),
    ([{**PAIR, "answers": ["red", "red"]}], ":1 (id 'p'): unknown keys ['answers'] for --task preference (expected "
                                            "id, image, question, chosen, rejected)"),
    ([{**PAIR, "image": "gone.png"}], ":1 (id 'p'): image file not found: 'gone.png'"),
    ([PAIR, PAIR], ":2: duplicate id 'p' (first on line 1)"),
])
def test_a_bad_pair_is_one_line_before_any_model_loads(media, capsys, monkeypatch, lines, message):
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("the model loaded before the checks"))
    data = write_jsonl(media / "pairs.jsonl", lines)
    assert run(media / "no_checkpoint", "preference", data, media / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}{message}") and len(err.splitlines()) == 1
    assert not (media / "out").exists()


def test_the_checkpoint_must_be_a_reward_model_and_only_for_preference(rm_task, tmp_path, capsys):
    assert run(rm_task["policy"], "preference", rm_task["data"], tmp_path / "a") == 2
    assert "--task preference needs a reward model" in capsys.readouterr().err
    vqa = write_jsonl(rm_task["data"].parent / "vqa.jsonl",
                      [{"id": "a", "image": "img/red.png", "question": COLOUR, "answers": ["red", "red"]}])
    assert run(rm_task["ckpt"], "vqav2", vqa, tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert "is a reward model" in err and "--task preference" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
