"""python -m lxmert score gives the official VQA evaluation's numbers, question by question.

The reference below is a second, deliberately literal reading of the official algorithm
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, VQAEval.evaluate / processPunctuation /
processDigitArticle / setAccuracy), written loop by loop in the test, independent of lxmert.data.answers. The
fixture answers are real VQA-VS records (tests/fixtures/vqa_vs_val_records.json) plus hand-made cases for
every rule: punctuation next to spaces, digit-comma-digit numbers, decimals, number words, articles,
contractions, capitals, newlines and tabs, all-identical answers (no normalisation there), fewer than ten
answers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lxmert.data.score import main

FIXTURES = Path(__file__).parent / "fixtures"

# --- the reference reading (vqaEval.py line by line) --------------------------------------------------
REF_PUNCT = [';', r"/", '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!']
REF_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
REF_COMMA = re.compile(r"(\d)(\,)(\d)")
REF_MANUAL = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5', 'six': '6',
              'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
REF_ARTICLES = ['a', 'an', 'the']
REF_SOME_CONTRACTIONS = {"dont": "don't", "isnt": "isn't", "thats": "that's", "yall'll": "y'all'll",
                         "somebody'd": "somebodyd", "youre": "you're", "whats": "what's", "cant": "can't"}


def ref_punctuation(in_text):
    out_text = in_text
    for p in REF_PUNCT:
        if (p + ' ' in in_text or ' ' + p in in_text) or (re.search(REF_COMMA, in_text) is not None):
            out_text = out_text.replace(p, '')
        else:
            out_text = out_text.replace(p, ' ')
    out_text = REF_PERIOD.sub("", out_text, re.UNICODE)
    return out_text


def ref_digit_article(in_text):
    out_text = []
    for word in in_text.lower().split():
        word = REF_MANUAL.setdefault(word, word)
        if word not in REF_ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in REF_SOME_CONTRACTIONS:
            out_text[word_id] = REF_SOME_CONTRACTIONS[word]
    return ' '.join(out_text)


def ref_evaluate(gts, res):
    """{qid: {'answers': [{'answer': ...}], 'question_type', 'answer_type'}}, {qid: answer} -> accuracies."""
    acc_qa, acc_ques, acc_ans, per_q = [], {}, {}, {}
    for ques_id in gts:
        answers = [dict(a) for a in gts[ques_id]['answers']]
        for ans_dic in answers:
            ans_dic['answer'] = ans_dic['answer'].replace('\n', ' ').replace('\t', ' ').strip()
        res_ans = res[ques_id].replace('\n', ' ').replace('\t', ' ').strip()
        gt_answers = [ans['answer'] for ans in answers]
        if len(set(gt_answers)) > 1:
            for ans_dic in answers:
                ans_dic['answer'] = ref_digit_article(ref_punctuation(ans_dic['answer']))
            res_ans = ref_digit_article(ref_punctuation(res_ans))
        gt_acc = []
        for gt_ans_datum in answers:
            other = [item for item in answers if item != gt_ans_datum]
            matching = [item for item in other if item['answer'] == res_ans]
            gt_acc.append(min(1, float(len(matching)) / 3))
        avg = float(sum(gt_acc)) / len(gt_acc)
        per_q[ques_id] = avg
        acc_qa.append(avg)
        acc_ques.setdefault(gts[ques_id]['question_type'], []).append(avg)
        acc_ans.setdefault(gts[ques_id]['answer_type'], []).append(avg)
    return per_q, acc_qa, acc_ques, acc_ans


# --- fixtures -----------------------------------------------------------------------------------------

def _answers(words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


HANDMADE = [  # (answers, prediction)
    (["Two", "2", "two.", "2", "three", "3", "3", "none", "2 ", "Two"], "2"),
    (["A dog", "the dog", "dog!", "Dog", "cat", "a Cat", "dont know", "dog", "dog", "dog"], "dog"),
    (["dont know"] * 5 + ["don't know"] * 5, "don't know"),
    (["1,000", "1000", "1,000", "1 000"] + ["many"] * 6, "1000"),
    (["2.5", "2.5", "2.5 ", "2,5"] + ["3"] * 6, "2.5"),
    (["yes"] * 10, "Yes"),
    (["yes"] * 10, "yes\n"),
    (["black-white", "black and white", "black white", "black & white"] + ["gray"] * 6, "black white"),
    (["left, right", "left right", "left"] + ["right"] * 7, "left right"),
    (["y'all'll", "yall'll", "yall'll"] + ["no"] * 7, "y'all'll"),
    (["red", "red", "blue"], "red"),  # fewer than ten answers
    (["a", "an", "the", "a", "an"] + ["x"] * 5, ""),
    (["U.S.A.", "usa", "USA"] + ["us"] * 7, "usa"),
    (["hello world!", "hello world !", "hello world"] + ["hi"] * 7, "hello world"),
]


def _write(tmp_path: Path):
    """Raw VQA-style files (VQA v2 wrapper) and predictions: real VQA-VS records with several predictions each,
    and the hand-made cases."""
    records = json.loads((FIXTURES / "vqa_vs_val_records.json").read_text())
    questions, annotations, predictions = [], [], []
    for q, a in zip(records["questions"], records["annotations"]):
        for k, guess in enumerate([a["multiple_choice_answer"], a["answers"][-1]["answer"].upper() + ".", "no"]):
            qid = q["question_id"] * 10 + k
            questions.append({**q, "question_id": qid})
            annotations.append({**a, "question_id": qid})
            predictions.append({"question_id": qid, "answer": guess})
    for i, (answers, guess) in enumerate(HANDMADE):
        qid = 77_000 + i
        questions.append({"image_id": 1, "question": f"case {i}?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": 1, "question_type": "case", "answer_type": "other",
                            "multiple_choice_answer": answers[0], "answers": _answers(answers)})
        predictions.append({"question_id": qid, "answer": guess})
    paths = {"questions": tmp_path / "q.json", "annotations": tmp_path / "a.json", "predictions": tmp_path / "p.json"}
    paths["questions"].write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    paths["annotations"].write_text(json.dumps({"annotations": annotations}))
    paths["predictions"].write_text(json.dumps(predictions))
    return paths, annotations, predictions


def test_scores_equal_the_official_algorithm_question_by_question(tmp_path, capsys):
    paths, annotations, predictions = _write(tmp_path)
    out = tmp_path / "scores.json"
    assert main([str(paths["predictions"]), "--annotations", str(paths["annotations"]), "--questions",
                 str(paths["questions"]), "--out", str(out)]) == 0
    gts = {a["question_id"]: a for a in annotations}
    res = {p["question_id"]: p["answer"] for p in predictions}
    per_q, acc_qa, acc_ques, acc_ans = ref_evaluate(gts, res)

    from lxmert.data.answers import official_accuracy

    for qid, a in gts.items():
        mine = official_accuracy(res[qid], [x["answer"] for x in a["answers"]])
        assert mine == pytest.approx(per_q[qid], abs=1e-12), (qid, res[qid], a["answers"])
    got = json.loads(out.read_text())
    assert got["overall"] == round(100 * float(sum(acc_qa)) / len(acc_qa), 2)
    assert got["perQuestionType"] == {t: round(100 * float(sum(v)) / len(v), 2) for t, v in acc_ques.items()}
    assert got["perAnswerType"] == {t: round(100 * float(sum(v)) / len(v), 2) for t, v in acc_ans.items()}
    assert got["questions"] == len(gts) and 0 < got["overall"] < 100
    printed = capsys.readouterr().out
    assert f"overall accuracy: {got['overall']:.2f}" in printed and "per question type:" in printed
    # the quirks are exercised: all-identical answers are not normalised ("Yes" scores 0), a stripped one matches
    assert per_q[77_005] == 0.0 and per_q[77_006] == 1.0


def test_a_subset_and_a_prepared_split_score_the_same(tmp_path):
    """An OOD-style subset scored from the superset's predictions, and the same questions prepared."""
    from lxmert.data.prepare import ImageNamer, RawSplit, prepare_questions

    paths, annotations, predictions = _write(tmp_path)
    subset = [q for q in json.loads(paths["questions"].read_text())["questions"] if q["question_id"] % 2 == 0]
    sub = tmp_path / "subset.json"
    sub.write_text(json.dumps(subset))
    assert main([str(paths["predictions"]), "--annotations", str(paths["annotations"]), "--questions", str(sub),
                 "--out", str(tmp_path / "raw.json")]) == 0
    prepare_questions({"val": RawSplit(sub, paths["annotations"])}, tmp_path / "prepared", ["val"], min_count=1,
                      namer=ImageNamer({"": "val2014"}), log=lambda m: None)
    assert main([str(paths["predictions"]), "--prepared", str(tmp_path / "prepared"), "--split", "val",
                 "--out", str(tmp_path / "prep.json")]) == 0
    raw, prep = (json.loads((tmp_path / n).read_text()) for n in ("raw.json", "prep.json"))
    for key in ("overall", "perAnswerType", "perQuestionType", "questions"):
        assert raw[key] == prep[key], key
    assert raw["unused_predictions"] == len(predictions) - len(subset)


def test_missing_or_malformed_predictions_are_one_error_line(tmp_path, capsys):
    paths, _, predictions = _write(tmp_path)
    paths["predictions"].write_text(json.dumps(predictions[1:]))
    assert main([str(paths["predictions"]), "--annotations", str(paths["annotations"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "1 of" in err and "have no prediction" in err and "\n" not in err
    paths["predictions"].write_text(json.dumps(predictions + predictions[:1]))
    assert main([str(paths["predictions"]), "--annotations", str(paths["annotations"])]) == 2
    assert "repeats question_id" in capsys.readouterr().err


def test_python_dash_m_lxmert_score_is_the_same_command(tmp_path, capsys):
    from lxmert.__main__ import main as cli

    paths, _, _ = _write(tmp_path)
    assert cli(["score", str(paths["predictions"]), "--annotations", str(paths["annotations"]), "--out",
                str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["questions"] > 0
