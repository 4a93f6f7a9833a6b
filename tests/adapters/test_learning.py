"""The image learning proof on the production road (scripts/learning_image.py, seed 0: make_synthetic ->
build_shards -> train text / clip / image -> export -> demo_vqa batch answers -> score), then the post-training
road on top of it (scripts/learning_posttrain.py): accuracy asserted, time not. Seeds 1 and 2 are
`python -m scripts.bench_learning image|posttrain --seed S` (README tables)."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from scripts import _road, bench_learning, learning_image


@pytest.fixture(scope="module")
def image_road(tmp_path_factory):
    """The image road's work dir and metrics (both cores, as `bench_learning` runs on the CI machine)."""
    work = tmp_path_factory.mktemp("road")
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        yield work, learning_image.run_image_road(work, seed=0, progress=False)
    finally:
        torch.set_num_threads(before)


def test_adapter_learns_from_images_that_the_frozen_lm_cannot_see(image_road):
    _, m = image_road
    chance = m["chance_accuracy"]
    # The frozen LM alone (no image reaches it: zero-gated cross-attention) is at chance; with the trained
    # adapter the export answers held-out scenes, through the demo's own answering code.
    assert abs(m["frozen_lm_alone_accuracy"] - chance) < 0.1
    assert m["heldout_accuracy"] >= 0.9
    assert min(m["heldout_accuracy_by_kind"].values()) >= 0.8  # every kind, not only the easy colour
    assert Path(m["export"], "config.json").is_file() and m["shards_kept"] == learning_image.N_TRAIN


def test_post_training_on_the_same_road(image_road, capsys, road_threads):
    """SFT on two-image conversations (LLaVA JSON -> build_shards), averaging two SFT seeds, the reward model
    and DPO, every stage an entry point; the figures the README reports for seed 0."""
    work, _ = image_road
    assert bench_learning.main(["posttrain", "--seed", "0", "--json", "--work-dir", str(work)]) == 0
    m = json.loads(capsys.readouterr().out)
    assert "image_road" not in m["seconds"]  # the image road's export was reused
    one = m["single_image_accuracy"]
    # SFT (with single-image conversations in its mix) keeps the single-image skills, and so does the average
    assert min(one.values()) >= 0.9
    # Not asserted, because not met on this tiny road (README): two-image questions stay at chance; the average
    # of the two SFT seeds is sometimes better, sometimes worse than the better seed (+0.055, +0.020, -0.055); the
    # reward model's held-out pairwise accuracy (0.52-0.66) depends on when it leaves its log-2 plateau. The road
    # must still average, train and score them on every held-out row.
    assert set(m["average_minus_best_seed"]) == {"two_image", "single_image"}
    assert m["reward_heldout_pairs"] == 100 and (Path(m["exports"]["reward"]) / "config.json").is_file()
    before, after = m["dpo"]["before_dpo"], m["dpo"]["after_dpo"]
    assert before["hallucination_rate"] >= 0.2  # the early model names wrong colours and shapes
    assert after["hallucination_rate"] <= before["hallucination_rate"] - 0.1
    assert after["accuracy"] >= before["accuracy"]


def test_the_run_configs_chain_the_road_stages(tmp_path):
    """Each config reads what the previous stage writes, all rooted under the work dir."""
    from training.config import load_run_config

    def cfg(kind):
        config = learning_image.RUN_CONFIGS[kind]
        return load_run_config(str(config), _road.rooted_overrides(config, tmp_path, 3, False))

    text, clip, image = cfg("text"), cfg("clip"), cfg("image")
    data = tmp_path / learning_image.DATA
    assert text.model.tokenizer == str(data / "tokenizer.model")  # what make_synthetic writes
    shards = str(tmp_path / learning_image.SHARDS / "shard_*.tar")
    assert text.data.shards == clip.data.shards == image.data.shards == shards
    assert image.model.lm == str(Path(text.train.run_dir) / "export")
    assert image.model.encoder_from == str(Path(clip.train.run_dir) / "export")
    assert image.train.run_dir == str(tmp_path / learning_image.IMAGE_RUN) and image.data.format == "qa"
    assert (text.model.seed, image.data.seed, image.train.progress) == (3, 3, False)


def test_curation_config_is_the_checked_in_one_with_dedup_off(tmp_path):
    from data_curation.curation_config import load_config

    written = _road.offline_curation(learning_image.CURATION, tmp_path / "new" / "curation.yaml")
    road, checked_in = load_config(written), yaml.safe_load(learning_image.CURATION.read_text())
    assert not road.dedup.enabled
    assert road.caption.min_words == checked_in["caption"]["min_words"] and road.image.min_side == 32


def test_examples_summary_and_chance_from_the_files(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    questions = write("questions.jsonl", [{"id": "a", "image": "0.png", "question": "What shape are they?"},
                                          {"id": "b", "image": "0.png", "question": "How many shapes are there?"}])
    answers = write("answers.jsonl", [{"id": "a", "answer": "circle", "kind": "shape"},
                                      {"id": "b", "answer": "two", "kind": "count"}])
    preds = write("predictions.jsonl", [{"id": "b", "answer": "Three."}, {"id": "a", "answer": "Circle"}])
    shown = learning_image.examples(questions, answers, preds, n=5)
    assert [(e["answer"], e["expected"], e["right"]) for e in shown] == [("Circle", "circle", True),
                                                                         ("Three.", "two", False)]
    assert shown[0]["image"] == str(tmp_path / "0.png")
    assert learning_image.chance_accuracy(answers) == (1 / 3 + 1 / 3) / 2
    text = learning_image.summary({"examples": shown, "seed": 0, "heldout_questions": 2, "heldout_accuracy": 0.5,
                                   "heldout_accuracy_by_kind": {"shape": 1.0, "count": 0.0},
                                   "chance_accuracy": 1 / 3, "frozen_lm_alone_accuracy": 0.25, "export": "E"})
    assert "WRONG (two)" in text and "right" in text and "accuracy 0.500 (shape 1.00, count 0.00)" in text
