"""The synthetic tasks as raw files: a train folder the shard builders curate and a held-out question set.

    write_task("image-vqa", "out/shapes", n_train=2000, n_test=100, seed=0)

writes
* ``OUT/train/``: media files (``00000.png`` / ``.mp4`` / ``.wav``), each with a sidecar ``00000.json``
  ``{"caption", "question", "answer", "kind", ...}`` (the caption: every fact of a shapes scene, "two red
  circles on the left", like alt text; the answer for the other tasks): the folder layout
  `data_curation.readers.read_folder` reads (its other fields land in the shard's ``key.json`` under
  ``meta``). One question per file: image-vqa cycles the question kinds over the scenes (balanced);
* ``OUT/test/``: the media files, ``questions.jsonl`` (``{"id", "image"|"video"|"audio": path relative to
  the file, "question", "kind"}``, no answers) and ``answers.jsonl`` (``{"id", "answer", "kind"}``, the key
  `synthetic.score` reads). image-vqa asks every question kind about each held-out scene.
* video-motion also writes stills (`write_stills`): ``OUT/frames/`` (first, middle and last frame of each
  train clip, asked where the ball is: the image stages' folder input), ``OUT/middle_frames/`` (middle frames
  asked the direction: the image-only baseline's) and ``OUT/test/frames/`` with ``frame_questions.jsonl`` /
  ``frame_answers.jsonl`` (held-out first and last frames asked where the ball is) and
  ``middle_frame_questions.jsonl`` / ``middle_frame_answers.jsonl`` (middle frames asked the direction).

Spoken digits have no question: the speech model's own ASR prompt asks for the transcript, so the sidecars
and question rows carry none, and their kind is ``"transcript"`` (scored by WER / CER).

Deterministic: the same task, counts and seed give the same files. The train and test renderers draw from
``2 * seed`` and ``2 * seed + 1``, so no seed's held-out set is another seed's train set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from synthetic.digits import DIGITS
from synthetic.motion import POSITION_QUESTION
from synthetic.motion import QUESTION as MOTION_QUESTION
from synthetic.motion import make_motion_clips, motion_corpus_text
from synthetic.shapes import QUESTIONS, caption, corpus_text, render_scene

TRANSCRIPT_KIND = "transcript"  # the kind of a spoken-digit answer (WER / CER in `synthetic.score`)


class SyntheticTaskError(ValueError):
    """Arguments a task cannot be written with (unknown task, bad count or seed, OUT already used)."""


@dataclass(frozen=True)
class QA:
    question: str | None  # None: the model's own prompt asks (spoken digits)
    answer: str
    kind: str


@dataclass(frozen=True)
class Item:
    """One rendered media file (already written) and what is asked about it."""

    file: str  # name inside the split's folder: "00000.png"
    qas: tuple[QA, ...]  # train: exactly one (the sidecar holds one question); held out: one or more
    meta: dict = field(default_factory=dict)  # further sidecar fields (spoken digits: voice, speed, pitch)
    caption: str | None = None  # the sidecar's caption (alt text); None: the answer


def render_shapes(n: int, seed: int, out: Path, held_out: bool) -> list[Item]:
    """Shape scenes as PNG; train scenes get one question (kinds in turn), held-out scenes all of them."""
    rng = random.Random(seed)
    kinds = tuple(QUESTIONS)
    items = []
    for i in range(n):
        img, facts = render_scene(rng)
        name = f"{i:05d}.png"
        img.save(out / name)
        asked = kinds if held_out else (kinds[i % len(kinds)],)
        # The caption states every fact ("two red circles on the left"), like alt text: the clip kind
        # pre-trains the encoder on it; the question kind asked about the scene is only one of them.
        qas = tuple(QA(QUESTIONS[k][0], facts[k], k) for k in asked)
        items.append(Item(name, qas, caption=caption(facts)))
    return items


def render_motion(n: int, seed: int, out: Path, held_out: bool) -> list[Item]:
    """Moving-ball clips as H.264 mp4, asked which way the ball moves (directions balanced), and stills of
    them as PNG for the image stages (`write_stills`)."""
    items, clips = [], make_motion_clips(n, seed)
    for i, clip in enumerate(clips):
        name = f"{i:05d}.mp4"
        (out / name).write_bytes(clip.video)
        qa = QA(MOTION_QUESTION, clip.direction, "direction")
        items.append(Item(name, (qa,), {"frames": clip.n_frames}))
    write_stills(clips, out, held_out)
    return items


def write_stills(clips: list, out: Path, held_out: bool) -> None:
    """The clips' frames as images: what the video road's image stages learn from and are asked about.

    A path's centre always lies in the middle cell of the 3 x 3 grid, so a clip's middle frame shows the ball
    there ("middle centre") whatever the direction; its first and last frames show where the path starts and
    ends. Train stills, beside ``OUT/train`` (each its own folder input for scripts.build_shards):

    * ``OUT/frames/``: the first, middle and last frame of every clip, ``00000-f08.png``, each with a sidecar
      captioning and asking where the ball is ("a white ball at the top left"; "Where is the ball?" ->
      "top left"): answerable from one frame, so the encoder and the image adapter learn the ball's place;
    * ``OUT/middle_frames/``: every clip's middle frame asked which way the ball moves (the clip's answer):
      the image-only baseline's training set, a question one frame cannot answer.

    Held out (``OUT/test/frames/``, the same three frames of each clip): ``frame_questions.jsonl`` /
    ``frame_answers.jsonl`` ask the first and last frames where the ball is (the image model's check), and
    ``middle_frame_questions.jsonl`` / ``middle_frame_answers.jsonl`` ask the middle frame which way the ball
    moves, under the clip's own question id (the image-only model's view: chance 1/4).
    """
    if not held_out:
        frames_dir, middle_dir = _fresh_dir(out.parent / "frames"), _fresh_dir(out.parent / "middle_frames")
        for i, clip in enumerate(clips):
            for t in sorted(clip.stills):
                name = f"{i:05d}-f{t:02d}.png"
                Image.fromarray(clip.stills[t]).save(frames_dir / name)
                position = QA(POSITION_QUESTION, clip.place(t), "position")
                _still_sidecar(frames_dir / name, clip.frame_caption(t), position, i, t)
            name = f"{i:05d}-f{clip.middle:02d}.png"
            Image.fromarray(clip.stills[clip.middle]).save(middle_dir / name)
            _still_sidecar(middle_dir / name, clip.direction, QA(MOTION_QUESTION, clip.direction, "direction"), i,
                     clip.middle)
        return
    frames_dir = _fresh_dir(out / "frames")
    sets: dict[str, tuple[list, list]] = {"frame": ([], []), "middle_frame": ([], [])}
    for i, clip in enumerate(clips):
        for t in sorted(clip.stills):
            name = f"{i:05d}-f{t:02d}.png"
            Image.fromarray(clip.stills[t]).save(frames_dir / name)
            if t == clip.middle:  # the clip's own id: one answer key row scores the clip and its middle frame
                qa, qid = QA(MOTION_QUESTION, clip.direction, "direction"), f"{i:05d}-direction"
            else:
                qa, qid = QA(POSITION_QUESTION, clip.place(t), "position"), f"{i:05d}-f{t:02d}-position"
            rows = sets["middle_frame" if t == clip.middle else "frame"]
            rows[0].append({"id": qid, "image": f"frames/{name}", "question": qa.question, "kind": qa.kind})
            rows[1].append({"id": qid, "answer": qa.answer, "kind": qa.kind})
    for prefix, (questions, answers) in sets.items():
        for file, rows in ((f"{prefix}_questions.jsonl", questions), (f"{prefix}_answers.jsonl", answers)):
            (out / file).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _still_sidecar(png: Path, caption: str, qa: "QA", clip: int, frame: int) -> None:
    sidecar = {"caption": caption, "question": qa.question, "answer": qa.answer, "kind": qa.kind,
               "clip": f"{clip:05d}.mp4", "frame": frame}
    png.with_suffix(".json").write_text(json.dumps(sidecar) + "\n")


def render_digits(n: int, seed: int, out: Path, held_out: bool) -> list[Item]:
    """espeak-ng's wavs (22.05 kHz, as rendered) of 3-5 spoken digits; the transcript is the answer."""
    from synthetic.digits import synthesize_digits  # needs espeak-ng: only this task asks for it

    utts = synthesize_digits(n, seed, out_dir=out)
    return [Item(f"{i:05d}.wav", (QA(None, u.text, TRANSCRIPT_KIND),),
                 {"voice": u.voice, "speed": u.speed, "pitch": u.pitch}) for i, u in enumerate(utts)]


@dataclass(frozen=True)
class Task:
    media: str  # the questions.jsonl key naming the file: image | video | audio
    render: Callable[[int, int, Path, bool], list[Item]]
    texts: Callable[[], list[str]]  # the task's questions and answers: what its tiny tokenizer is trained on


TASKS = {
    "image-vqa": Task("image", render_shapes, corpus_text),
    "video-motion": Task("video", render_motion, motion_corpus_text),
    "spoken-digits": Task("audio", render_digits, lambda: [" ".join(DIGITS), *DIGITS]),
}


def _fresh_dir(path: Path) -> Path:
    # Files left by an earlier run with other counts would be curated with these: refuse, never mix.
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SyntheticTaskError(f"{path} already exists and is not empty: remove it or choose another OUT")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sidecar(item: Item) -> dict:
    (qa,) = item.qas
    question = {} if qa.question is None else {"question": qa.question}
    text = qa.answer if item.caption is None else item.caption
    return {"caption": text, **question, "answer": qa.answer, "kind": qa.kind, **item.meta}


def _write_train(items: list[Item], out: Path) -> None:
    for item in items:
        (out / item.file).with_suffix(".json").write_text(json.dumps(_sidecar(item)) + "\n")


def _write_held_out(items: list[Item], out: Path, media: str) -> int:
    """``questions.jsonl`` and ``answers.jsonl`` with one row per (file, question); returns the row count."""
    n = 0
    with open(out / "questions.jsonl", "w") as q, open(out / "answers.jsonl", "w") as a:
        for item in items:
            for qa in item.qas:
                qid = f"{Path(item.file).stem}-{qa.kind}"
                row = {"id": qid, media: item.file, "kind": qa.kind}
                q.write(json.dumps(row if qa.question is None else {**row, "question": qa.question}) + "\n")
                a.write(json.dumps({"id": qid, "answer": qa.answer, "kind": qa.kind}) + "\n")
                n += 1
    return n


def write_task(task: str, out: str | Path, n_train: int, n_test: int, seed: int) -> dict:
    """Render ``task`` into ``out/train`` (media + sidecars) and ``out/test`` (media + questions + answers).
    Returns a summary: task, seed, counts and paths. Raises `SyntheticTaskError` on bad arguments, before
    anything is written (spoken digits: `synthetic.digits.EspeakError` without espeak-ng)."""
    if task not in TASKS:
        raise SyntheticTaskError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SyntheticTaskError(f"{name}: {value!r} is not a whole number >= {low}")
    out = Path(out)
    train_dir, test_dir = _fresh_dir(out / "train"), _fresh_dir(out / "test")
    spec = TASKS[task]
    _write_train(spec.render(n_train, 2 * seed, train_dir, False), train_dir)
    n_questions = _write_held_out(spec.render(n_test, 2 * seed + 1, test_dir, True), test_dir, spec.media)
    return {"task": task, "seed": seed, "train": n_train, "test": n_test, "test_questions": n_questions,
            "train_dir": str(train_dir), "questions": str(test_dir / "questions.jsonl"),
            "answers": str(test_dir / "answers.jsonl")}
