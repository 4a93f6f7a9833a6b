"""The benchmarks' own answer metrics, each as its benchmark defines it. WER / CER live in `common.metrics`.

    vqa_accuracy("Two dogs.", ["2 dogs"] * 2 + ["dogs"] * 8)     # 0.6: VQAv2 (and TextVQA) accuracy
    anls("Hello Wrld", ["hello world"])                           # 0.909...: DocVQA / InfographicVQA
    relaxed_accuracy("10.4", ["10"])                              # 1.0: ChartQA, within 5 %
    mc_accuracy("(B)", ["left", "right"], "right")                # 1.0: multiple-choice video QA

Each function scores one prediction against its question's references and returns a float in [0, 1]; a
benchmark's score is the mean over its questions.

VQA accuracy (VQAv2; TextVQA uses the same metric). The official script is GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, as fixed in March 2021 (commit a013f00); `vqa_normalize` and
`vqa_accuracy` do what it does, quirks included:
  * prediction and references: newlines and tabs become spaces, then ``strip()``;
  * only when the references are not all the same string, references *and* prediction are normalised
    (`vqa_normalize`); when all annotators agree nothing is normalised, so "Yes" does not match ten "yes";
  * `vqa_normalize`: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the text has it
    next to a space (or the text has a digit-comma-digit such as "1,000", which deletes them all), else
    replaced by a space; then a period not followed by a digit is deleted (the script's pattern
    ``(?!<=\\d)(\\.)(?!\\d)`` is a look-ahead, not the look-behind it looks like, and ``re.UNICODE`` lands in
    the ``count`` argument, so at most 32 periods go); then lower-case, split on whitespace, number words
    "none", "zero" .. "ten" -> digits ("none" -> "0"), articles a / an / the dropped, contractions restored
    ("dont" -> "don't"), words joined by single spaces. "'" and ":" are not punctuation to it;
  * accuracy = the mean over the 10 leave-one-annotator-out subsets of min(#matches among the other 9 / 3, 1);
    with m of 10 annotators matching that is 0.3 (m=1), 0.6 (m=2), 0.9 (m=3), 1.0 (m>=4).
TextVQA's own evaluator (MMF's TextVQAAccuracyEvaluator) normalises the prediction and every reference even
when they agree, and capitalised references ("Nokia") are common in its files: ``normalize_all=True`` does
that, with this script's normalisation (EvalAI's processor, which TextVQA uses, also lower-cases first,
deletes "," and "?" outright and splits "'s" off; not reproduced).

ANLS (Biten et al. 2019, eq. 1; DocVQA, InfographicVQA): per reference, NL = Levenshtein distance / length of
the longer string, both lower-cased with runs of whitespace made one space and stripped; the similarity is
1 - NL when NL < 0.5, else 0 (NL = 0.5 exactly scores 0, as the paper defines it; pix2struct keeps 0.5).
The question scores the best reference.

ChartQA relaxed accuracy (Masry et al. 2022, sec. 5.1, following Methani et al. 2020), as pix2struct's
``relaxed_correctness`` computes it: when the reference parses as a non-zero number and the prediction as a
number, correct iff |pred - ref| / |ref| <= 0.05; a trailing "%" divides by 100 ("5%" == "0.05"); otherwise
(text, or a reference of 0) a case-insensitive exact match. Both sides are stripped of surrounding
whitespace first (pix2struct's ``endswith("%")`` and string match are not). The best reference counts.

Multiple choice (video QA): options are lettered A, B, C, ... in order. `mc_choice` reads which option a
text names: its exact text (case-insensitive, whitespace collapsed, a trailing period dropped), or its
letter alone or marked as a choice ("B", "(B)", "B.", "B)", "B: left", "The answer is B"); a bare capital
followed by more words ("A red ball") is not read as a letter. A prediction naming no option scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from common.metrics import edit_distance

# ---------------------------------------------------------------------------------------------- VQA accuracy

# The official script's tables, as written there (its keys "Im", "Ive", "Id've", "I'dve" can never match:
# words are lower-cased first; "somebody'd" -> "somebodyd" is backwards there too).
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've",
    'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've",
    'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # the script's manualMap
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim: in effect r"\.(?!\d)"
_PERIOD_COUNT = int(re.UNICODE)  # the script passes re.UNICODE (32) where `sub` takes its count
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def _references(items: Sequence[str], metric: str, least: int = 1, noun: str = "reference answers") -> list[str]:
    """``items`` as a list, refused when it is one string (its characters would be the items) or too short."""
    if isinstance(items, str):
        raise TypeError(f"{metric}: {noun} must be a sequence of strings, got the string {items!r}")
    items = list(items)
    if len(items) < least:
        raise ValueError(f"{metric} needs at least {least} {noun}, got {len(items)}")
    return items


def _clean(text: str) -> str:
    """What the script does to every answer before anything else."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # The checks look at the input text, not at what earlier replacements made of it (as the script does).
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_normalize(answer: str) -> str:
    """The official VQA answer processing (see the module docstring): "Two dogs." -> "2 dogs"."""
    return _digits_articles(_punctuation(_clean(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize_all: bool = False) -> float:
    """VQA accuracy of ``prediction`` against the annotators' ``answers`` (10 in VQAv2 and TextVQA).

    The official script's rule: mean over leave-one-out subsets of min(#matches among the others / 3, 1);
    normalisation only when the answers differ, unless ``normalize_all`` (TextVQA's evaluator). Fewer than
    2 answers raise ValueError: every leave-one-out subset of one answer is empty, so nothing could score.
    """
    # With one answer every leave-one-out subset is empty and nothing could score.
    answers = _references(answers, "VQA accuracy", least=2)
    pred, refs = _clean(prediction), [_clean(a) for a in answers]
    if normalize_all or len(set(refs)) > 1:
        pred, refs = vqa_normalize(pred), [vqa_normalize(a) for a in refs]
    matches = [a == pred for a in refs]
    total = sum(matches)
    return sum(min(1.0, (total - hit) / 3) for hit in matches) / len(refs)


# ---------------------------------------------------------------------------------------------- ANLS

ANLS_THRESHOLD = 0.5


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(a: str, b: str) -> float:
    """Levenshtein distance of ``a`` and ``b`` (characters) over the longer length; 0.0 for two empty strings."""
    longest = max(len(a), len(b))
    return edit_distance(a, b).errors / longest if longest else 0.0


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Max over ``answers`` of 1 - NL(answer, prediction) where NL < ``threshold``, else 0 (case-insensitive)."""
    pred = _anls_text(prediction)
    best = 0.0
    for answer in _references(answers, "ANLS"):
        nl = normalized_levenshtein(_anls_text(answer), pred)
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


# ---------------------------------------------------------------------------------------------- ChartQA

CHARTQA_TOLERANCE = 0.05


def _chartqa_number(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, tolerance: float = CHARTQA_TOLERANCE) -> bool:
    """One reference: numbers within ``tolerance`` relative to a non-zero ``target``, else exact text."""
    prediction, target = prediction.strip(), target.strip()
    pred, ref = _chartqa_number(prediction), _chartqa_number(target)
    if pred is not None and ref:
        return abs(pred - ref) / abs(ref) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = CHARTQA_TOLERANCE) -> float:
    """1.0 when ``prediction`` is relaxed-correct for any of ``answers``, else 0.0."""
    return float(any(relaxed_correct(prediction, a, tolerance) for a in _references(answers, "relaxed accuracy")))


# ---------------------------------------------------------------------------------------------- multiple choice

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CHOICE = re.compile(r"(?i:(?:the\s+)?(?:correct\s+|best\s+)?(?:answer|option)\s*(?:is\s*)?:?\s*)?"
                     r"(?:\(([A-Z])\)|([A-Z])(?:[.:)]|$))")


def _option_text(text: str) -> str:
    return " ".join(text.split()).casefold().removesuffix(".").strip()


def mc_choice(text: str, options: Sequence[str]) -> int | None:
    """The index of the option ``text`` names (its text, or its letter: see the module docstring), or None."""
    wanted = _option_text(text)
    named = [i for i, option in enumerate(options) if _option_text(option) == wanted]
    if len(named) == 1:
        return named[0]
    m = _CHOICE.match(text.strip())
    if m is None:
        return None
    index = OPTION_LETTERS.index(m.group(1) or m.group(2))
    return index if index < len(options) else None


def mc_accuracy(prediction: str, options: Sequence[str], answer: str) -> float:
    """1.0 when ``prediction`` names the option ``answer`` names (a letter or the option's text), else 0.0.
    ValueError when ``answer`` names no option, or two options read the same."""
    options = _references(options, "multiple choice", least=2, noun="options")
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"multiple choice takes at most {len(OPTION_LETTERS)} options, got {len(options)}")
    texts = [_option_text(o) for o in options]
    if len(set(texts)) < len(texts):
        raise ValueError(f"two options read the same (case and spacing aside): {list(options)}")
    gold = mc_choice(answer, options)
    if gold is None:
        raise ValueError(f"the answer {answer!r} names none of the options {list(options)} (by letter or text)")
    return float(mc_choice(prediction, options) == gold)
