"""scripts.bench_video runs end to end on a tiny clip and a tiny model and reports sane numbers."""

import json

import pytest

from scripts import bench_video
from tests.system_deps import require_binary


def test_bench_video_json_small(capsys):
    require_binary("ffmpeg")  # it writes the test clip
    assert bench_video.main(["--json", "--seconds", "2", "--height", "144", "--frames", "8", "--configs", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out)

    rd = out["reader"]
    clip = rd["clip"]
    assert (clip["width"], clip["height"], clip["n_frames"]) == (256, 144, 60)
    assert clip["duration_s"] == pytest.approx(2.0) and clip["fps"] == pytest.approx(30.0)
    assert rd["frames_requested"] == 8 and rd["goal_speedup"] == 5
    for key in ("baseline_pyav_decode_all", "decord", "pyav"):
        assert rd[key]["seconds"] > 0 and rd[key]["frames_returned"] == 8
    assert rd["baseline_pyav_decode_all"]["frames_decoded"] == 60
    assert rd["speedup"] > 0 and rd["pyav_speedup"] > 0 and isinstance(rd["goal_met"], bool)
    assert rd["check"]["indices_equal"] and rd["check"]["pyav_frames_equal_baseline"]

    ea = out["encoder_aggregator"]
    assert ea["frames"] == 8 and ea["torch_threads"] >= 1 and list(ea["configs"]) == ["tiny"]
    tiny = ea["configs"]["tiny"]
    assert tiny["seconds_per_clip"] > 0 and tiny["frames_per_s"] > 0
    assert all(n > 0 for n in tiny["params"].values())
    assert tiny["input_tiles_shape"] == [1, 1, 8, 1, 3, 56, 56]
    assert tiny["output_tokens_shape"][0] == 1 and tiny["chunks"] == 1


def test_bench_video_without_ffmpeg_fails_clearly(monkeypatch, capsys):
    monkeypatch.setattr(bench_video.shutil, "which", lambda name: None)
    assert bench_video.main(["--json", "--skip", "encoder"]) == 2
    assert "ffmpeg not found" in capsys.readouterr().err
