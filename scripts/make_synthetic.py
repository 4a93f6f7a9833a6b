"""The synthetic learning tasks as raw files for the shard builders, and the scorer of their held-out sets.

    python -m scripts.make_synthetic image-vqa|video-motion|spoken-digits OUT --n-train N --n-test M --seed S
        [--json]
    python -m scripts.make_synthetic score ANSWERS PREDICTIONS [--json]

Tasks: image-vqa (shapes: colour / shape / side / count questions, PNG), video-motion (which way the ball
moves, H.264 mp4), spoken-digits (3-5 digits spoken by espeak-ng, WAV; needs `apt-get install espeak-ng`).
Writes OUT/train/ (media + sidecar x.json {"caption", "question", "answer", "kind"}: the folder input of
scripts.build_shards / build_video_shards / build_audio_shards with configs/*curation_synthetic.yaml),
OUT/test/ (media, questions.jsonl without answers, answers.jsonl) and OUT/tokenizer.model (a tiny byte-level
BPE in the Llama 3 tiktoken format, trained on the task's questions, answers and chat roles: the run
configs' model.tokenizer). video-motion also writes OUT/frames/ (stills of the train clips asked where the
ball is), OUT/middle_frames/ (their middle frames asked the direction, which one frame cannot tell) and
OUT/test/frames/ with frame_questions.jsonl / frame_answers.jsonl (first and last frames asked the place) and
middle_frame_questions.jsonl / middle_frame_answers.jsonl (middle frames asked the direction). Spoken digits carry no question (the
model's ASR prompt asks) and kind "transcript"; spoken-digits also writes OUT/lm/shard_*.tar, text-only ASR
dialogs (--n-lm-dialogs, synthetic/dialogs.py) for the tiny LM's pre-training (the trainer's text kind,
data.format dialog). The same task, counts and seed give the same files; OUT/train
and OUT/test must be new or empty. See synthetic/tasks.py.

score: predictions are JSONL rows {"id": ..., "answer": ...}, one per answer id; prints exact-match accuracy
overall, per kind and per expected answer (plus WER / CER for transcripts). See synthetic/score.py.

Exit code 2, with one line: bad arguments, OUT not empty, espeak-ng missing, or an answer / prediction file
that cannot be scored (a missing or unknown id is named).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from synthetic.tasks import TASKS

CHAT_TEXTS = ["system", "user", "assistant", "\n\n"]  # the role headers of every chat-format example


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"make_synthetic: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m scripts.make_synthetic", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*TASKS, "score"]) + "}")
    for task in TASKS:
        t = sub.add_parser(task, help=f"write the {task} task under OUT/train and OUT/test")
        t.add_argument("out", metavar="OUT")
        t.add_argument("--n-train", type=int, required=True, help="media files in OUT/train")
        t.add_argument("--n-test", type=int, required=True, help="media files in OUT/test")
        t.add_argument("--seed", type=int, required=True, help="same seed, same files")
        t.add_argument("--json", action="store_true", help="print only the summary JSON")
        if task == "spoken-digits":
            t.add_argument("--n-lm-dialogs", type=int, default=16000,
                           help="text-only ASR dialogs for the LM's pre-training, in OUT/lm (synthetic/dialogs.py)")
    s = sub.add_parser("score", help="score predictions against a held-out answer key")
    s.add_argument("answers", metavar="ANSWERS", help="OUT/test/answers.jsonl")
    s.add_argument("predictions", metavar="PREDICTIONS", help='JSONL rows {"id": ..., "answer": ...}')
    s.add_argument("--json", action="store_true", help="print only the metrics JSON")
    return p


def _summary(metrics: dict) -> str:
    lines = [f"{metrics['n']} questions: accuracy {metrics['accuracy']:.3f}"]
    for kind, m in metrics["by_kind"].items():
        extra = f", WER {m['wer']:.3f}, CER {m['cer']:.3f}" if "wer" in m else ""
        lines.append(f"  {kind}: {m['n']} questions, accuracy {m['accuracy']:.3f}{extra}")
    return "\n".join(lines)


def write_tokenizer(task: str, out: str) -> Path:
    """OUT/tokenizer.model, trained on the task's strings, the chat format's role names and (spoken digits)
    the ASR prompt the speech model is asked with."""
    from adapters.tokenizer import build_tiny_tokenizer

    texts = [*TASKS[task].texts(), *CHAT_TEXTS]
    if TASKS[task].media == "audio":
        from speech.adapter import asr_prompt

        texts.append(asr_prompt())
    build_tiny_tokenizer(out, texts)
    return Path(out) / "tokenizer.model"


def write_lm_dialogs(out: str, n: int, seed: int) -> dict:
    """OUT/lm: the spoken-digits LM's text-only ASR dialogs (the ``text`` kind's data.format dialog), the
    speech model's ASR prompt as their system turn."""
    from speech.adapter import asr_prompt
    from synthetic.dialogs import write_asr_dialogs

    return write_asr_dialogs(Path(out) / "lm", n, seed, asr_prompt())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from synthetic.digits import EspeakError
    from synthetic.score import ScoreError, score
    from synthetic.tasks import SyntheticTaskError, write_task

    try:
        if args.command == "score":
            result = score(args.answers, args.predictions)
            text = _summary(result)
        else:
            if args.command == "spoken-digits" and args.n_lm_dialogs < 1:  # checked before anything is written
                raise SyntheticTaskError(f"--n-lm-dialogs: {args.n_lm_dialogs} is not a whole number >= 1")
            result = write_task(args.command, args.out, args.n_train, args.n_test, args.seed)
            result["tokenizer"] = str(write_tokenizer(args.command, args.out))
            if args.command == "spoken-digits":
                result["lm_dialogs"] = write_lm_dialogs(args.out, args.n_lm_dialogs, args.seed)
            text = (f"{result['task']}: {result['train']} train files under {result['train_dir']}, "
                    f"{result['test']} held-out files ({result['test_questions']} questions) in "
                    f"{result['questions']}")
    except (SyntheticTaskError, EspeakError, ScoreError) as e:
        print(f"make_synthetic: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(text, file=sys.stderr)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
