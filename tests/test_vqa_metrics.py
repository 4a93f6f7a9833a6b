"""The benchmarks' metrics on worked examples from their official definitions (common.vqa_metrics)."""

import pytest

from common.vqa_metrics import (anls, mc_accuracy, mc_choice, normalized_levenshtein, relaxed_accuracy,
                                relaxed_correct, vqa_accuracy, vqa_normalize)

# ---------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs.", "2 dogs"),  # period deleted, lower-cased, number word -> digit
    ("dont", "don't"),  # the contractions map
    ("The cat", "cat"),  # articles dropped: a / an / the
    ("an apple", "apple"),
    ("none", "0"),  # the script's manualMap: "none" is a number word to it
    ("ten", "10"),
    ("eleven", "eleven"),  # the map stops at ten
    ("x-ray", "x ray"),  # punctuation without a space beside it becomes a space
    ("yes, it is", "yes it is"),  # "," next to a space: deleted, not spaced
    ("1,000", "1000"),  # digit-comma-digit: every punctuation mark is deleted
    ("3.5", "3.5"),  # a period before a digit stays
    ("e.g.", "eg"),
    ("(red)", "red"),  # no space beside the parentheses: both become spaces, then whitespace collapses
    ("it's red", "it's red"),  # "'" is not punctuation to the script
    ("12:30", "12:30"),  # nor is ":"
    ("  Yes\tsir\n", "yes sir"),
])
def test_vqa_normalisation_follows_the_official_script(raw, normalised):
    assert vqa_normalize(raw) == normalised


def test_the_period_rule_caps_at_32_deletions():
    # vqaEval.py passes re.UNICODE (32) as `sub`'s count: a 33rd period survives.
    assert vqa_normalize("." * 33) == "."


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(m, expected):
    # m of 10 annotators said the predicted answer. Leaving out one of those m leaves m-1 matches among the 9,
    # leaving out one of the other 10-m leaves m; each subset scores min(matches / 3, 1), and the 10 are averaged:
    # m=2: (2 * min(1/3, 1) + 8 * min(2/3, 1)) / 10 = (2/3 + 16/3) / 10 = 0.6, not min(2/3, 1) = 0.667.
    # m=1: (1 * 0 + 9 * 1/3) / 10 = 0.3;  m=3: (3 * 2/3 + 7 * 1) / 10 = 0.9;  m=4: every subset has >= 3: 1.0.
    answers = ["red"] * m + ["blue"] * (10 - m)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


def test_the_prediction_is_normalised_when_annotators_differ():
    # "Two dogs." -> "2 dogs", said by 2 of 10: 0.6.
    assert vqa_accuracy("Two dogs.", ["2 dogs"] * 2 + ["dogs"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_unanimous_answers_are_compared_unnormalised_unless_asked():
    # The 2021 script normalises only when len(set(answers)) > 1; TextVQA's evaluator always does.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes ", ["yes"] * 10) == 1.0  # strip() is always applied
    assert vqa_accuracy("Yes", ["yes"] * 10, normalize_all=True) == 1.0
    assert vqa_accuracy("nokia", ["Nokia"] * 10, normalize_all=True) == 1.0


def test_references_are_normalised_too():
    assert vqa_accuracy("2", ["two"] * 4 + ["three"] * 6) == 1.0


def test_vqa_accuracy_refuses_one_answer_or_a_bare_string():
    with pytest.raises(ValueError, match="at least 2 reference answers, got 1"):
        vqa_accuracy("red", ["red"])
    with pytest.raises(TypeError, match="got the string 'red'"):
        vqa_accuracy("red", "red")


# ---------------------------------------------------------------------------------------------- ANLS


def test_anls_at_and_around_the_threshold():
    assert anls("ab", ["ac"]) == 0.0  # NL = 1/2: at the threshold, 0 (NL >= 0.5)
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)  # NL = 1/3 < 0.5
    assert anls("abcd", ["abxy"]) == 0.0  # NL = 2/4
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)  # NL = 2/5
    assert anls("Hello Wrld", ["hello world"]) == pytest.approx(1 - 1 / 11)  # one deletion over 11 characters


def test_anls_is_case_insensitive_strips_and_takes_the_best_answer():
    assert anls("  DENVER   Broncos ", ["denver broncos"]) == 1.0
    assert anls("12/15/89", ["12/15/88"]) == pytest.approx(1 - 1 / 8)
    assert anls("Dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 1.0
    assert anls("", ["x"]) == 0.0 and anls("", [""]) == 1.0


def test_normalized_levenshtein_uses_the_longer_length():
    assert normalized_levenshtein("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_levenshtein("", "") == 0.0


# ---------------------------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize("prediction, target, correct", [
    ("105", "100", True),  # |105 - 100| / 100 = 0.05: on the boundary, correct (<=)
    ("95", "100", True),
    ("105.1", "100", False),
    ("94.9", "100", False),
    ("-10.5", "-10", True),  # relative to |target|
    ("5%", "0.05", True),  # "%" divides by 100
    ("5.2%", "5%", True),
    ("5", "5%", False),  # 5 vs 0.05
    ("1.05", "1", False),  # 0.05000000000000004 in floating point: over, as in pix2struct
    (" 12\n", "12", True),  # stripped
    ("Yes", "yes", True),  # text: exact, case-insensitive
    ("yes.", "yes", False),
    ("0", "0", True),  # a zero reference falls back to text
    ("0.0", "0", False),
])
def test_chartqa_relaxed_correctness(prediction, target, correct):
    assert relaxed_correct(prediction, target) is correct


def test_chartqa_takes_any_reference():
    assert relaxed_accuracy("20", ["a lot", "19.5"]) == 1.0
    assert relaxed_accuracy("18", ["a lot", "19.5"]) == 0.0


# ---------------------------------------------------------------------------------------------- multiple choice

OPTIONS = ["moves left", "moves right", "stays"]


@pytest.mark.parametrize("text, index", [
    ("B", 1), ("(B)", 1), ("B.", 1), ("B) moves right", 1), ("C: stays", 2), ("The answer is A", 0),
    ("Answer: (C)", 2), ("best option: B", 1),
    ("moves right", 1), ("Moves  Right.", 1),  # the option's text
    ("D", None), ("b", None), ("A red ball", None), ("right", None), ("", None),
])
def test_mc_choice_reads_a_letter_or_an_option_text(text, index):
    assert mc_choice(text, OPTIONS) == index


def test_mc_accuracy_by_letter_or_text():
    assert mc_accuracy("(B)", OPTIONS, "moves right") == 1.0
    assert mc_accuracy("moves right", OPTIONS, "B") == 1.0
    assert mc_accuracy("A", OPTIONS, "B") == 0.0
    assert mc_accuracy("I cannot tell", OPTIONS, "B") == 0.0


def test_mc_accuracy_refuses_answers_naming_no_option_and_ambiguous_options():
    with pytest.raises(ValueError, match="names none of the options"):
        mc_accuracy("A", OPTIONS, "E")
    with pytest.raises(ValueError, match="two options read the same"):
        mc_accuracy("A", ["Left", "left "], "A")
    with pytest.raises(ValueError, match="at least 2 options"):
        mc_accuracy("A", ["left"], "A")
