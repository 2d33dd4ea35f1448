"""Score a predictions file with the official VQA accuracy, as the official evaluation code computes it.

    python -m lxmert score PREDICTIONS --annotations ANNOTATIONS.json [--questions QUESTIONS.json] [--out FILE]
    python -m lxmert score PREDICTIONS --prepared data/vqa_v2_raw --split val [--out FILE]

PREDICTIONS is the EvalAI format: a JSON list of {"question_id", "answer"}. ANNOTATIONS are the raw VQA v2
(`{"annotations": [...]}`), VQA-CP v2 or VQA-VS annotation files (a list); QUESTIONS, when given, limits the
scoring to its questions (a VQA-VS OOD set is scored from the IID test's predictions and annotations this
way). A prepared split (python -m lxmert prepare vqa / vqavs) carries the same human answers in
<split>_answers.json. Predictions for questions that are not scored are ignored; a scored question without
a prediction is an error, and so is a question id given twice (in the predictions, annotations or questions),
a field of the wrong type (an answer that is not a string, a list as an answer or question type) or an --out
that cannot be written: one `error:` line naming the file and field, exit code 2, nothing written.

The accuracy follows GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py evaluate() question by
question (lxmert.data.answers.official_accuracy): answers and prediction are stripped; only when the human answers
are not all the same are they and the prediction normalised; min(1, matches / 3) is averaged over the
leave-one-annotator-out subsets. Overall, per answer type and per question type are in percent rounded to two
decimals as vqaEval.py does (Python 2's round: half away from zero on the exact binary value). Prints the
scores and writes them as JSON (default: PREDICTIONS with .scores.json instead of .json).
"""
from __future__ import annotations

import argparse
import errno
import sys
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Optional

from ..core.cli import Parser, check_output
from ..core.errors import InputError, exit_code
from ..core.files import write_json
from .answers import official_accuracy
from .prepare import read_items, read_json_file


def round2(value: float) -> float:
    """vqaEval.py's round(x, 2) under Python 2: half away from zero, on the float's exact value."""
    return float(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def question_id(value: object, where: str) -> int | str:
    """A question id as a dictionary key: an integer (VQA's ids) or a string; anything else (a list, a number
    with a fraction, true/false, which would equal the id 1) is refused naming where it is."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where} field 'question_id' must be an integer (or a string), got {value!r:.40}")
    return value


def load_predictions(path: Path) -> dict:
    data = read_json_file(path, "predictions file")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {{\"question_id\", \"answer\"}} (the EvalAI format)")
    out: dict = {}
    for i, p in enumerate(data):
        if not isinstance(p, dict) or "question_id" not in p or "answer" not in p:
            raise InputError(f"{path}: prediction #{i} is not an object with 'question_id' and 'answer'")
        qid = question_id(p["question_id"], f"{path}: prediction #{i}")
        if not isinstance(p["answer"], str):
            raise InputError(f"{path}: prediction #{i} (question_id {qid}) field 'answer' must be a string, "
                             f"got {p['answer']!r:.40}")
        if qid in out:
            raise InputError(f"{path}: prediction #{i} repeats question_id {qid}")
        out[qid] = p["answer"]
    return out


def _types(item: dict, where: str, default: Optional[str] = None) -> tuple[str, str]:
    """An annotation's or question's (question_type, answer_type): strings, the keys of the per-type scores."""
    out = []
    for key in ("question_type", "answer_type"):
        value = item.get(key, default)
        if not isinstance(value, str):
            raise InputError(f"{where} field '{key}' must be a string, got {value!r:.40}")
        out.append(value)
    return out[0], out[1]


def _annotation(ann: object, i: int, path: Path) -> tuple[int | str, tuple]:
    if not isinstance(ann, dict) or not all(k in ann for k in ("question_id", "answers", "question_type",
                                                               "answer_type")):
        raise InputError(f"{path}: annotation #{i} needs question_id, answers, question_type, answer_type")
    qid = question_id(ann["question_id"], f"{path}: annotation #{i}")
    where = f"{path}: annotation #{i} (question_id {qid})"
    answers = ann["answers"]
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise InputError(f"{where} field 'answers' must be a non-empty list of {{\"answer\": string}}")
    return qid, ([a["answer"] for a in answers], *_types(ann, where))


def raw_truth(annotations: Path, questions: Optional[Path]) -> dict:
    """question_id -> (answers, question type, answer type) from raw annotation (and question) files."""
    items, _ = read_items(annotations, "annotations", "annotations file")
    truth: dict = {}
    for i, ann in enumerate(items):
        qid, record = _annotation(ann, i, annotations)
        if qid in truth:
            raise InputError(f"{annotations}: annotation #{i} repeats question_id {qid} (one annotation per question)")
        truth[qid] = record
    if questions is None:
        return truth
    qs, _ = read_items(questions, "questions", "questions file")
    ids: dict = {}
    for i, q in enumerate(qs):
        if not isinstance(q, dict) or "question_id" not in q:
            raise InputError(f"{questions}: question #{i} is not an object with a 'question_id'")
        qid = question_id(q["question_id"], f"{questions}: question #{i}")
        if qid in ids:
            raise InputError(f"{questions}: question #{i} repeats question_id {qid}")
        ids[qid] = i
    missing = [q for q in ids if q not in truth]
    if missing:
        raise InputError(f"{questions}: {len(missing)} question(s) have no annotation in {annotations} "
                         f"(first: question_id {missing[0]})")
    return {q: truth[q] for q in ids}


def _prepared_file(folder: Path, name: str, what: str, kind: type):
    path = folder / name
    if not path.is_file():
        found = sorted(p.stem for p in folder.glob("*.json") if not p.stem.endswith("_answers") and
                       (folder / f"{p.stem}_answers.json").is_file())
        raise InputError(f"--prepared {folder}: no {name} (the split's {what}); splits with answers there: "
                         f"{', '.join(found) or 'none'}")
    data = read_json_file(path, what)
    if not isinstance(data, kind):
        raise InputError(f"{path}: expected a JSON {'list' if kind is list else 'object'} ({what} as python -m "
                         f"lxmert prepare writes it), got {type(data).__name__}")
    return data


def _human_answers(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise InputError(f"{where} must be a non-empty list of answer strings, got {value!r:.40}")
    return value


def prepared_truth(folder: Path, split: str) -> dict:
    """The same from a prepared split: <split>.json (types) and <split>_answers.json (the human answers)."""
    if not folder.is_dir():
        raise InputError(f"--prepared {folder}: not a folder (a prepared question folder from python -m lxmert "
                         f"prepare)")
    questions = _prepared_file(folder, f"{split}.json", "question file", list)
    answers = _prepared_file(folder, f"{split}_answers.json", "answers side file", dict)
    truth: dict = {}
    for i, q in enumerate(questions):
        where = f"{folder / f'{split}.json'}: question #{i}"
        if not isinstance(q, dict) or "question_id" not in q:
            raise InputError(f"{where} is not an object with a 'question_id'")
        qid = question_id(q["question_id"], where)
        if qid in truth:
            raise InputError(f"{where} repeats question_id {qid}")
        if str(qid) not in answers:
            raise InputError(f"{folder / f'{split}_answers.json'}: no answers for question_id {qid} "
                             f"(question #{i} of {split}.json); prepare the split again")
        human = _human_answers(answers[str(qid)], f"{folder / f'{split}_answers.json'}: question_id {qid}")
        truth[qid] = (human, *_types(q, f"{where} (question_id {qid})", "unknown"))
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
    out = check_output(args.out or predictions_path.with_suffix(".scores.json"), folder=False)
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
    _write(out, result)
    print(f"overall accuracy: {result['overall']:.2f} on {result['questions']} questions")
    for kind in ("perAnswerType", "perQuestionType"):
        print(f"per {'answer' if kind == 'perAnswerType' else 'question'} type:")
        for name, value in result[kind].items():
            print(f"  {name}: {value:.2f}")
    print(f"scores -> {out}")
    return result


def _write(out: Path, result: dict) -> None:
    """The scores file, written whole or not at all; a place the checks before could not see as unwritable
    (a read-only file system, a folder only root may write) is one error naming it, a full disk exit 4."""
    try:
        write_json(out, result)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        raise InputError(f"--out {out}: cannot be written ({e.strerror or type(e).__name__})") from None


def main(argv: Optional[list[str]] = None) -> int:
    parser = Parser(prog="python -m lxmert score", description=__doc__,
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
