"""The image learning proof as the production road: every stage is an entry point's ``main(argv)``.

    run_image_road(work_dir, seed) -> metrics

Stages, in order (each timed), all under ``work_dir`` with the layout the checked-in synthetic configs name
(``out/synthetic/image-vqa`` for the data, ``runs/synthetic/<run>`` for the runs: with ``work_dir`` = the
repository root, ``python -m scripts.train --config configs/run_*_synthetic.yaml`` reruns any stage by hand):

1. ``make_synthetic``: ``image-vqa`` scenes as PNG + sidecars, the held-out questions and answer key, and
   ``tokenizer.model``;
2. ``build_shards`` with configs/curation_synthetic.yaml, every stage as checked in but dedup, which is
   off: it names the official SSCD TorchScript file, not available offline, and random SSCD weights can only
   tell exact copies (which the renderer never makes: every scene has its own tint and positions) at
   ~0.06 s a scene on 2 cores (288 px inputs), more than the rest of the road's curation together.
   tests/synthetic/test_curation.py runs the stage on this task with a tiny SSCD and a planted copy;
3. ``train`` text (run_text_synthetic: the tiny LM on the shards' question -> answer dialogs, never an
   image; frozen from here on), 4. ``train`` clip (run_clip_synthetic: the encoder on the scenes'
   captions), 5. ``train`` image (run_image_qa_synthetic: encoder + projector + cross-attention around the
   frozen LM, data.format qa), which exports;
6. ``demo_vqa`` batch mode answers the held-out questions with the export; 7. the scorer.
The frozen LM alone answers the same questions through ``demo_vqa`` too: the image kind's own factory
builds a fresh model around the frozen LM (zero-initialised gates: exactly the LM's logits, whatever the
image) and exports it untrained.
"""

from __future__ import annotations

import time
from pathlib import Path

from common.jsonl import read_jsonl
from scripts import build_shards, demo_vqa, make_synthetic
from scripts._road import (RoadError, Stage, export_untrained, offline_curation,
                           rooted_overrides, run_stage, shown_path, train_stage)
from synthetic.score import normalize_answer, read_rows, score
from synthetic.shapes import QUESTIONS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CURATION = CONFIGS / "curation_synthetic.yaml"
RUN_CONFIGS = {"text": CONFIGS / "run_text_synthetic.yaml", "clip": CONFIGS / "run_clip_synthetic.yaml",
               "image": CONFIGS / "run_image_qa_synthetic.yaml"}
DATA = Path("out/synthetic/image-vqa")  # make_synthetic's OUT, relative to the work dir
SHARDS = DATA / "shards"
IMAGE_RUN = Path("runs/synthetic/image_qa")  # run_image_qa_synthetic's run_dir: predictions land beside it
FROZEN_LM_RUN = Path("runs/synthetic/image_frozen_lm")  # the untrained image model's export and answers
N_EXAMPLES = 24  # held-out answers shown in the result
N_TRAIN, N_TEST = 2000, 60  # train scenes (one question each, kinds in turn); held-out scenes (every kind)


def answer(checkpoint: Path, questions: Path, out: Path) -> Stage:
    """demo_vqa's batch mode: greedy answers of ``checkpoint`` to every held-out question, into ``out``."""
    return run_stage("demo_vqa", demo_vqa.main, ["--checkpoint", str(checkpoint), "--questions", str(questions),
                                                 "--out", str(out), "--max-new-tokens", "6"])


def frozen_lm_alone(work: Path, seed: int, questions: Path) -> Path:
    """The image run's starting model (same factory, config and seed: the frozen LM with zero-gated, untrained
    cross-attention, so exactly the LM's logits whatever the image), exported and asked every question."""
    run = work / FROZEN_LM_RUN
    export = export_untrained(RUN_CONFIGS["image"], rooted_overrides(RUN_CONFIGS["image"], work, seed, False),
                              run / "export")
    answer(export, questions, run / "predictions.jsonl")
    return run / "predictions.jsonl"


def chance_accuracy(answers: Path) -> float:
    """Expected exact-match accuracy of a uniform guess among each question's candidate answers."""
    rows = read_rows(answers, ("answer", "kind")).values()
    return sum(1 / len(QUESTIONS[r["kind"]][1]) for r in rows) / len(rows)


def examples(questions: Path, answers: Path, predictions: Path, n: int) -> list[dict]:
    """The first ``n`` held-out questions: image path, question, answer, expected, right (as the scorer has it)."""
    want, got = read_rows(answers, ("answer",)), read_rows(predictions, ("answer",))
    rows = []
    for _, q in list(read_jsonl(questions, RoadError))[:n]:
        pred, expected = got[q["id"]]["answer"], want[q["id"]]["answer"]
        rows.append({"image": str(questions.parent / q["image"]), "question": q["question"], "answer": pred,
                     "expected": expected, "right": normalize_answer(pred) == normalize_answer(expected)})
    return rows


def summary(metrics: dict) -> str:
    """The shown held-out answers, right or wrong, then the accuracy beside chance and the frozen LM alone."""
    lines = [f"  {shown_path(e['image'])}  Q: {e['question']:32s} A: {e['answer']:8s} "
             f"{'right' if e['right'] else 'WRONG (' + e['expected'] + ')'}" for e in metrics["examples"]]
    kinds = ", ".join(f"{k} {a:.2f}" for k, a in metrics["heldout_accuracy_by_kind"].items())
    return "\n".join([
        f"held-out shape scenes (seed {metrics['seed']}, {metrics['heldout_questions']} questions): "
        "image, question, answer:",
        *lines,
        f"accuracy {metrics['heldout_accuracy']:.3f} ({kinds}); chance {metrics['chance_accuracy']:.3f}, "
        f"frozen LM alone {metrics['frozen_lm_alone_accuracy']:.3f}",
        f"checkpoint: {shown_path(metrics['export'])}"])


def run_image_road(work: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """Raw files -> shards -> text LM -> clip encoder -> image adapter -> export -> answers -> score.

    Returns accuracy overall and per kind, chance, the frozen LM alone's accuracy, the export and the
    seconds of each stage."""
    work = Path(work).resolve()
    data = work / DATA
    made = run_stage("make_synthetic", make_synthetic.main,
                     ["image-vqa", str(data), "--n-train", str(N_TRAIN), "--n-test", str(N_TEST), "--seed",
                      str(seed), "--json"])
    curation = offline_curation(CURATION, data / "curation_synthetic_offline.yaml")
    shards = run_stage("build_shards", build_shards.main, [str(data / "train"), str(work / SHARDS), "--config",
                                                           str(curation), "--json"])
    runs = {kind: train_stage(RUN_CONFIGS[kind], work, seed, progress) for kind in ("text", "clip", "image")}
    questions, answers = data / "test" / "questions.jsonl", data / "test" / "answers.jsonl"
    export = Path(runs["image"].summary["export"])
    preds = work / IMAGE_RUN / "predictions.jsonl"
    answered = answer(export, questions, preds)
    t0 = time.perf_counter()
    metrics = score(answers, preds)
    frozen = score(answers, frozen_lm_alone(work, seed, questions))
    seconds = {"make_synthetic": made.seconds, "build_shards": shards.seconds,
               **{f"train_{kind}": r.seconds for kind, r in runs.items()}, "answer": answered.seconds,
               "frozen_lm_alone_and_score": time.perf_counter() - t0}
    return {
        "heldout_accuracy": metrics["accuracy"],
        "heldout_accuracy_by_kind": {k: m["accuracy"] for k, m in metrics["by_kind"].items()},
        "chance_accuracy": chance_accuracy(answers),
        "frozen_lm_alone_accuracy": frozen["accuracy"],
        "heldout_questions": metrics["n"],
        "train_scenes": N_TRAIN,
        "shards_kept": shards.summary["counts"]["kept"],
        "final_loss": {kind: r.summary["last_loss"] for kind, r in runs.items()},
        "export": str(export),
        "questions": str(questions),
        "answers": str(answers),
        "predictions": str(preds),
        "examples": examples(questions, answers, preds, N_EXAMPLES),
        "seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)},
        "seed": seed,
    }
