"""Rendered charts, tables and equations with their source as the target and question-answer pairs over them
(Llama 3 sec. 7.1's synthetic structured content), for the annealing builder and a held-out question set.

    chart = render_chart("bar", seed=0, index=7)   # .png (bytes), .target (markdown), .qas, .data
    write_chart_questions("out/test", n=100, seed=0)

Kinds: ``bar``, ``line``, ``pie`` (random labels A..H and integer values; the target is the data as a markdown
table), ``table`` (a small random frame drawn with matplotlib's table; the target is the table as markdown) and
``equation`` (LaTeX from templates, or a caller's line, drawn by matplotlib's mathtext; the target is the
LaTeX). Every question is answered exactly by the data: values are integers on a grid of integer ticks (pie
shares are printed on the slices), the values of one chart are distinct so extrema and comparisons have one
answer, and each templated equation holds exactly one lower-case Greek letter.

Deterministic: sample ``index`` of ``seed`` draws from its own ``random.Random`` (so it is the same whatever the
number of samples), and the PNG bytes come from Agg with fixed rcParams and PIL's fixed PNG settings. Held-out
charts (`write_chart_questions`) draw from another stream than the builder's, so they are never training
samples. LaTeX that mathtext cannot parse is a `ChartError` carrying the parser's reason.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("bar", "line", "pie", "table", "equation")
LABELS = tuple("ABCDEFGH")
WORDS = ("tea", "gold", "rain", "maps", "jazz", "oak", "salt", "wind", "rice", "iron")
GREEK = ("alpha", "beta", "gamma", "delta", "theta", "lambda", "mu", "phi", "omega")  # no sigma / pi: \sum, \prod
VARIABLES = ("x", "y", "z", "t", "n")
VMAX = 9  # bar and line values are integers 1..VMAX on a grid of integer ticks: read exactly off the axis
PX, DPI = 256, 80  # 256 x 256 px images
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
# Fixed so that the same sample gives the same bytes (no style, locale or font lookup differs between runs).
RC = {"font.family": "DejaVu Sans", "font.size": 9, "mathtext.fontset": "dejavusans", "svg.hashsalt": "charts",
      "axes.unicode_minus": False, "path.simplify": False, "figure.dpi": DPI, "savefig.dpi": DPI}

PROMPTS = {
    "bar": "Give the data of this chart as a markdown table.",
    "line": "Give the data of this chart as a markdown table.",
    "pie": "Give the data of this chart as a markdown table.",
    "table": "Give this table as markdown.",
    "equation": "Write this equation in LaTeX.",
}
# Templates with one Greek letter {g}, a variable {v} and small integers {a}, {b} (LaTeX braces doubled).
EQUATIONS = (
    r"\frac{{{a}}}{{{b}}} + \{g}^{{2}}",
    r"\sum_{{i=1}}^{{{a}}} \{g}_{{i}} {v}^{{i}}",
    r"\int_{{0}}^{{{a}}} \{g} {v}^{{{b}}} \, d{v}",
    r"\sqrt{{{v}^{{2}} + \{g}}}",
    r"\{g} = \frac{{{a}{v}}}{{\sqrt{{{b} + {v}^{{2}}}}}}",
    r"\prod_{{k=1}}^{{{a}}} (1 + \{g}_{{k}})",
    r"{v}^{{{a}}} - {b}{v} = \{g}",
)


class ChartError(ValueError):
    """A sample that cannot be rendered: LaTeX mathtext cannot parse (the reason is the parser's, on one line)."""


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # value | compare | extrema | cell | symbol


@dataclass(frozen=True)
class Chart:
    kind: str
    png: bytes
    target: str  # the data / the table as markdown, the equation as LaTeX
    qas: tuple[QA, ...]
    data: dict  # what it was drawn from: labels + values, header + rows, or latex

    def conversation(self) -> list[dict[str, str]]:
        """The trainer's conversation: the image and the kind's prompt -> the target, then each QA as a turn."""
        turns = [{"role": "user", "content": f"<|image|>{PROMPTS[self.kind]}"},
                 {"role": "assistant", "content": self.target}]
        for qa in self.qas:
            turns += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
        return turns


# -------------------------------------------------------------------------------------------- markdown


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = [header, ["---"] * len(header), *[[str(c) for c in r] for r in rows]]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """``markdown_table``'s inverse -> (header, rows) as strings; a line that is not a table row: ValueError."""
    cells = []
    for line in text.strip().splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            raise ValueError(f"not a markdown table row: {line!r}")
        cells.append([c.strip() for c in line[1:-1].split("|")])
    if len(cells) < 2 or not all(re.fullmatch(r":?-+:?", c) for c in cells[1]):
        raise ValueError("a markdown table needs a header and a --- separator line")
    return cells[0], cells[2:]


# ------------------------------------------------------------------------------------------- rendering


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PX / DPI, PX / DPI), dpi=DPI)  # no pyplot: no global figure state between samples
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # PIL writes no time chunk: same pixels, same bytes
    return buf.getvalue()


def _series(rng: random.Random, lo: int, hi: int) -> tuple[list[str], list[int]]:
    """Labels A.. and distinct integer values 1..VMAX (one tallest, one shortest, no ties to compare)."""
    k = rng.randint(lo, hi)
    labels = list(LABELS[:k]) if rng.random() < 0.5 else sorted(rng.sample(LABELS, k))
    return labels, rng.sample(range(1, VMAX + 1), k)


def _pie_shares(rng: random.Random) -> tuple[list[str], list[int]]:
    """3-5 distinct shares, multiples of 5 percent summing to 100."""
    k = rng.randint(3, 5)
    while True:
        cuts = [0, *sorted(rng.sample(range(1, 20), k - 1)), 20]
        shares = [5 * (b - a) for a, b in itertools.pairwise(cuts)]
        if len(set(shares)) == k:
            return list(LABELS[:k]), shares


def _series_qas(rng: random.Random, labels: list[str], values: list, noun: str, unit: str = "") -> tuple[QA, ...]:
    """A value, a comparison and an extremum question over one series (answers exact from the data)."""
    of = dict(zip(labels, values))
    asked = rng.choice(labels)
    a, b = rng.sample(labels, 2)
    most = rng.random() < 0.5
    extreme = (max if most else min)(labels, key=of.__getitem__)
    word = {"bar": ("tallest", "shortest"), "point": ("highest", "lowest"), "slice": ("largest", "smallest")}[noun]
    return (QA(f"What is the value of {asked}?", f"{of[asked]}{unit}", "value"),
            QA(f"Is {a} larger than {b}?", "yes" if of[a] > of[b] else "no", "compare"),
            QA(f"Which {noun} is the {word[0 if most else 1]}?", extreme, "extrema"))


def _axes(fig, labels: list[str]):
    ax = fig.add_axes((0.12, 0.1, 0.84, 0.86))
    ax.set_ylim(0, VMAX + 0.5)
    ax.set_yticks(range(VMAX + 1))
    ax.grid(axis="y", linewidth=0.6, alpha=0.6)
    ax.set_axisbelow(True)
    ax.set_xticks(range(len(labels)), labels)
    return ax


def _bar(rng: random.Random) -> Chart:
    labels, values = _series(rng, 3, 6)
    fig = _figure()
    _axes(fig, labels).bar(range(len(labels)), values, width=0.6, color=rng.choice(COLOURS))
    target = markdown_table(["label", "value"], [[lab, v] for lab, v in zip(labels, values)])
    return Chart("bar", _png(fig), target, _series_qas(rng, labels, values, "bar"),
                 {"labels": labels, "values": values})


def _line(rng: random.Random) -> Chart:
    labels, values = _series(rng, 4, 7)
    fig = _figure()
    ax = _axes(fig, labels)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.plot(range(len(labels)), values, marker="o", linewidth=1.5, color=rng.choice(COLOURS))
    target = markdown_table(["label", "value"], [[lab, v] for lab, v in zip(labels, values)])
    return Chart("line", _png(fig), target, _series_qas(rng, labels, values, "point"),
                 {"labels": labels, "values": values})


def _pie(rng: random.Random) -> Chart:
    labels, shares = _pie_shares(rng)
    fig = _figure()
    ax = fig.add_axes((0.05, 0.05, 0.9, 0.9))
    start = rng.choice((0, 45, 90, 135))
    ax.pie(shares, labels=labels, colors=COLOURS[: len(labels)], startangle=start, counterclock=False,
           autopct=lambda p: f"{round(p)}%")  # the shares are printed: read, not estimated from angles
    target = markdown_table(["label", "share"], [[lab, f"{s}%"] for lab, s in zip(labels, shares)])
    return Chart("pie", _png(fig), target, _series_qas(rng, labels, shares, "slice", unit="%"),
                 {"labels": labels, "values": shares})


def _table(rng: random.Random) -> Chart:
    n_rows, n_cols = rng.randint(2, 4), rng.randint(2, 3)
    cols, rows = rng.sample(WORDS, n_cols), list(LABELS[:n_rows])
    cells = [[rng.randint(0, 99) for _ in cols] for _ in rows]
    fig = _figure()
    ax = fig.add_axes((0.1, 0.1, 0.85, 0.8))
    ax.axis("off")
    table = ax.table(cellText=[[str(c) for c in r] for r in cells], rowLabels=rows, colLabels=cols, loc="center",
                     cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(11)
    table.scale(1, 1.8)
    header, body = ["", *cols], [[r, *c] for r, c in zip(rows, cells)]
    asked = rng.sample([(i, j) for i in range(n_rows) for j in range(n_cols)], 2)
    qas = tuple(QA(f"What is the value of {cols[j]} in row {rows[i]}?", str(cells[i][j]), "cell") for i, j in asked)
    return Chart("table", _png(fig), markdown_table(header, body), qas, {"header": header, "rows": body})


def check_latex(latex: str, size: float = 18) -> float:
    """Parse ``latex`` with mathtext -> its width in pixels at font ``size``; unparseable: `ChartError`."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser

    if not latex.strip():
        raise ChartError("empty LaTeX")
    try:
        width, *_ = MathTextParser("path").parse(f"${latex}$", DPI, FontProperties(family="DejaVu Sans", size=size))
    except ValueError as e:  # ParseSyntaxException / ParseFatalException, a multi-line message with a caret
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ChartError(f"mathtext cannot parse '{latex}': {lines[-1] if lines else type(e).__name__}") from None
    return float(width)


def _equation(rng: random.Random, latex: str | None) -> Chart:
    qas: tuple[QA, ...] = ()
    if latex is None:
        greek = rng.choice(GREEK)
        latex = rng.choice(EQUATIONS).format(g=greek, v=rng.choice(VARIABLES), a=rng.randint(2, 9),
                                             b=rng.randint(2, 9))
        qas = (QA("Which Greek letter is in this equation?", greek, "symbol"),)
    size = 18
    width = check_latex(latex, size)
    size = size * min(1.0, 0.9 * PX / max(width, 1e-6))  # long ones shrink to fit the width
    fig = _figure()
    fig.text(0.5, 0.5, f"${latex}$", ha="center", va="center", fontsize=size)
    return Chart("equation", _png(fig), latex, qas, {"latex": latex})


def sample_rng(seed: int, index: int, stream: str = "charts") -> random.Random:
    """Sample ``index``'s own generator: the same whatever else is drawn (str seeds hash with SHA-512, stably)."""
    return random.Random(f"{stream}:{seed}:{index}")


def render_chart(kind: str, seed: int, index: int, latex: str | None = None, stream: str = "charts") -> Chart:
    """Sample ``index`` of ``seed``: a ``kind`` chart (``latex``: the equation to draw instead of a template's)."""
    import matplotlib

    if kind not in KINDS:
        raise ValueError(f"unknown chart kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = sample_rng(seed, index, stream)
    with matplotlib.rc_context(RC):
        if kind == "equation":
            return _equation(rng, latex)
        return {"bar": _bar, "line": _line, "pie": _pie, "table": _table}[kind](rng)


def short_target(target: str, limit: int = 38) -> str:
    """A title-sized target: a markdown table's cells on one line ("A 2 · B 6 · ..."), or the LaTeX, cut."""
    try:
        _, rows = parse_markdown_table(target)
        text = " · ".join(" ".join(c for c in row if c) for row in rows)
    except ValueError:
        text = " ".join(target.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def preview_grid(rows: list[list[tuple[bytes, str]]]) -> bytes:
    """A PNG grid: one row of (PNG, title) cells per list, e.g. the first samples of each kind with their
    targets as titles."""
    import matplotlib

    n_cols = max(map(len, rows))
    with matplotlib.rc_context(RC):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2.6 * n_cols, 2.8 * len(rows)), dpi=DPI)
        FigureCanvasAgg(fig)
        for r, cells in enumerate(rows):
            for c, (png, title) in enumerate(cells):
                ax = fig.add_subplot(len(rows), n_cols, r * n_cols + c + 1)
                ax.imshow(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        fig.tight_layout()
        return _png(fig)


# ------------------------------------------------------------------------------------------- held out


def write_chart_questions(out: str | Path, n: int, seed: int, kinds: tuple[str, ...] = ("bar",)) -> dict:
    """``n`` held-out charts (kinds in turn) as ``out/images/NNNNN.png`` with ``questions.jsonl`` rows
    ``{"id", "image", "question", "kind"}`` (what ``scripts.demo_vqa --questions`` answers) and ``answers.jsonl``
    rows ``{"id", "answer", "kind"}`` (what ``synthetic.score`` scores), one per QA. Drawn from the ``held-out``
    stream, never the builder's. Returns the paths and counts."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: {n!r} is not a whole number >= 1")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    questions, answers = [], []
    for i in range(n):
        chart = render_chart(kinds[i % len(kinds)], seed, i, stream="held-out")
        name = f"images/{i:05d}.png"
        (out / name).write_bytes(chart.png)
        for j, qa in enumerate(chart.qas):
            qid = f"{i:05d}-{j}-{qa.kind}"
            questions.append({"id": qid, "image": name, "question": qa.question, "kind": qa.kind})
            answers.append({"id": qid, "answer": qa.answer, "kind": qa.kind})
    for name, rows in (("questions", questions), ("answers", answers)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"questions": str(out / "questions.jsonl"), "answers": str(out / "answers.jsonl"), "charts": n,
            "n_questions": len(questions)}
