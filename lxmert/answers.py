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

from .io import InputError, read_json, write_json


# Characters that are deleted or turned into spaces; "." and "'" are handled separately (decimals,
# contractions), and characters outside this set (":", "%", "$", "#", "&", ...) are kept.
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings that annotators type, mapped back to the contraction. Words that are
# also ordinary words without the apostrophe ("its", "well", "were", "ill", "id", "lets") are left alone,
# and so are "im" and "ive": the official list spells them capitalised, so they never match there either.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "couldntve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shouldnt": "shouldn't", "shouldve": "should've", "somebodys": "somebody's", "someones": "someone's",
    "thats": "that's", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "weve": "we've", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whys": "why's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _punctuation(text: str) -> str:
    """A punctuation mark touching a space (or any mark in a text with a digit-comma-digit number
    like 1,000) is deleted, so "1,000" stays one number; otherwise it becomes a space, so "black-white"
    becomes two words. A period is deleted unless a digit follows, which keeps decimals like 2.5."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if delete_all or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _words(text: str) -> str:
    """Lower-case, number words to digits, articles dropped, contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation (whitespace, punctuation, number words, articles,
    contractions), applied to both predictions and the ten human answers before matching."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _words(_punctuation(text))


def official_accuracy(pred: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction: min(1, matches / 3) averaged over the subsets
    that leave out one annotator each (for ten answers: 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4
    matches). Both sides are normalised first."""
    if not answers:
        raise ValueError("official_accuracy needs at least one human answer")
    pred = normalize_answer(pred)
    hits = [normalize_answer(a) == pred for a in answers]
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
