"""Answer vocabulary and the VQA soft-score rule."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from .io import InputError, read_json, write_json


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
    def build(cls, labels: Iterable[dict[str, float]], min_count: int = 1) -> "AnswerVocab":
        """Answers that are some question's answer (any score) at least `min_count` times, sorted by
        frequency then string, so the vocabulary is deterministic."""
        counts: Counter = Counter()
        for label in labels:
            counts.update(label.keys())
        kept = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
        return cls({a: i for i, a in enumerate(kept)})
