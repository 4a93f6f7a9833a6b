"""The CPU learning check (scripts.bench_learning) with a fixed seed: accuracy asserted, time not."""

import json

from scripts import bench_learning


def test_adapter_learns_from_images_that_the_frozen_lm_cannot_see(tmp_path, capsys):
    argv = ["image", "--steps", "600", "--clip-steps", "600", "--seed", "0", "--json", "--work-dir", str(tmp_path)]
    assert bench_learning.main(argv) == 0
    m = json.loads(capsys.readouterr().out)
    chance = m["chance_accuracy"]
    # The frozen LM alone (no image) is at chance; with the trained adapter it answers held-out scenes.
    assert abs(m["frozen_lm_alone_accuracy"] - chance) < 0.1
    assert m["heldout_accuracy"] >= 0.9
    assert min(m["heldout_accuracy_by_kind"].values()) >= 0.8  # every kind, not only the easy colour
