"""Real-size parameter counts (meta device) against the paper's figures."""

from scripts import model_stats


def test_video_adapter_sizes_are_near_the_papers():
    video = model_stats.collect()["video"]
    assert video["11B"]["n_video_cross_attention_layers"] == 2
    assert video["90B"]["n_video_cross_attention_layers"] == 5
    for s in video.values():
        assert s["total"] == s["aggregator"] + s["video_cross_attention_layers"]
        assert 0.95 <= s["ratio_to_paper"] <= 1.1  # 0.6B and 4.6B; the README explains the 70B's 8%


def test_text_report_runs(capsys):
    assert model_stats.main([]) == 0
    out = capsys.readouterr().out
    assert "Video adapter" in out and "paper" in out


def test_speech_sizes_are_near_the_papers():
    sp = model_stats.collect()["speech"]
    assert 0.95e9 <= sp["conformer_1B"] <= 1.05e9  # "about 1B"
    assert 0.08e9 <= sp["adapter_8B"] <= 0.12e9  # "about 100M"
