"""Question-answer pairs from the text that comes with an image (its caption, its OCR text), for the annealing
set's QA data (Llama 3 sec. 7.1: "question-answer pairs ... made from text and from OCR").

    for row, sample in qa_samples("shards/", TEMPLATES, per_sample=4, seed=0): ...

Inputs are what ``scripts.build_shards`` reads or writes, through its readers (`readers.open_input`): a folder of
images with sidecars (x.jpg + x.txt, or x.json with ``caption``), webdataset tars (a .tar, a pattern, or a folder
holding ``*.tar``, such as build_shards' OUT). The OCR text is ``ocr_text``: at the top of a shard's key.json
(build_shards' OCR stage) or of a sidecar JSON, or in a shard's ``meta`` (a sidecar's field carried through
build_shards). A caption may be missing when OCR text is there; neither, or text that is not UTF-8, is the
sample's error row (the reader's reason, or ours).

Templates (`template_qas`, deterministic from the seed and the sample's key): "Describe the image briefly." ->
the caption; "What does the text in the image say?" -> the OCR text; "What is the first word written in the
image?" -> its first word; then yes / no noun questions ("Is there a dog in the image?"), alternating, the first
picked at random. Nouns without a POS tagger (`nouns`): lower-cased words of >= 3 letters, minus a stopword list
(function words, common verbs, adjectives, colours, numbers) and words that look like verb forms or adverbs
(-ing, -ed, -ly at >= 6 letters), plurals cut to a singular ("dogs" -> "dog", "berries" -> "berry"). Yes: a noun
of the caption; no: a noun of another caption of the input, not one of this caption's.

An LLM (`llm_qas`): the caller's ``complete(messages) -> text`` answers `llm_messages` (a system and a user turn
asking for "Q: ... A: ..." lines about the text); `parse_qa` reads the pairs back, and text it cannot read is a
`QATextError` naming why, the sample's error row.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_curation.readers import open_input
from data_curation.records import ERROR, Sample
from data_curation.wds_reader import read_webdataset

TEMPLATES = "templates"
OCR_KEY = "ocr_text"
DESCRIBE = "Describe the image briefly."
READ_TEXT = "What does the text in the image say?"
FIRST_WORD = "What is the first word written in the image?"
IMAGE = "<|image|>"
MAX_ANSWER_CHARS = 2000  # an LLM answer longer than this is a runaway generation, not an answer
_STOPWORD_TEXT = """
a about above after again against all almost along also although always am among an and another any are around
as at away back be because been before behind being below beneath beside between beyond both but by can could
did do does doing down during each either else even ever every few for from front further had has have having he
her here hers him his how however into its itself just less like many may might more most much must near next
nor not now off once one only onto other our ours out over own per perhaps quite rather same several she should
since some such than that the their theirs them then there these they this those through thus too toward towards
under until upon very was were what when where which while who whom whose why will with within without would yet
you your yours
top bottom left right middle side center centre inside outside part view shot picture image photo photograph
close closeup background foreground
is are was get gets got make makes made take takes took show shows shown see seen look looks sit sits stand
stands lie lies lay hold holds put puts use uses used
big small large little tiny huge tall short long old new young good great nice pretty beautiful white black red
green blue yellow orange purple pink brown gray grey dark light bright colorful colourful various different
open closed empty full hot cold wooden metal plastic
two three four five six seven eight nine ten many lot lots couple group pair
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


class QATextError(ValueError):
    """A sample that yields no question-answer pair: no text, or an LLM output that cannot be parsed."""


@dataclass(frozen=True)
class SourceText:
    """One input image and its text: ``caption`` and ``ocr`` are stripped ('' when absent)."""

    key: str
    source: str
    image: bytes
    ext: str  # the image file's extension, with its dot
    caption: str
    ocr: str


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # describe | noun_yes | noun_no | ocr_text | ocr_first_word | llm


# ------------------------------------------------------------------------------------------------ input


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def nouns(text: str) -> list[str]:
    """The likely nouns of ``text``, singular, in order of first use, each once (the heuristic of the module
    docstring; no POS tagger)."""
    found: dict[str, None] = {}
    for match in _WORD.finditer(text):
        word = match.group().lower()
        if "'" in word or len(word) < 3 or word in STOPWORDS:
            continue
        if len(word) >= 6 and word.endswith(("ing", "ed", "ly")):
            continue
        word = _singular(word)
        if word not in STOPWORDS:
            found.setdefault(word, None)
    return list(found)


def _ocr_of(meta: dict) -> object:
    inner = meta.get("meta")
    return meta.get(OCR_KEY, inner.get(OCR_KEY) if isinstance(inner, dict) else None)


def _missing_caption(s: Sample) -> bool:
    """The readers' no-caption failure (folder: "missing caption: ...", tar: "... has no caption ..."), after
    which the sample still holds its image and its JSON's other fields (where OCR text may be)."""
    return (s.status == ERROR and s.caption is None and s.image_bytes is not None
            and re.search(r"missing caption|has no caption", s.reason or "") is not None)


def source_text(s: Sample) -> SourceText:
    """A reader's sample -> its image and text; no usable text: `QATextError` naming why."""
    if s.status == ERROR and not _missing_caption(s):
        raise QATextError(s.reason or "unreadable input")
    ocr = _ocr_of(s.meta)
    if ocr is not None and not isinstance(ocr, str):
        raise QATextError(f"{OCR_KEY!r} is a {type(ocr).__name__}, not a string")
    caption, ocr = (s.caption or "").strip(), (ocr or "").strip()
    if not caption and not ocr:
        raise QATextError(f"no caption and no OCR text{f' ({s.reason})' if s.reason else ''}")
    ext = Path(s.source.rsplit(":", 1)[-1]).suffix.lower() or ".jpg"
    return SourceText(s.key, s.source, s.image_bytes, ext, caption, ocr)


def read_inputs(spec: str | Path) -> Iterator[Sample]:
    """The samples of ``spec``: a folder holding ``*.tar`` (build_shards' OUT) is read as those shards, anything
    else as `readers.open_input` reads it. Input-level problems: `CurationInputError`."""
    path = Path(spec)
    tars = sorted(path.glob("*.tar")) if path.is_dir() else []
    return read_webdataset(tars) if tars else open_input(spec)


# -------------------------------------------------------------------------------------------- templates


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def noun_question(noun: str) -> str:
    return f"Is there {_article(noun)} {noun} in the image?"


def template_qas(text: SourceText, vocabulary: list[str], k: int, seed: int) -> list[QA]:
    """Up to ``k`` pairs: describe, OCR text, first word, then noun questions, yes and no alternating (the first
    chosen at random). ``vocabulary``: the sorted nouns of every caption of the input (where negatives come from)."""
    rng = random.Random(f"qa:{seed}:{text.key}")
    qas = []
    if text.caption:
        qas.append(QA(DESCRIBE, text.caption, "describe"))
    if text.ocr:
        qas += [QA(READ_TEXT, text.ocr, "ocr_text"), QA(FIRST_WORD, text.ocr.split()[0], "ocr_first_word")]
    own = nouns(text.caption)
    yes = rng.sample(own, len(own))
    others = [w for w in vocabulary if w not in set(own)]
    # without a caption nothing says what is not in the image: no noun questions at all
    no = rng.sample(others, min(len(others), max(len(own), 1))) if text.caption else []
    queues = [[QA(noun_question(w), "yes", "noun_yes") for w in yes], [QA(noun_question(w), "no", "noun_no")
                                                                       for w in no]]
    turn = rng.randrange(2)
    while len(qas) < k and any(queues):
        if queues[turn]:
            qas.append(queues[turn].pop(0))
        turn = 1 - turn
    return qas[:k]


# -------------------------------------------------------------------------------------------------- LLM


def llm_messages(text: SourceText, k: int) -> list[dict[str, str]]:
    """The chat (Llama 3 roles) asking a model for ``k`` question-answer pairs about the image's text."""
    parts = ([f"Caption: {text.caption}"] if text.caption else []) + ([f"Text in the image: {text.ocr}"]
                                                                      if text.ocr else [])
    return [{"role": "system", "content": "You write question-answer pairs about an image from its description. "
                                          "Answer each question from the description alone, briefly."},
            {"role": "user", "content": "\n".join(parts) + f"\n\nWrite {k} question-answer pairs, one per line, "
                                        "as: Q: <question> A: <answer>"}]


# "Q:" not inside a word, the answer's "A:" after whitespace, the answer up to the next "Q:" or the end
_PAIR = re.compile(r"(?<![A-Za-z])Q\s*:\s*(?P<q>.+?)\s+A\s*:\s*(?P<a>.+?)\s*(?=\sQ\s*:|\Z)", re.DOTALL)


def parse_qa(output: str, k: int) -> list[QA]:
    """The first ``k`` "Q: ... A: ..." pairs of a model's ``output`` (a pair on one line or over two);
    none, an empty question or answer, or a runaway answer: `QATextError` naming why."""
    if not output.strip():
        raise QATextError("the model wrote nothing")
    pairs = []
    for m in _PAIR.finditer(output):
        q, a = " ".join(m.group("q").split()), " ".join(m.group("a").split())
        if not q or not a:
            continue
        if len(a) > MAX_ANSWER_CHARS:
            raise QATextError(f"an answer of {len(a)} characters (> {MAX_ANSWER_CHARS}): a runaway generation")
        pairs.append(QA(q if q.endswith("?") else q + "?", a, "llm"))
    if not pairs:
        snippet = " ".join(output.split())[:60]
        raise QATextError(f"no 'Q: ... A: ...' pair in the model's output ({snippet!r})")
    return pairs[:k]


def llm_qas(complete: Callable[[list[dict[str, str]]], str], text: SourceText, k: int) -> list[QA]:
    """``k`` pairs (at most) from ``complete(llm_messages(...))``, parsed by `parse_qa`."""
    return parse_qa(complete(llm_messages(text, k)), k)


# ---------------------------------------------------------------------------------------------- samples


def conversation(qas: list[QA]) -> list[dict[str, str]]:
    """The trainer's conversation: ``<|image|>`` + the first question, then one user / assistant turn per pair."""
    turns = []
    for i, qa in enumerate(qas):
        turns += [{"role": "user", "content": (IMAGE if i == 0 else "") + qa.question},
                  {"role": "assistant", "content": qa.answer}]
    return turns


def caption_vocabulary(spec: str | Path) -> list[str]:
    """The sorted nouns of every caption in ``spec`` (a first pass: negatives come from other captions)."""
    words: set[str] = set()
    for s in read_inputs(spec):
        if s.caption:
            words.update(nouns(s.caption))
    return sorted(words)


@dataclass(frozen=True)
class QASample:
    text: SourceText
    qas: list[QA]
    generator: str

    def sidecar(self) -> dict:
        """build_shards' folder sidecar: the caption (the OCR text when there is none) and the conversation."""
        return {"caption": self.text.caption or self.text.ocr, "conversations": conversation(self.qas),
                "generator": self.generator, "qa_kinds": [qa.kind for qa in self.qas], "source_key": self.text.key,
                **({OCR_KEY: self.text.ocr} if self.text.ocr else {})}


def qa_samples(spec: str | Path, generator: str, per_sample: int, seed: int,
               complete: Callable[[list[dict[str, str]]], str] | None = None) -> Iterator[tuple[dict, QASample | None]]:
    """Per input of ``spec``, in the reader's order: (status row, sample or None). ``generator`` is `TEMPLATES`
    or the model path recorded per sample (then ``complete`` asks the model). A sample that yields no pair is an
    error row with the reason; the job goes on."""
    if generator != TEMPLATES and complete is None:
        raise ValueError("an LLM generator needs its complete(messages) function")
    vocabulary = caption_vocabulary(spec) if generator == TEMPLATES else []
    for i, s in enumerate(read_inputs(spec)):
        row = {"id": f"{i:06d}", "key": s.key, "source": s.source, "generator": generator}
        try:
            text = source_text(s)
            qas = (template_qas(text, vocabulary, per_sample, seed) if generator == TEMPLATES
                   else llm_qas(complete, text, per_sample))
        except QATextError as e:
            yield {**row, "status": "error", "reason": str(e), "kinds": []}, None
            continue
        yield {**row, "status": "ok", "reason": None, "kinds": [qa.kind for qa in qas]}, QASample(text, qas, generator)

