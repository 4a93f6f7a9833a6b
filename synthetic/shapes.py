"""A rendered visual-question-answering set (shapes, colours, positions, counts) for CPU learning checks.

Every answer is one word from a small closed set per question kind, so chance accuracy is known and a
frozen LM that cannot see the image is at chance. Images are drawn with PIL from a seeded RNG: the
same seed gives the same set, different seeds give disjoint held-out scenes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
COUNTS = ("one", "two", "three")

QUESTIONS = {
    "colour": ("What colour are the shapes?", tuple(COLOURS)),
    "shape": ("What shape are they?", SHAPES),
    "side": ("Which side are the shapes on?", SIDES),
    "count": ("How many shapes are there?", COUNTS),
}


@dataclass
class VQARecord:
    image: Image.Image
    question: str
    answer: str
    kind: str
    candidates: tuple[str, ...]
    image_path: str | None = None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render_scene(rng: random.Random, width: int = 56, height: int = 56, colour: str | None = None,
                 shape: str | None = None) -> tuple[Image.Image, dict[str, str]]:
    """1-3 shapes of one kind and colour, all in the left or right half, on a light noisy background.
    ``colour`` / ``shape`` fix those facts (drawn from ``rng`` otherwise)."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    side = rng.choice(SIDES)
    count = rng.randint(1, 3)
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    # As large as fits: three shapes stacked in bands within one half of the image.
    size = max(6, min(width // 2 - 6, (height - 4) // 3 - 1))
    x_lo = 2 if side == "left" else width // 2 + 2
    x_hi = width // 2 - size - 2 if side == "left" else width - size - 2
    # Shapes sit in separate horizontal bands so they never overlap (count stays visible).
    band = (height - 4) // count
    for i in range(count):
        x = rng.randint(x_lo, x_hi)
        y = 2 + i * band + rng.randint(0, max(0, band - size))
        _draw_shape(draw, shape, (x, y, x + size, y + size), COLOURS[colour])
    facts = {"colour": colour, "shape": shape, "side": side, "count": COUNTS[count - 1]}
    return img, facts


def make_vqa_set(n_images: int, seed: int, kinds: tuple[str, ...] = tuple(QUESTIONS), size: int = 56) -> list[VQARecord]:
    """``n_images`` scenes, one record per (scene, question kind)."""
    unknown = set(kinds) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; choose from {sorted(QUESTIONS)}")
    rng = random.Random(seed)
    records = []
    for _ in range(n_images):
        img, facts = render_scene(rng, size, size)
        for kind in kinds:
            question, candidates = QUESTIONS[kind]
            records.append(VQARecord(img, question, facts[kind], kind, candidates))
    return records


def caption(facts: dict[str, str]) -> str:
    """An alt-text-like caption with every fact, e.g. "two red circles on the left"."""
    noun = facts["shape"] + ("" if facts["count"] == "one" else "s")
    return f"{facts['count']} {facts['colour']} {noun} on the {facts['side']}"


def make_caption_set(n_images: int, seed: int, size: int = 56) -> tuple[list[Image.Image], list[str]]:
    """``n_images`` scenes with captions: the image-text pairs the encoder is pre-trained on."""
    rng = random.Random(seed)
    pairs = [render_scene(rng, size, size) for _ in range(n_images)]
    return [img for img, _ in pairs], [caption(facts) for _, facts in pairs]


def chance_accuracy(records: list[VQARecord]) -> float:
    return sum(1 / len(r.candidates) for r in records) / max(1, len(records))


def corpus_text() -> list[str]:
    """Every question and answer string, for training the tiny BPE the test/demo LM uses."""
    texts = [q for q, _ in QUESTIONS.values()]
    texts += [a for _, cands in QUESTIONS.values() for a in cands]
    return texts + ["user", "assistant", "system", "\n\n"]


def save_vqa_set(records: list[VQARecord], out_dir: str | Path) -> Path:
    """Write images as PNG plus ``records.jsonl`` (image path, question, answer, kind, candidates)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[int, str] = {}
    with open(out / "records.jsonl", "w") as f:
        for r in records:
            if id(r.image) not in paths:
                p = out / "images" / f"{len(paths):05d}.png"
                r.image.save(p)
                paths[id(r.image)] = str(p)
            r.image_path = paths[id(r.image)]
            row = {"image_path": r.image_path, "question": r.question, "answer": r.answer, "kind": r.kind,
                   "candidates": list(r.candidates)}
            f.write(json.dumps(row) + "\n")
    return out / "records.jsonl"
