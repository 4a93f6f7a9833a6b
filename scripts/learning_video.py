"""The video learning proof as the production road: every stage is an entry point's ``main(argv)``.

    run_video_road(work_dir, seed) -> metrics

Stages, in order (each timed), under ``work_dir`` with the layout the checked-in synthetic configs name
(``out/synthetic/video-motion`` for the data, ``runs/synthetic/video_*`` for the runs; with ``work_dir`` = the
repository root, ``python -m scripts.train --config configs/run_*_synthetic.yaml`` reruns any stage by hand):

1. ``make_synthetic video-motion``: moving-ball clips as H.264 mp4 asked which way the ball moves, stills of
   them (first, middle, last frame) asked where the ball is, the middle frames asked the direction, the
   held-out clips and their stills, the answer keys and ``tokenizer.model``;
2. ``build_video_shards`` of the clips with configs/video_curation_synthetic.yaml (decoding and the motion
   score on: a clip that does not decode or does not move is dropped);
3. ``build_shards`` of the stills and of the middle frames with configs/curation_synthetic.yaml, dedup off
   (`scripts._road.offline_curation`);
4. ``train`` text (run_text_video_synthetic: the tiny LM on every shard set's question -> answer dialogs, never
   a pixel; frozen from here on), 5. clip (run_clip_video_synthetic: the encoder on the stills' captions),
   6. image (run_image_frames_synthetic: where is the ball, from one still), 7. video
   (run_video_qa_synthetic: the video adapter on top of the image export, which way the ball moves),
   8. image_only (run_image_only_frames_synthetic: the image recipe on the stills and the middle frames asked
   the direction: the image-only baseline);
9. ``demo_video`` batch mode answers the held-out clips with the video export; ``demo_vqa`` batch mode asks
   the image export where the ball is in held-out first and last frames, and the image-only export which
   way it moves from each held-out middle frame (one frame cannot tell: chance 1/4); the frozen LM alone
   answers through ``demo_video`` too: the video kind's factory around the image export adds a zero-gated
   video adapter, exactly the LM's logits whatever the clip, exported untrained; 10. the scorer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scripts import build_shards, build_video_shards, demo_video, demo_vqa, make_synthetic
from scripts._road import (Stage, export_untrained, offline_curation,
                           rooted_overrides, run_stage, shown_path, train_stage)
from synthetic.motion import DIRECTIONS
from synthetic.score import normalize_answer, score

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = {"text": CONFIGS / "run_text_video_synthetic.yaml", "clip": CONFIGS / "run_clip_video_synthetic.yaml",
               "image": CONFIGS / "run_image_frames_synthetic.yaml", "video": CONFIGS / "run_video_qa_synthetic.yaml",
               "image_only": CONFIGS / "run_image_only_frames_synthetic.yaml"}
DATA = Path("out/synthetic/video-motion")  # make_synthetic's OUT, relative to the work dir
# the run configs' data.shards folders: clips, stills asked the place, middle frames asked the direction
SHARDS, FRAME_SHARDS, MIDDLE_FRAME_SHARDS = DATA / "shards", DATA / "frame_shards", DATA / "middle_frame_shards"
VIDEO_RUN = Path("runs/synthetic/video_qa")
IMAGE_RUN = Path("runs/synthetic/video_image")
IMAGE_ONLY_RUN = Path("runs/synthetic/video_image_only")
FROZEN_LM_RUN = Path("runs/synthetic/video_frozen_lm")
N_TRAIN, N_TEST = 1600, 200  # train clips (3 stills each), held-out clips
FRAMES = 8  # frames per clip, as run_video_qa_synthetic's model.num_frames
N_EXAMPLES = 12


def answer_clips(checkpoint: Path, questions: Path, out: Path) -> Stage:
    return run_stage("demo_video", demo_video.main, ["--checkpoint", str(checkpoint), "--questions", str(questions),
                                                     "--out", str(out), "--frames", str(FRAMES),
                                                     "--max-new-tokens", "4"])


def answer_stills(checkpoint: Path, questions: Path, out: Path) -> Stage:
    return run_stage("demo_vqa", demo_vqa.main, ["--checkpoint", str(checkpoint), "--questions", str(questions),
                                                 "--out", str(out), "--max-new-tokens", "4"])


def frozen_lm_alone(work: Path, seed: int, questions: Path) -> Path:
    """The video run's starting model (same factory, config and seed: the image export plus a zero-gated,
    untrained video adapter; a clip reaches no image layer), exported and asked every held-out question."""
    config = RUN_CONFIGS["video"]
    run = work / FROZEN_LM_RUN
    export = export_untrained(config, rooted_overrides(config, work, seed, False), run / "export")
    answer_clips(export, questions, run / "predictions.jsonl")
    return run / "predictions.jsonl"


def examples(questions: Path, answers: Path, predictions: Path, n: int) -> list[dict]:
    """The first ``n`` held-out clips: video path, answer, expected, right."""
    rows = [json.loads(line) for line in questions.read_text().splitlines()[:n]]
    want = {r["id"]: r["answer"] for r in map(json.loads, answers.read_text().splitlines())}
    got = {r["id"]: r["answer"] for r in map(json.loads, predictions.read_text().splitlines())}
    return [{"video": str(questions.parent / q["video"]), "question": q["question"], "answer": got[q["id"]],
             "expected": want[q["id"]], "right": normalize_answer(got[q["id"]]) == normalize_answer(want[q["id"]])}
            for q in rows]


def summary(metrics: dict) -> str:
    lines = [f"  {shown_path(e['video'])}  A: {e['answer']:6s} "
             f"{'right' if e['right'] else 'WRONG (' + e['expected'] + ')'}"
             for e in metrics["examples"]]
    dirs = ", ".join(f"{k} {a:.2f}" for k, a in metrics["heldout_accuracy_by_direction"].items())
    return "\n".join([
        f"held-out moving-ball clips (seed {metrics['seed']}, {metrics['heldout_questions']} clips, "
        f"{FRAMES} frames each): \"Which way does the ball move?\"",
        *lines,
        f"accuracy {metrics['heldout_accuracy']:.3f} ({dirs}); chance {metrics['chance_accuracy']:.3f}, "
        f"image-only model on the middle frame {metrics['image_only_accuracy']:.3f}, "
        f"frozen LM alone {metrics['frozen_lm_alone_accuracy']:.3f}; the image model on first and last frames, "
        f"where is the ball: {metrics['image_model_position_accuracy']:.3f}",
        f"checkpoint: {shown_path(metrics['export'])}"])


def run_video_road(work: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """Raw clips -> shards -> text LM -> clip encoder -> image adapter -> video adapter -> answers -> score.

    Returns accuracy overall and per direction, chance, the image-only model's and the frozen LM alone's
    accuracy, the export and the seconds of each stage."""
    work = Path(work).resolve()
    data = work / DATA
    made = run_stage("make_synthetic", make_synthetic.main,
                     ["video-motion", str(data), "--n-train", str(N_TRAIN), "--n-test", str(N_TEST), "--seed",
                      str(seed), "--json"])
    clips = run_stage("build_video_shards", build_video_shards.main,
                      [str(data / "train"), str(work / SHARDS), "--config",
                       str(CONFIGS / "video_curation_synthetic.yaml"), "--json"])
    curation = offline_curation(CONFIGS / "curation_synthetic.yaml", data / "curation_synthetic_offline.yaml")
    stills = {folder: run_stage("build_shards", build_shards.main, [str(data / folder), str(work / shards),
                                                                    "--config", str(curation), "--json"])
              for folder, shards in (("frames", FRAME_SHARDS), ("middle_frames", MIDDLE_FRAME_SHARDS))}
    runs = {kind: train_stage(config, work, seed, progress) for kind, config in RUN_CONFIGS.items()}
    test = data / "test"
    answers = test / "answers.jsonl"
    export = Path(runs["video"].summary["export"])
    preds = work / VIDEO_RUN / "predictions.jsonl"
    answered = answer_clips(export, test / "questions.jsonl", preds)
    t0 = time.perf_counter()
    # the image model the video adapter builds on, asked where the ball is in held-out first and last frames
    position_preds = work / IMAGE_RUN / "predictions_frames.jsonl"
    answer_stills(Path(runs["image"].summary["export"]), test / "frame_questions.jsonl", position_preds)
    # the image-only baseline, asked which way the ball moves about held-out middle frames
    image_only_preds = work / IMAGE_ONLY_RUN / "predictions_middle_frames.jsonl"
    answer_stills(Path(runs["image_only"].summary["export"]), test / "middle_frame_questions.jsonl",
                  image_only_preds)
    metrics = score(answers, preds)
    position = score(test / "frame_answers.jsonl", position_preds)
    image_only = score(test / "middle_frame_answers.jsonl", image_only_preds)
    frozen = score(answers, frozen_lm_alone(work, seed, test / "questions.jsonl"))
    seconds = {"make_synthetic": made.seconds, "build_video_shards": clips.seconds,
               "build_shards": sum(s.seconds for s in stills.values()),
               **{f"train_{kind}": r.seconds for kind, r in runs.items()}, "answer": answered.seconds,
               "baselines_and_score": time.perf_counter() - t0}
    by_answer = metrics["by_kind"]["direction"]["by_answer"]
    return {
        "heldout_accuracy": metrics["accuracy"],
        "heldout_accuracy_by_direction": {d: by_answer[d]["accuracy"] for d in sorted(by_answer)},
        "chance_accuracy": 1 / len(DIRECTIONS),
        "image_only_accuracy": image_only["accuracy"],
        "image_model_position_accuracy": position["accuracy"],
        "frozen_lm_alone_accuracy": frozen["accuracy"],
        "heldout_questions": metrics["n"],
        "train_clips": N_TRAIN,
        "frames_per_clip": FRAMES,
        "shards_kept": {"clips": clips.summary["counts"]["kept"],
                        **{folder: s.summary["counts"]["kept"] for folder, s in stills.items()}},
        "final_loss": {kind: r.summary["last_loss"] for kind, r in runs.items()},
        "export": str(export),
        "predictions": str(preds),
        "examples": examples(test / "questions.jsonl", answers, preds, N_EXAMPLES),
        "seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)},
        "seed": seed,
    }
