"""The CPU learning check (scripts.bench_learning) with a fixed seed: accuracy asserted, time not."""

import json

from scripts import bench_learning


def test_adapter_learns_from_images_that_the_frozen_lm_cannot_see(tmp_path, capsys):
    assert bench_learning.main(["image", "--steps", "600", "--seed", "0", "--json", "--work-dir", str(tmp_path)]) == 0
    m = json.loads(capsys.readouterr().out)
    chance = m["chance_accuracy"]
    # The frozen LM alone (no image) is at chance; the trained adapter is well above it on held-out images.
    assert abs(m["frozen_lm_alone_accuracy"] - chance) < 0.1
    assert m["heldout_accuracy"] >= chance + 0.15
    # Colour is read from the image nearly perfectly after 600 steps (see README for the other kinds).
    assert m["heldout_accuracy_by_kind"]["colour"] >= 0.9
