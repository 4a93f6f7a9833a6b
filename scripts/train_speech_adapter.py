"""Train the speech encoder + adapter in front of the frozen LM (Llama 3 sec. 8).

    python -m scripts.train_speech_adapter --config configs/train/speech.yaml [--set train.steps=10]
    torchrun --nproc_per_node 8 -m scripts.train_speech_adapter --config configs/train/speech.yaml

Audio shards (key.flac + key.txt, from scripts.build_audio_shards) become ASR examples: the ``data.prompt``
system turn (default: the English ASR prompt), the clip as <|audio|> embeddings spliced into the LM input,
the transcript as the answer. ``model.init_from`` starts from a speech export (`speech.model_io`);
``model.encoder_from`` puts a BEST-RQ pre-trained encoder (the ``bestrq`` kind's export, `speech.pretrain`)
under a fresh adapter. RUN_DIR/export is a `speech.model_io` checkpoint (scripts.demo_asr, scripts.eval_asr).
Exit code 2: a config, shard, tokenizer or checkpoint error.
"""

from __future__ import annotations

from scripts._train_cli import train_main


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, doc=__doc__, name="train_speech_adapter", kind="speech")


if __name__ == "__main__":
    raise SystemExit(main())
