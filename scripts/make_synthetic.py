"""The synthetic learning tasks as raw files for the shard builders, and the scorer of their held-out sets.

    python -m scripts.make_synthetic image-vqa|video-motion|spoken-digits OUT --n-train N --n-test M --seed S
        [--json]
    python -m scripts.make_synthetic score ANSWERS PREDICTIONS [--json]

Tasks: image-vqa (shapes: colour / shape / side / count questions, PNG), video-motion (which way the ball
moves, H.264 mp4), spoken-digits (3-5 digits spoken by espeak-ng, WAV; needs `apt-get install espeak-ng`).
Writes OUT/train/ (media + sidecar x.json {"caption", "question", "answer", "kind"}: the folder input of
scripts.build_shards / build_video_shards / build_audio_shards with configs/*curation_synthetic.yaml) and
OUT/test/ (media, questions.jsonl without answers, answers.jsonl). Spoken digits carry no question (the
model's ASR prompt asks) and kind "transcript". The same task, counts and seed give the same files; OUT/train
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
from typing import NoReturn

from synthetic.tasks import TASKS


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
            result = write_task(args.command, args.out, args.n_train, args.n_test, args.seed)
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
