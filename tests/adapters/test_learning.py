"""The image learning proof (scripts.bench_learning image, seed 0: the in-process recipe of adapters.vqa):
accuracy asserted, time not. The production road for image (scripts/learning_image.py: make_synthetic ->
build_shards -> train text / clip / image -> export -> demo_vqa batch answers -> score) is checked here for
its wiring; it reaches 0.88 on seed 0 and replaces the recipe once it meets the same bars."""

import json
from pathlib import Path

import yaml

from scripts import bench_learning, learning_image


def test_adapter_learns_from_images_that_the_frozen_lm_cannot_see(tmp_path, capsys):
    argv = ["image", "--steps", "600", "--clip-steps", "600", "--seed", "0", "--json", "--work-dir", str(tmp_path)]
    assert bench_learning.main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    chance = m["chance_accuracy"]
    # The frozen LM alone (no image) is at chance; with the trained adapter it answers held-out scenes.
    assert abs(m["frozen_lm_alone_accuracy"] - chance) < 0.1
    assert m["heldout_accuracy"] >= 0.9
    assert min(m["heldout_accuracy_by_kind"].values()) >= 0.8  # every kind, not only the easy colour


def test_the_run_configs_chain_the_road_stages(tmp_path):
    """Each config reads what the previous stage writes, all rooted under the work dir."""
    from training.config import load_run_config

    def cfg(kind):
        return load_run_config(str(learning_image.RUN_CONFIGS[kind]),
                               learning_image.rooted_overrides(kind, tmp_path, 3, False))

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

    (tmp_path / learning_image.DATA).mkdir(parents=True)
    road, checked_in = load_config(learning_image.curation_config(tmp_path)), yaml.safe_load(
        learning_image.CURATION.read_text())
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
