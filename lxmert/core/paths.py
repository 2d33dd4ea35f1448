"""Every path an experiment writes, in one place (as OpenLTH's paths.py).

models/<experiment>/                      units of work and what they share
  data.json                               the data files the experiment was trained on (sha256)
  seed_<s>/init.safetensors               weights before fine-tuning (the default rewind point)
  seed_<s>/blind_<loss>.json              question-only baseline of the seed and loss
  <unit>/                                 one unit of work: settings.json, result.json, run/ ...
logs/<experiment>.log, .jsonl             readable log and JSON-lines metrics
result/<experiment>/                      tables, plots, result JSON
  predictions/<unit>/<split>.json         answers of a unit's best-on-valid model

Unit names are paths relative to models/<experiment>/ and name the unit's predictions folder too:
  seed_<s>/dense                                        study A's dense fine-tune
  seed_<s>/question_only_<loss>                         the same model fine-tuned with the image removed
  seed_<s>/<schedule>_<scope>[<tag>]/<mode>[/level_<pct>]  study A's pruning chain (iterative) or level (one-shot);
                                                        <tag> names a structured granularity (structure_tag)
  seed_<s>/stage1_<loss>                                study B, stage 1
  seed_<s>/<s1>-<s2>/<sparsity>                         study B, stages 2 and 3 (stage2/, stage3/)
  seed_<s>/control_<s1>-<s2>                            study B, same-compute dense control
  seed_<s>/lottery/<sparsity>                           study B, lottery-ticket baseline (level_<pct>/)

A training run's folder (train.trainer) holds ckpt-<step>/ while it trains, best/ and final/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config, level_name

MODELS, RESULTS, LOGS = Path("models"), Path("result"), Path("logs")
# Files of a unit folder (or of a stage folder inside one).
SETTINGS = "settings.json"
RESULT = "result.json"
MASK = "mask.safetensors"
LEVEL = "level.json"
SPARSITY = "sparsity.json"
RUN = "run"
LOCK = ".lock"
# Files of a study-B stage-2 folder: the final and the best-on-valid weights with the learned mask baked in.
PRUNED = "pruned.safetensors"
BEST_PRUNED = "best_pruned.safetensors"
# ... and what they are rebuilt from once dropped (checkpoints.keep minimal): the stage-1 final weights times
# the mask, with the answer head stage 2 trained (final.head.* and best.head.*).
BEST_MASK = "best_mask.safetensors"
HEADS = "heads.safetensors"
CHECKPOINT_PREFIX = "ckpt-"


@dataclass(frozen=True)
class Run:
    """The folder of one training run."""

    folder: Path

    @property
    def best(self) -> Path:
        return self.folder / "best" / "model.safetensors"

    @property
    def final(self) -> Path:
        return self.folder / "final" / "model.safetensors"

    @property
    def summary(self) -> Path:
        return self.folder / "final" / "summary.json"

    @property
    def rewind(self) -> Path:
        """Weights after `lottery.rewind_steps` steps (only when a run is asked to capture them)."""
        return self.folder / "rewind.safetensors"

    def weights(self, which: str) -> Path:
        """'best' or 'final' weights."""
        return {"best": self.best, "final": self.final}[which]

    def checkpoint(self, step: int, epoch: int, batch_in_epoch: int) -> Path:
        return self.folder / f"{CHECKPOINT_PREFIX}{step:09d}-{epoch:04d}-{batch_in_epoch:07d}"

    def checkpoints(self) -> list[Path]:
        """The published checkpoints, oldest first (names sort by step)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


class Experiment:
    """The output paths of one experiment, derived from its name."""

    def __init__(self, cfg: Config):
        self.name = cfg.experiment
        self.models = MODELS / cfg.experiment
        self.results = RESULTS / cfg.experiment
        self.log = LOGS / f"{cfg.experiment}.log"
        self.metrics = LOGS / f"{cfg.experiment}.jsonl"

    @property
    def data_record(self) -> Path:
        return self.models / "data.json"

    @property
    def tables_lock(self) -> Path:
        return self.results / ".tables.lock"

    def unit(self, name: str) -> Path:
        return self.models / name

    def run(self, name: str, *stage: str) -> Run:
        """The training run of a unit (of a stage folder inside it: 'stage2', 'level_50', ...)."""
        return Run(self.unit(name).joinpath(*stage, RUN))

    def predictions(self, unit: str) -> Path:
        """result/<experiment>/predictions/<unit>/: one <split>.json per evaluated split."""
        return self.results / "predictions" / unit

    def init(self, seed: int) -> Path:
        return self.unit(seed_name(seed)) / "init.safetensors"

    def blind(self, seed: int, loss: str) -> Path:
        return self.unit(seed_name(seed)) / f"blind_{loss}.json"

    def result(self, file: str) -> Path:
        return self.results / file


# -- unit names ------------------------------------------------------------------------------------------

def seed_name(seed: int) -> str:
    return f"seed_{seed}"


def dense(seed: int) -> str:
    return f"{seed_name(seed)}/dense"


def structure_tag(granularity: str, importance: str = "magnitude", group: int = 4) -> str:
    """What names a structured study A apart from the unstructured one, in its chain folders and result files:
    '' (weights), '_heads' / '_neurons' (+ '_gradient' for Michel et al.'s importance), '_nm<M>' (N:M)."""
    if granularity == "weights":
        return ""
    if granularity == "n_m":
        return f"_nm{group}"
    return f"_{granularity}" + ("_gradient" if importance == "gradient" else "")


def chain(seed: int, schedule: str, scope: str, mode: str, tag: str = "") -> str:
    return f"{seed_name(seed)}/{schedule}_{scope}{tag}/{mode}"


def level(chain_name: str, level_value: float) -> str:
    return f"{chain_name}/{level_name(level_value)}"


def question_only(seed: int, loss: str) -> str:
    """The VQA model fine-tuned with the image removed (the question-only LXMERT baseline)."""
    return f"{seed_name(seed)}/question_only_{loss}"


def stage1(seed: int, loss: str) -> str:
    return f"{seed_name(seed)}/stage1_{loss}"


def compress(seed: int, s1: str, s2: str, tag: str) -> str:
    return f"{seed_name(seed)}/{s1}-{s2}/{tag}"


def control(seed: int, s1: str, s2: str) -> str:
    return f"{seed_name(seed)}/control_{s1}-{s2}"


def ticket(seed: int, tag: str) -> str:
    """Study B's lottery-ticket baseline at one sparsity."""
    return f"{seed_name(seed)}/lottery/{tag}"
