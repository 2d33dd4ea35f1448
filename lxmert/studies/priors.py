"""Answers from the question type alone, the baselines a shifted test split must be read against (Teney et al.
2020, "On the value of out-of-distribution testing"): a debiasing method's gain on VQA-CP is worth only what such
a rule cannot get.

  inverted training prior   per question type, the training split's least frequent answer (among the answers
                            that are the majority answer of some training question of the type): for yes/no
                            types the training minority, which VQA-CP's regrouping makes the test majority
  test majority (oracle)    per question type, the test split's own most frequent answer: an upper bound for any
                            rule that answers from the question type, which no model can know
No training, no image: computed from the question files of the experiment.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from ..data.datasets import Split, VQADataset
from ..train.evaluation import accuracy

INVERTED, ORACLE = "inverted training prior", "test majority per question type (oracle)"


def majority_answers(split: Split) -> np.ndarray:
    """The highest-scoring answer of every question (-1 for a question without an answer in the vocabulary)."""
    out = np.full(len(split), -1, np.int64)
    for i in range(len(split)):
        a, b = split.label_ptr[i], split.label_ptr[i + 1]
        if b > a:
            out[i] = int(split.label_idx[a:b][np.argmax(split.label_score[a:b])])
    return out


def _counts(split: Split) -> dict[str, Counter]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for qtype, answer in zip(split.question_types, majority_answers(split)):
        if answer >= 0:
            counts[qtype][int(answer)] += 1
    return counts


def _answer_by_type(split: Split, choice: dict[str, int]) -> np.ndarray:
    """One answer per question from its type (-1, never right, for a type the rule has no answer for)."""
    return np.array([choice.get(t, -1) for t in split.question_types], np.int64)


def prior_rules(train: VQADataset, tests: dict[str, VQADataset]) -> dict[str, dict[str, dict]]:
    """{rule: {split: accuracy overall and per answer type}} on every labelled test split."""
    trained = _counts(train.split)
    # the least frequent answer of a type; ties to the lowest answer index, like every argmax here
    inverted = {t: min(c, key=lambda a: (c[a], a)) for t, c in trained.items()}
    out: dict[str, dict[str, dict]] = {INVERTED: {}, ORACLE: {}}
    for name, ds in tests.items():
        if not ds.split.has_labels:
            continue
        oracle = {t: min(c, key=lambda a: (-c[a], a)) for t, c in _counts(ds.split).items()}
        out[INVERTED][name] = accuracy(ds, _answer_by_type(ds.split, inverted))
        out[ORACLE][name] = accuracy(ds, _answer_by_type(ds.split, oracle))
    return out
