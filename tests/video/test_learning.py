"""The video adapter learns what no single frame shows (about 4 minutes on 2 CPU cores)."""

import json

from scripts import bench_learning


def test_video_adapter_learns_motion_that_one_frame_cannot_show(tmp_path, capsys):
    argv = ["video", "--seed", "0", "--json", "--work-dir", str(tmp_path)]
    assert bench_learning.main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    chance = m["chance_accuracy"]
    assert chance == 0.25
    # Without the video, and from the middle frame alone, the direction is a guess.
    assert abs(m["frozen_lm_alone_accuracy"] - chance) < 0.1
    assert abs(m["image_only_heldout_accuracy"] - chance) < 0.1
    # The image model did learn what one frame shows (where the ball is): its features carry the place.
    assert m["image_model_position_accuracy"] >= 0.9, m
    # With the video adapter on top of it, held-out clips' directions are read from the motion.
    assert m["heldout_accuracy"] >= 0.9, m
    assert min(m["heldout_accuracy_by_direction"].values()) >= 0.8, m
