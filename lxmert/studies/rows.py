"""The result rows the studies write (each unit's result.json, gathered into result/<experiment>/*.json):
one dataclass per kind, so what a row holds is written down once. Tables and plots read them back as JSON.

Accuracies are in percent: {"overall", <answer type>..., "questions"} per split. Sparsities are fractions
measured from the saved weights (prune.masks.measure_weights), overall and per modality, with the number of
prunable weights per modality.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.files import read_object
from ..prune.masks import fractions


def required(row: type) -> tuple[str, ...]:
    """The fields every stored row of this kind has (those without a default)."""
    return tuple(f.name for f in dataclasses.fields(row) if f.default is dataclasses.MISSING)


def as_json(row: Any) -> dict:
    """The row as written: every field in order; optional fields (default None) only where set."""
    return {f.name: getattr(row, f.name) for f in dataclasses.fields(row)
            if f.default is dataclasses.MISSING or getattr(row, f.name) is not None}


def complete(path: Path, row: type, splits: list[str], what: str) -> bool:
    """A unit's result.json exists and covers every split of the config (a new test split extends it)."""
    return path.exists() and set(splits) <= set(read_object(path, required(row), what)["splits"])


def measured(report: dict) -> dict:
    """The sparsity fields of a row from a weight report (prune.masks.measure_weights)."""
    return {"measured_sparsity": fractions(report)["overall"], "measured_by_modality": fractions(report),
            "prunable_by_modality": report["prunable_by_modality"]}


@dataclass
class DenseRow:
    """The dense fine-tune of one seed (studies.dense)."""

    seed: int
    loss: str
    final: dict  # validation accuracy of the last epoch
    best: dict  # validation accuracy of the best epoch
    best_epoch: int
    tests: dict  # split -> accuracy of the best-on-valid model
    blind: dict  # split -> accuracy of the question-only model
    splits: list
    seconds: float
    epochs: list  # per epoch: epoch, training loss, validation accuracy
    environment: Optional[dict] = None  # what the unit ran on (core.environment.describe)


@dataclass
class QuestionOnlyRow:
    """The study's model fine-tuned with the image removed (studies.dense.question_only_unit)."""

    seed: int
    loss: str
    final: dict  # split -> accuracy of the last epoch's weights
    best: dict  # split -> accuracy of the best-on-valid weights
    best_epoch: int
    splits: list
    seconds: float
    environment: Optional[dict] = None


@dataclass
class LevelRow:
    """One pruning level of one (seed, mode) of study A (studies.lottery)."""

    mode: str
    seed: int
    target_sparsity: float
    parent: Optional[float]  # the level it was pruned from (None: the dense model)
    measured_sparsity: float
    measured_by_modality: dict
    prunable_by_modality: dict
    accuracy_pruned: float  # validation accuracy of the trained parent with the new mask
    accuracy_rewound: float  # ... rewound to the rewind point, mask applied, before retraining
    accuracy_retrained: float  # ... after retraining (last epoch)
    accuracy_retrained_best: float  # ... best epoch of the retraining
    best_epoch: int
    retrained_by_type: dict
    tests: dict
    splits: list
    seconds: float
    schedule: str
    scope: str
    environment: Optional[dict] = None


@dataclass
class DebiasRow:
    """One model of study B (studies.debias): a stage-1 model, a stage-2 or stage-3 pruned model, a control
    or a lottery ticket. `final` / `best` hold the test splits; `valid` / `valid_best` the validation split."""

    setting: str
    seed: int
    stage: str
    stage1_loss: str
    stage2_loss: Optional[str]
    sparsity_tag: str
    target_sparsity: Any  # a fraction, or {modality: fraction}
    epochs: int  # every training epoch behind the model
    measured_sparsity: float
    measured_by_modality: dict
    prunable_by_modality: dict
    valid_split: str
    valid: float
    valid_best: float
    final: dict
    best: dict
    best_epoch: int
    splits: list
    blind: dict  # loss -> split -> question-only accuracy
    seconds: float
    valid_after_stage2_epochs: Optional[float] = None  # controls: their same-compute point of stage 2
    lottery: Optional[dict] = None  # lottery tickets: how the ticket was made
    environment: Optional[dict] = None


DENSE_KEYS, LEVEL_KEYS, DEBIAS_KEYS = required(DenseRow), required(LevelRow), required(DebiasRow)
QUESTION_ONLY_KEYS = required(QuestionOnlyRow)
