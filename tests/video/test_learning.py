"""The video adapter learns what no single frame shows, on the production road (scripts/learning_video.py,
seed 0: make_synthetic video-motion -> build_video_shards + build_shards of stills -> train text / clip / image
/ video -> export -> demo_video and demo_vqa batch answers -> score). Seeds 1 and 2: README table."""

import json
from pathlib import Path

from scripts import bench_learning, learning_video


def test_video_adapter_learns_motion_that_one_frame_cannot_show(tmp_path, capsys, road_threads):
    assert bench_learning.main(["video", "--seed", "0", "--json", "--work-dir", str(tmp_path)]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    print(json.dumps(m))  # the figures, for `pytest -rP`
    chance = m["chance_accuracy"]
    assert chance == 0.25
    # Without the video (zero-gated video adapter), and from the middle frame alone, the direction is a guess.
    assert abs(m["frozen_lm_alone_accuracy"] - chance) < 0.1, m
    assert abs(m["image_only_accuracy"] - chance) < 0.1, m
    # The image model did learn what one frame shows (where the ball is): its features carry the place.
    assert m["image_model_position_accuracy"] >= 0.9, m
    # With the video adapter on top of it, held-out clips' directions are read from the motion.
    assert m["heldout_accuracy"] >= 0.9, m
    assert min(m["heldout_accuracy_by_direction"].values()) >= 0.8, m
    assert m["shards_kept"]["clips"] == m["train_clips"] == learning_video.N_TRAIN
    assert Path(m["export"], "config.json").is_file()
