"""Train the image adapter (Llama 3 sec. 7.4): stage 1 pre-training, stage 2 annealing.

    python -m scripts.train_image_adapter --config configs/train/image_stage1.yaml [--set train.steps=10]
    torchrun --nproc_per_node 8 -m scripts.train_image_adapter --config configs/train/image_stage1.yaml
    python -m scripts.train_image_adapter --config configs/train/image_stage2.yaml \\
        --set model.init_from=runs/image_stage1/export

Stage 1: image-caption shards at up to 4 x 336 px tiles; the frozen LM, trained encoder, projector and
cross-attention layers. Stage 2 starts from the stage-1 export at a higher per-tile resolution
(``model.tile_size``; the encoder's position tables are interpolated, see training/resolution.py).
Writes RUN_DIR/config.yaml, deepspeed.json, checkpoints/ (resumable), tensorboard/ and export/ (what
``python -m scripts.demo_vqa --checkpoint RUN_DIR/export`` loads); prints a JSON summary.
Exit code 2: a config, shard, tokenizer or checkpoint error (the message names the file and key).
"""

from __future__ import annotations

from scripts._train_cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, doc=__doc__, name="train_image_adapter", kind="image")


if __name__ == "__main__":
    raise SystemExit(main())
