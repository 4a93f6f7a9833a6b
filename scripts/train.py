"""Train any kind the run config names (``kind:`` image | video | speech | text | clip | bestrq,
`training.spec`).

    python -m scripts.train --config configs/run_text_synthetic.yaml [--set train.steps=10]
    python -m scripts.train --config configs/run_clip_synthetic.yaml
    python -m scripts.train --config configs/run_bestrq_synthetic.yaml
    torchrun --nproc_per_node 8 -m scripts.train --config configs/train/image_stage1.yaml

The same trainer, run directory and JSON summary as the per-kind scripts (train_image_adapter,
train_video_adapter, train_speech_adapter, which also check the config's kind). ``text`` pre-trains the
LM on dialogs (RUN_DIR/export: a Meta-layout LM + tokenizer.model, the other kinds' ``model.lm``);
``clip`` pre-trains the vision encoder contrastively (RUN_DIR/export: the image kind's
``model.encoder_from``); ``bestrq`` pre-trains the speech encoder self-supervised on audio shards
(RUN_DIR/export: the speech kind's ``model.encoder_from``). Exit code 2: a config, shard, tokenizer or
checkpoint error (the message names it).
"""

from __future__ import annotations

from scripts._train_cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, doc=__doc__, name="train", kind=None)


if __name__ == "__main__":
    raise SystemExit(main())
