"""Answer vocabulary, the VQA soft-score rule and the official answer normalisation and accuracy.

The normalisation follows the VQA evaluation specification (visualqa.org/evaluation): answers are
compared only after it, so "Two", "two." and "2" are the same answer, and the soft labels the model
trains on are computed from normalised answers in the same way the official score is.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ..core.errors import InputError
from ..core.files import read_json, write_json

# The official VQA evaluation's normalisation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py,
# VQAEval.__init__, processPunctuation, processDigitArticle), followed exactly, quirks included.
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# vqaEval.py's periodStrip is "(?!<=\d)(\.)(?!\d)" (a lookahead that is always true, then: a period not followed
# by a digit) and is applied with sub("", text, re.UNICODE): re.UNICODE lands in `count`, so at most 32 periods
# are removed. Both kept as they are.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# vqaEval.py's contraction table, all 120 entries (applied after lower-casing, so the capitalised keys
# never match; "somebody'd" really maps to "somebodyd" there).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """vqaEval.py processPunctuation: a mark next to a space (or any mark in a text holding a digit-comma-digit
    number) is deleted, otherwise it becomes a space; then up to 32 periods not followed by a digit go."""
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or delete_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py processDigitArticle: lower-case, number words to digits, articles dropped, contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def strip_answer(text: str) -> str:
    """What vqaEval.py does to every answer first: newlines and tabs to spaces, outer whitespace removed."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """The official normalisation of one answer (strip, punctuation, number words, articles, contractions): the
    form soft labels are counted in."""
    return process_digit_article(process_punctuation(strip_answer(answer)))


def official_accuracy(pred: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the human answers, as vqaEval.py evaluate() computes
    it: every answer is stripped; only when the answers are not all identical are they and the prediction
    normalised; then min(1, matches / 3) is averaged over the leave-one-annotator-out subsets."""
    if not answers:
        raise ValueError("official_accuracy needs at least one human answer")
    gts = [strip_answer(a) for a in answers]
    res = strip_answer(pred)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        res = process_digit_article(process_punctuation(res))
    hits = [g == res for g in gts]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(hits)


def soft_score(count: int) -> float:
    """Score of an answer given by `count` of ten annotators: min(1, n/3) averaged over the ten
    leave-one-out subsets, which is exactly 0.3 / 0.6 / 0.9 / 1.0 for n = 1 / 2 / 3 / >= 4."""
    if count <= 0:
        return 0.0
    return min(1.0, round(0.3 * count, 1))


def soft_label(answers: Iterable[str]) -> dict[str, float]:
    """Soft scores of the (already normalised) answers of the annotators."""
    return {a: soft_score(n) for a, n in Counter(answers).items()}


class AnswerVocab:
    """Answer string <-> class index, as in LXMERT's trainval_ans2label.json / label2ans.json."""

    def __init__(self, ans2label: dict[str, int], source: str = "answer vocabulary"):
        labels = sorted(ans2label.values())
        if labels != list(range(len(labels))):
            raise InputError(f"{source}: labels must be 0..{len(labels) - 1} without gaps")
        self.ans2label = dict(ans2label)
        self.label2ans = [""] * len(labels)
        for a, i in ans2label.items():
            self.label2ans[i] = a

    def __len__(self) -> int:
        return len(self.label2ans)

    @classmethod
    def load(cls, path: str | Path) -> "AnswerVocab":
        data = read_json(path, "answer vocabulary")
        if not isinstance(data, dict) or not data:
            raise InputError(f"{path}: expected a non-empty JSON object answer -> label")
        return cls(data, str(path))

    def save(self, folder: str | Path, prefix: str = "trainval") -> None:
        write_json(Path(folder) / f"{prefix}_ans2label.json", self.ans2label)
        write_json(Path(folder) / f"{prefix}_label2ans.json", self.label2ans)

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int) -> "AnswerVocab":
        """Answers counted at least `min_count` times, most frequent first, ties by string: the same
        counts always give the same labels."""
        kept = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
        return cls({a: i for i, a in enumerate(kept)})

    @classmethod
    def from_answers(cls, answers: Iterable[str], min_count: int = 9) -> "AnswerVocab":
        """LXMERT's rule: normalised `multiple_choice_answer` strings (one per question) seen at least
        `min_count` times (9 over VQA v2 train + val gives its 3,129 answers)."""
        return cls.from_counts(Counter(answers), min_count)

    @classmethod
    def build(cls, labels: Iterable[dict[str, float]], min_count: int = 1) -> "AnswerVocab":
        """Answers that are some question's answer (any score) at least `min_count` times, sorted by
        frequency then string, so the vocabulary is deterministic."""
        counts: Counter = Counter()
        for label in labels:
            counts.update(label.keys())
        return cls.from_counts(counts, min_count)
