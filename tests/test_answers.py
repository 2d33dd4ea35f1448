"""Official VQA answer normalisation and accuracy, against hand-computed values."""
from collections import Counter

import pytest

from lxmert.data.answers import AnswerVocab, normalize_answer, official_accuracy, soft_label, soft_score


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),
    ("  yes\n", "yes"),
    ("Two", "2"),
    ("two.", "2"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("A dog", "dog"),
    ("the Dog!", "dog"),
    ("an apple", "apple"),
    ("one way", "1 way"),
    ("2.5", "2.5"),
    ("it is 5.", "it is 5"),
    ("1,000", "1000"),
    ("red, white", "red white"),
    ("black-and-white", "black and white"),
    ("T-shirt", "t shirt"),
    ("What?", "what"),
    ("(left)", "left"),
    ("10:30", "10:30"),
    ("a.m.", "am"),
    ("dont know", "don't know"),
    ("don't", "don't"),
    ("Isnt", "isn't"),
    ("its", "its"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_official_accuracy_leave_one_out_values():
    # n matching annotators of 10: (n * min(1, (n-1)/3) + (10-n) * min(1, n/3)) / 10
    others = ["cat"] * 10
    for n, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)]:
        answers = ["2"] * n + others[n:]
        assert official_accuracy("two", answers) == pytest.approx(expected)
        assert soft_score(n) == pytest.approx(expected)
    assert official_accuracy("2", ["2"] * 10) == 1.0


def test_official_accuracy_keeps_vqa_eval_quirks():
    """vqaEval.py normalises only when the ten answers are not all the same, and its period rule removes at
    most 32 periods (re.UNICODE lands in re.sub's count argument)."""
    assert official_accuracy("two", ["2"] * 10) == 0.0, "identical answers: the prediction is only stripped"
    assert official_accuracy("Yes", ["yes"] * 10) == 0.0
    assert official_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert official_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0
    from lxmert.data.answers import process_punctuation

    assert process_punctuation("." * 40) == "." * 8


def test_official_accuracy_normalises_both_sides():
    answers = ["A red car", "red car", "Red car.", "blue car", "car"] + ["x"] * 5
    assert official_accuracy("the red car", answers) == pytest.approx(0.9)  # 3 matches
    assert official_accuracy("Car", answers) == pytest.approx(0.3)
    # 9 answers (not 10): 2 matches -> (2 * 1/3 + 7 * 2/3) / 9
    assert official_accuracy("yes", ["yes", "yes"] + ["no"] * 7) == pytest.approx((2 / 3 + 14 / 3) / 9)
    with pytest.raises(ValueError):
        official_accuracy("yes", [])


def test_soft_label_of_normalised_answers():
    answers = [normalize_answer(a) for a in ["Two", "2", "two.", "three", "3", "3", "3", "four", "2", "2"]]
    assert soft_label(answers) == {"2": 1.0, "3": 1.0, "4": 0.3}


def test_vocab_from_answers_counts_and_orders_deterministically():
    vocab = AnswerVocab.from_answers(["yes"] * 3 + ["no"] * 3 + ["2"] * 2 + ["rare"], min_count=2)
    assert vocab.label2ans == ["no", "yes", "2"]
    assert vocab.ans2label == {"no": 0, "yes": 1, "2": 2}
    assert len(AnswerVocab.from_counts(Counter({"a": 1}), 2)) == 0
