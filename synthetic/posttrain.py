"""The synthetic post-training sets (shapes scenes), raw files for the shard builders and held-out checks.

    write_posttrain("out/posttrain", n_sft=600, n_pref=600, n_test=100, seed=0)

writes
* ``OUT/sft/conversations.json`` + ``OUT/sft/images/``: conversations in the LLaVA layout
  (``{"id", "image": path or [paths], "conversations": [{"from": "human"|"gpt", "value"}]}``) that
  ``scripts.build_shards`` converts. Even records are two-image conversations: the first human turn shows two
  scenes (``<image><image>``: adjacent, so the text after them sees both) of different colours and shapes; the
  first question names one scene's colour and asks its shape ("What shape are the red ones?"), the follow-up
  names the other scene's shape and asks its colour ("And what colour are the circles?"), the scenes in random
  order: questions about two images at once, which a model trained on single images never saw (picking one of
  the two scenes at random: 1/2). Odd records are single-image conversations, two of the image-vqa task's
  questions about one scene: the skills the pre-trained model has, mixed in as the paper's SFT mix keeps its
  single-image sources, so that fine-tuning on the new skill does not wear the old ones down;
* ``OUT/preference/``: scenes with sidecars in the preference format (``conversations`` = the user turn
  ``<|image|>`` + a colour or shape question, ``chosen`` = the true attribute, ``rejected`` = another one:
  the paper's perturbed answers with a wrong attribute), a folder input of ``scripts.build_shards``;
* ``OUT/test/``: ``multi_image.jsonl`` (held-out conversations: ``{"id", "images", "conversation", "answer",
  "kind"}``, the follow-up with the first turn's true answer in its context), ``pairs.jsonl`` (held-out
  preference pairs ``{"id", "image", "question", "chosen", "rejected"}``, scripts.evaluate --task preference)
  and ``questions.jsonl`` / ``answers.jsonl`` (colour and shape questions about held-out scenes: the
  hallucination check, where a wrong answer naming another colour or shape is a hallucinated attribute).

Deterministic from the seed; train sets draw from ``3 * seed``, ``3 * seed + 1``, held-out ones from
``3 * seed + 2``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from synthetic.shapes import COLOURS, QUESTIONS, SHAPES, caption, render_scene
from synthetic.tasks import SyntheticTaskError

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES}  # the attributes a rejected answer gets wrong
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def shape_question(colour: str) -> str:
    return f"What shape are the {colour} ones?"


def colour_question(shape: str) -> str:
    return f"And what colour are the {PLURAL[shape]}?"


def texts() -> list[str]:
    """The strings of the post-training sets (beside the image-vqa task's)."""
    return [shape_question(c) for c in COLOURS] + [colour_question(s) for s in SHAPES]


def _pair(rng: random.Random) -> tuple[list, list[dict], list[str]]:
    """Two scenes of different colours and different shapes, in random order, and the conversation about them:
    the first question names one scene's colour and asks its shape, the follow-up names the other scene's shape
    and asks its colour. -> (images, user turns, answers)."""
    first, a = render_scene(rng)
    colour = rng.choice([c for c in COLOURS if c != a["colour"]])
    shape = rng.choice([s for s in SHAPES if s != a["shape"]])
    second, b = render_scene(rng, colour=colour, shape=shape)
    images = [first, second] if rng.random() < 0.5 else [second, first]
    asked, other = (a, b) if rng.random() < 0.5 else (b, a)
    return images, [shape_question(asked["colour"]), colour_question(other["shape"])], [asked["shape"], other["colour"]]


def _save_pair(images: list, i: int, out: Path) -> list[str]:
    """``out/images/NNNNN-0.png`` and ``-1.png``; their paths relative to ``out``."""
    paths = [f"images/{i:05d}-{j}.png" for j in range(len(images))]
    for img, path in zip(images, paths):
        img.save(out / path)
    return paths


def _single(rng: random.Random) -> tuple[list, list[str], list[str]]:
    """One scene and two different image-vqa questions about it -> (images, user turns, answers)."""
    img, facts = render_scene(rng)
    kinds = rng.sample(sorted(QUESTIONS), 2)
    return [img], [QUESTIONS[k][0] for k in kinds], [facts[k] for k in kinds]


def _write_conversations(n: int, seed: int, out: Path) -> None:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        images, questions, answers = _pair(rng) if i % 2 == 0 else _single(rng)
        paths = _save_pair(images, i, out)
        records.append({"id": f"{i:05d}", "image": paths if len(paths) > 1 else paths[0], "conversations": [
            {"from": "human", "value": "<image>" * len(paths) + questions[0]}, {"from": "gpt", "value": answers[0]},
            {"from": "human", "value": questions[1]}, {"from": "gpt", "value": answers[1]}]})
    (out / "conversations.json").write_text(json.dumps(records, indent=1))


def _preference(rng: random.Random, i: int) -> tuple:
    img, facts = render_scene(rng)
    kind = ("colour", "shape")[i % 2]
    wrong = rng.choice([v for v in ATTRIBUTES[kind] if v != facts[kind]])
    return img, facts, kind, QUESTIONS[kind][0], facts[kind], wrong


def _write_preference(n: int, seed: int, out: Path) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, facts, kind, question, chosen, rejected = _preference(rng, i)
        img.save(out / f"{i:05d}.png")
        sidecar = {"caption": caption(facts), "conversations": [{"role": "user", "content": f"<|image|>{question}"}],
                   "chosen": chosen, "rejected": rejected, "kind": kind}
        (out / f"{i:05d}.json").write_text(json.dumps(sidecar) + "\n")


def _rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_test(n: int, seed: int, out: Path) -> int:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    multi, pairs, questions, answers = [], [], [], []
    for i in range(n):
        images, asked, truth = _pair(rng)
        paths = _save_pair(images, i, out)
        first = {"role": "user", "content": f"<|image|><|image|>{asked[0]}"}
        multi.append({"id": f"{i:05d}-shape", "images": paths, "conversation": [first], "answer": truth[0],
                      "kind": "shape_of_colour"})
        follow = [first, {"role": "assistant", "content": truth[0]}, {"role": "user", "content": asked[1]}]
        multi.append({"id": f"{i:05d}-colour", "images": paths, "conversation": follow, "answer": truth[1],
                      "kind": "colour_of_shape"})
        img, facts, kind, question, chosen, rejected = _preference(rng, i)
        name = f"images/{i:05d}-single.png"
        img.save(out / name)
        pairs.append({"id": f"{i:05d}", "image": name, "question": question, "chosen": chosen, "rejected": rejected})
        for kind in ATTRIBUTES:
            questions.append({"id": f"{i:05d}-{kind}", "image": name, "question": QUESTIONS[kind][0], "kind": kind})
            answers.append({"id": f"{i:05d}-{kind}", "answer": facts[kind], "kind": kind})
    for name, rows in (("multi_image", multi), ("pairs", pairs), ("questions", questions), ("answers", answers)):
        _rows(out / f"{name}.jsonl", rows)
    return len(multi)


def write_posttrain(out: str | Path, n_sft: int, n_pref: int, n_test: int, seed: int) -> dict:
    """Write the sets under ``out`` (see the module docstring); returns their paths and counts. Bad counts or an
    ``out`` already holding a set: `SyntheticTaskError`, before anything is written."""
    out = Path(out)
    for name, value, low in (("n_sft", n_sft, 1), ("n_pref", n_pref, 1), ("n_test", n_test, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SyntheticTaskError(f"{name}: {value!r} is not a whole number >= {low}")
    for sub in ("sft", "preference", "test"):
        if (out / sub).exists() and any((out / sub).iterdir()):
            raise SyntheticTaskError(f"{out / sub} already exists and is not empty: remove it or choose another OUT")
    _write_conversations(n_sft, 3 * seed, out / "sft")
    _write_preference(n_pref, 3 * seed + 1, out / "preference")
    n_multi = _write_test(n_test, 3 * seed + 2, out / "test")
    return {"seed": seed, "sft": str(out / "sft" / "conversations.json"), "preference": str(out / "preference"),
            "multi_image": str(out / "test" / "multi_image.jsonl"), "pairs": str(out / "test" / "pairs.jsonl"),
            "questions": str(out / "test" / "questions.jsonl"), "answers": str(out / "test" / "answers.jsonl"),
            "n_sft": n_sft, "n_preference": n_pref, "n_multi_image": n_multi}
