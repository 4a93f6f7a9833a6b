"""Train the video adapter on top of a finished image model (Llama 3 sec. 7.5).

    python -m scripts.train_video_adapter --config configs/train/video.yaml \\
        --set model.init_from=runs/image_stage2/export [--set model.num_frames=16]
    torchrun --nproc_per_node 8 -m scripts.train_video_adapter --config configs/train/video.yaml

Video shards (key.mp4 + key.txt/json, from scripts.build_video_shards): ``model.num_frames`` frames sampled
uniformly per clip (pre-training: 16), each tiled as an image. The image export's encoder, projector and
image cross-attention layers are frozen; the temporal aggregator and video cross-attention layers (a block
before every 4th image block) train. Writes the same run directory as train_image_adapter; RUN_DIR/export
is what ``python -m scripts.demo_video --checkpoint`` loads. Exit code 2: a config, shard, tokenizer or
checkpoint error (the message names it).
"""

from __future__ import annotations

from scripts._train_cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, doc=__doc__, name="train_video_adapter", kind="video")


if __name__ == "__main__":
    raise SystemExit(main())
