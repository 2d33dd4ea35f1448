"""Score a predictions file with the official VQA accuracy, as the official evaluation code computes it.

    python -m lxmert score PREDICTIONS --annotations ANNOTATIONS.json [--questions QUESTIONS.json] [--out FILE]
    python -m lxmert score PREDICTIONS --prepared data/vqa_v2_raw --split val [--out FILE]

PREDICTIONS is the EvalAI format: a JSON list of {"question_id", "answer"}. ANNOTATIONS are the raw VQA v2
(`{"annotations": [...]}`), VQA-CP v2 or VQA-VS annotation files (a list); QUESTIONS, when given, limits the
scoring to its questions (a VQA-VS OOD set is scored from the IID test's predictions and annotations this
way). A prepared split (python -m lxmert prepare vqa / vqavs) carries the same human answers in
<split>_answers.json. Predictions for questions that are not scored are ignored; a scored question without
a prediction is an error.

The accuracy follows GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py evaluate() question by
question (lxmert.data.answers.official_accuracy): answers and prediction are stripped; only when the human answers
are not all the same are they and the prediction normalised; min(1, matches / 3) is averaged over the
leave-one-annotator-out subsets. Overall, per answer type and per question type are in percent rounded to two
decimals as vqaEval.py does (Python 2's round: half away from zero on the exact binary value). Prints the
scores and writes them as JSON (default: PREDICTIONS with .scores.json instead of .json).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Optional

from ..core.errors import InputError, exit_code
from ..core.files import read_json, write_json
from .answers import official_accuracy
from .prepare import read_items


def round2(value: float) -> float:
    """vqaEval.py's round(x, 2) under Python 2: half away from zero, on the float's exact value."""
    return float(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def load_predictions(path: Path) -> dict:
    data = read_json(path, "predictions file")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {{\"question_id\", \"answer\"}} (the EvalAI format)")
    out: dict = {}
    for i, p in enumerate(data):
        if not isinstance(p, dict) or "question_id" not in p or "answer" not in p:
            raise InputError(f"{path}: prediction #{i} is not an object with 'question_id' and 'answer'")
        if not isinstance(p["answer"], str):
            raise InputError(f"{path}: prediction #{i} (question_id {p['question_id']}) has a non-string answer")
        if p["question_id"] in out:
            raise InputError(f"{path}: prediction #{i} repeats question_id {p['question_id']}")
        out[p["question_id"]] = p["answer"]
    return out


def raw_truth(annotations: Path, questions: Optional[Path]) -> dict:
    """question_id -> (answers, question type, answer type) from raw annotation (and question) files."""
    items, _ = read_items(annotations, "annotations", "annotations file")
    truth = {}
    for i, ann in enumerate(items):
        if not isinstance(ann, dict) or not all(k in ann for k in ("question_id", "answers", "question_type",
                                                                   "answer_type")):
            raise InputError(f"{annotations}: annotation #{i} needs question_id, answers, question_type, answer_type")
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers or \
                not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise InputError(f"{annotations}: annotation #{i} (question_id {ann['question_id']}) field 'answers' "
                             f"must be a non-empty list of {{\"answer\": string}}")
        truth[ann["question_id"]] = ([a["answer"] for a in answers], ann["question_type"], ann["answer_type"])
    if questions is None:
        return truth
    qs, _ = read_items(questions, "questions", "questions file")
    ids = [q.get("question_id") if isinstance(q, dict) else None for q in qs]
    missing = [q for q in ids if q not in truth]
    if missing:
        raise InputError(f"{questions}: {len(missing)} question(s) have no annotation in {annotations} "
                         f"(first: question_id {missing[0]})")
    return {q: truth[q] for q in ids}


def prepared_truth(folder: Path, split: str) -> dict:
    """The same from a prepared split: <split>.json (types) and <split>_answers.json (the human answers)."""
    questions = read_json(folder / f"{split}.json", "question file")
    answers = read_json(folder / f"{split}_answers.json", "answers side file")
    truth = {}
    for i, q in enumerate(questions):
        key = str(q.get("question_id"))
        if key not in answers:
            raise InputError(f"{folder / f'{split}_answers.json'}: no answers for question_id {q.get('question_id')} "
                             f"(question #{i} of {split}.json); prepare the split again")
        truth[q["question_id"]] = (answers[key], q.get("question_type", "unknown"), q.get("answer_type", "unknown"))
    return truth


def score(predictions: dict, truth: dict, source: str) -> dict:
    missing = [q for q in truth if q not in predictions]
    if missing:
        raise InputError(f"{source}: {len(missing)} of {len(truth)} scored questions have no prediction "
                         f"(first: question_id {missing[0]})")
    per_question = {q: official_accuracy(predictions[q], answers) for q, (answers, _, _) in truth.items()}
    by_qtype: dict = defaultdict(list)
    by_atype: dict = defaultdict(list)
    for q, (_, qtype, atype) in truth.items():
        by_qtype[qtype].append(per_question[q])
        by_atype[atype].append(per_question[q])
    mean = lambda values: round2(100 * float(sum(values)) / len(values))  # noqa: E731 (vqaEval's expression)
    return {"overall": mean(list(per_question.values())),
            "perAnswerType": {t: mean(v) for t, v in sorted(by_atype.items())},
            "perQuestionType": {t: mean(v) for t, v in sorted(by_qtype.items())},
            "questions": len(truth), "unused_predictions": len(predictions) - len(truth)}


def run(args: argparse.Namespace) -> dict:
    predictions_path = Path(args.predictions)
    predictions = load_predictions(predictions_path)
    if args.prepared:
        if not args.split:
            raise InputError("--prepared needs --split NAME (the split the predictions are for)")
        truth, source = prepared_truth(Path(args.prepared), args.split), f"{args.prepared}/{args.split}"
    elif args.annotations:
        truth = raw_truth(Path(args.annotations), Path(args.questions) if args.questions else None)
        source = str(args.questions or args.annotations)
    else:
        raise InputError("give --annotations FILE (raw VQA v2 / VQA-CP v2 / VQA-VS) or --prepared FOLDER --split NAME")
    if not truth:
        raise InputError(f"{source}: no questions to score")
    result = {"predictions": str(predictions_path), "scored_against": source, **score(predictions, truth, source)}
    out = Path(args.out) if args.out else predictions_path.with_suffix(".scores.json")
    write_json(out, result)
    print(f"overall accuracy: {result['overall']:.2f} on {result['questions']} questions")
    for kind in ("perAnswerType", "perQuestionType"):
        print(f"per {'answer' if kind == 'perAnswerType' else 'question'} type:")
        for name, value in result[kind].items():
            print(f"  {name}: {value:.2f}")
    print(f"scores -> {out}")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lxmert score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="predictions file: [{\"question_id\", \"answer\"}]")
    parser.add_argument("--annotations", help="raw annotation file (VQA v2, VQA-CP v2 or VQA-VS)")
    parser.add_argument("--questions", help="score only the questions of this raw questions file")
    parser.add_argument("--prepared", help="a prepared question folder (instead of raw files)")
    parser.add_argument("--split", help="the prepared split the predictions are for")
    parser.add_argument("--out", help="output JSON (default: PREDICTIONS.scores.json)")
    args = parser.parse_args(argv)
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
