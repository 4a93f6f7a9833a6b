"""The video road's wiring (scripts/learning_video.py): each run config reads what the previous stage writes,
rooted under the work dir. The road itself runs in tests/video/test_learning.py."""

from scripts import _road, learning_video


def test_the_run_configs_chain_the_road_stages(tmp_path):
    from training.config import load_run_config

    cfg = {kind: load_run_config(str(c), _road.rooted_overrides(c, tmp_path, 1, False))
           for kind, c in learning_video.RUN_CONFIGS.items()}
    data = tmp_path / learning_video.DATA
    assert cfg["text"].model.tokenizer == str(data / "tokenizer.model")
    frames = str(tmp_path / learning_video.FRAME_SHARDS / "shard_*.tar")
    assert cfg["clip"].data.shards == cfg["image"].data.shards == frames
    assert cfg["video"].data.shards == str(tmp_path / learning_video.SHARDS / "shard_*.tar")
    middles = str(tmp_path / learning_video.MIDDLE_FRAME_SHARDS / "shard_*.tar")
    assert cfg["image_only"].data.shards == f"{frames} {middles}"  # both globs rooted
    assert cfg["image_only"].model.encoder_from == cfg["image"].model.encoder_from
    assert cfg["image_only"].train.run_dir == str(tmp_path / learning_video.IMAGE_ONLY_RUN)
    text_export = f"{cfg['text'].train.run_dir}/export"
    assert cfg["image"].model.lm == cfg["video"].model.lm == text_export
    assert cfg["image"].model.encoder_from == f"{cfg['clip'].train.run_dir}/export"
    assert cfg["video"].model.init_from == f"{cfg['image'].train.run_dir}/export"
    assert cfg["video"].train.run_dir == str(tmp_path / learning_video.VIDEO_RUN)
    assert cfg["video"].model.num_frames == learning_video.FRAMES
    assert {c.data.format for k, c in cfg.items() if k != "clip"} == {"qa"}
