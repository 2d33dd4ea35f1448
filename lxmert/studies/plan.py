"""What a config costs before it runs: `python -m lxmert plan --config X [--samples-per-second N] [--processes N]`.

Every unit of the study (dense fine-tunes, levels, stage 1/2/3 runs, controls, tickets, question-only models),
its epochs and training samples, the time at a throughput, and the disk each unit keeps at the end and needs
while it runs, under the config's checkpoints.keep; the study's disk at its end and at its peak.

Sizes come from the model the config builds (on PyTorch's meta device: shapes without memory), question counts
from the prepared files when they are there, else from the published sizes below (said in the output). Disk is
counted as float32 weights (4 bytes), float32 AdamW moments (8 bytes per trained weight) and bit-packed masks;
bench/rehearsal.py measures it at base size on the CPU (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..core.config import Config
from ..core.files import read_json
from ..core.paths import chain, dense, level, question_only
from ..embedded.generator import STUDY_SPLITS
from ..modeling.vqa import VQAModel, encoder_config, pretrained_config
from ..prune.prunable import prunable_tensors
from .debias import grid

# Questions per split of the real datasets where the prepared files are not there (yet): VQA v2 in LXMERT's
# files (train 443,757 and val 214,354 questions, visualqa.org; minival 25,994, LXMERT README; nominival = val
# minus minival); VQA-CP v2 train 438,183 and test 219,928 (Agrawal et al. 2018), cp_val carved as 5 % of the
# training images (data/README.md: about 5 % of the questions); VQA-VS train 461,124, val 32,723, IID test
# 164,264 (Si et al. 2022, the VQA-VS README); its nine OOD sets are subsets of the IID test, counted at its size.
PUBLISHED = {"train": 443_757, "nominival": 188_360, "minival": 25_994, "test": 447_793,
             "nominival_train": 169_524, "nominival_heldout": 18_836,  # nominival's images carved 90 / 10 %
             "cp_train": 416_274, "cp_val": 21_909, "cp_test": 219_928,
             "val": 32_723, "test_iid": 164_264}
ANSWERS = {"vqa_v2": 3_129, "vqa_cp_v2": 2_274, "vqa_vs": 2_486}  # LXMERT's vocabulary; Si et al.'s counts
# The throughput the plan assumes unless told: the target of docs/PERFORMANCE.md for base-size bf16 training on
# one H100 (not measured: no GPU has been lent to this project). Evaluation (forward only) at 3x that.
TARGET_SAMPLES_PER_SECOND = 2_500
EVAL_SPEEDUP = 3


@dataclass
class Sizes:
    """Parameter counts of the model and of what the study trains or masks."""

    params: int
    head: int
    prunable: int  # the study's prunable (or masked) set

    def weights(self) -> int:
        return 4 * self.params

    def mask(self) -> int:
        return math.ceil(self.prunable / 8)


@dataclass
class Cost:
    unit: str
    kind: str
    epochs: int
    samples: int
    eval_samples: int
    keeps: int  # bytes left on disk when the study is done
    running: int  # bytes the unit needs on disk while it runs (checkpoints, best, final), beyond what it keeps

    def hours(self, samples_per_second: float) -> float:
        return (self.samples + self.eval_samples / EVAL_SPEEDUP) / samples_per_second / 3600


@dataclass
class Plan:
    config: str
    study: str
    units: list[Cost]
    shared: int  # seed-level files (initial weights)
    counts: dict[str, int]
    counted_from: str
    sizes: Sizes
    notes: list[str] = field(default_factory=list)

    def end(self) -> int:
        return self.shared + sum(u.keeps for u in self.units)

    def peak(self, processes: int) -> int:
        """The end total plus what the `processes` largest running units hold at once (an upper bound)."""
        running = sorted((u.running for u in self.units), reverse=True)[:processes]
        return self.end() + sum(running)


def _skeleton(cfg: Config, vocab: int, feat_dim: int, answers: int):
    """The model the config builds, on the meta device (its shapes, no memory, no weights read)."""
    from transformers import LxmertModel, VisualBertModel

    m = cfg.model
    config = pretrained_config(m) if m.pretrained and Path(m.pretrained).is_dir() else None
    with torch.device("meta"):
        encoder = (LxmertModel if m.family == "lxmert" else VisualBertModel)(
            config or encoder_config(m, vocab, feat_dim))
        return VQAModel(encoder, m.family, answers, m.head)


def _counts(cfg: Config) -> tuple[dict[str, int], str]:
    """Questions per split: the prepared files, the embedded config, or the published sizes."""
    d = cfg.data
    names = [*d.train, d.valid, *d.test]
    if d.dataset == "embedded":
        return {n: getattr(d.embedded, STUDY_SPLITS[n][0]) for n in names}, "the embedded config"
    root = Path(d.root)
    if all((root / f"{n}.json").exists() for n in names):
        return ({n: len(read_json(root / f"{n}.json", "question file")) for n in names},
                f"the prepared files in {root}")
    out = {}
    for n in names:
        out[n] = PUBLISHED["test_iid"] if n.startswith("ood_") else PUBLISHED.get(n, 0)
    return out, "published sizes (the prepared files are not there): lxmert/studies/plan.py PUBLISHED"


def _sizes(cfg: Config, patterns: list[str], all_parameters: bool) -> tuple[Sizes, list[str]]:
    notes = []
    d = cfg.data
    if d.dataset == "embedded":
        vocab, feat, answers = 200, d.embedded.feat_dim, 40
        notes.append("embedded: vocabulary and answers estimated (200, 40); they do not change the disk much")
    else:
        vocab, feat = 30_522, 2_048
        vocab_file = Path(d.root) / d.ans2label
        answers = len(read_json(vocab_file, "answer vocabulary")) if vocab_file.exists() else \
            ANSWERS.get(cfg.experiment.removesuffix("_original").removesuffix("_visualbert"), 3_129)
        if not vocab_file.exists():
            notes.append(f"{answers:,} answers assumed ({vocab_file} is not there)")
    model = _skeleton(cfg, vocab, feat, answers)
    prunable = prunable_tensors(model, patterns, all_parameters)
    count = sum(model.get_parameter(t.name).numel() for t in prunable)
    head = sum(p.numel() for p in model.head.parameters())
    return Sizes(sum(p.numel() for p in model.parameters()), head, count), notes


def _run_bytes(s: Sizes, trained: Optional[int] = None, extra: int = 0) -> int:
    """A training run's files while it runs: two checkpoints at a time (weights + AdamW moments of what it
    trains, `extra` bytes of its own), the best and the final weights."""
    trained = s.params if trained is None else trained
    checkpoint = s.weights() + extra + 8 * trained
    return 2 * checkpoint + 2 * (s.weights() + extra)


def plan_lottery(cfg: Config, counts: dict[str, int], s: Sizes) -> list[Cost]:
    lc, minimal = cfg.lottery, cfg.checkpoints.keep == "minimal"
    train = sum(counts[n] for n in cfg.data.train)
    evals = counts[cfg.data.valid] * cfg.train.epochs + sum(counts.values()) - train
    out = []
    for seed in cfg.seeds:
        keep = 2 * s.weights() + (s.weights() if lc.rewind_steps else 0)
        out.append(Cost(dense(seed), "dense", cfg.train.epochs, train * cfg.train.epochs, evals, keep,
                        _run_bytes(s)))
        if cfg.blind.lxmert:
            out.append(Cost(question_only(seed, cfg.train.loss), "question_only", cfg.train.epochs,
                            train * cfg.train.epochs, evals, 0 if minimal else 2 * s.weights(), _run_bytes(s)))
        for mode in lc.modes:
            name = chain(seed, lc.schedule, lc.scope, mode)
            for i, value in enumerate(lc.levels):
                last = lc.schedule == "iterative" and i == len(lc.levels) - 1
                weights = 0 if minimal and not last else s.weights() if minimal else 2 * s.weights()
                # an iterative chain keeps its parent level's final weights until the next level is done
                out.append(Cost(level(name, value), "level", cfg.train.epochs, train * cfg.train.epochs,
                                evals + counts[cfg.data.valid], s.mask() + weights,
                                _run_bytes(s) + (s.weights() if lc.schedule == "iterative" else 0)))
    return out


def plan_debias(cfg: Config, counts: dict[str, int], s: Sizes) -> list[Cost]:
    dc, minimal = cfg.debias, cfg.checkpoints.keep == "minimal"
    train = sum(counts[n] for n in cfg.data.train)
    tests = sum(counts.values()) - train
    out = []
    scores = 4 * s.prunable  # stage 2 trains a float score per masked weight
    for seed in cfg.seeds:
        for p in grid(cfg, seed):
            if p.kind == "stage1":
                keep = 2 * s.weights() + (s.weights() if p.stage1_loss == "bce" and cfg.lottery.rewind_steps else 0)
                out.append(Cost(p.name, "stage 1", cfg.train.epochs, train * cfg.train.epochs,
                                counts[cfg.data.valid] * cfg.train.epochs + 2 * tests, keep, _run_bytes(s)))
            elif p.kind == "compress":
                e2, e3 = dc.stage2_epochs, dc.stage3_epochs if dc.stage3 else 0
                compact = 2 * s.mask() + 2 * 4 * s.head
                stage2 = _run_bytes(s, trained=s.prunable + s.head, extra=scores) + 2 * s.weights()
                # stage 3 runs beside stage 2's run (best and final weights with scores), released with the unit
                stage3 = _run_bytes(s) + 2 * (s.weights() + scores) if dc.stage3 else 0
                keep = compact if minimal else compact + 2 * (s.weights() + scores) + 2 * s.weights() + \
                    (2 * s.weights() if dc.stage3 else 0)
                out.append(Cost(p.name, "stage 2 + 3" if dc.stage3 else "stage 2", e2 + e3, train * (e2 + e3),
                                counts[cfg.data.valid] * (e2 + e3) + 2 * tests * (2 if dc.stage3 else 1), keep,
                                max(stage2, stage3 + 2 * s.weights())))
            else:
                epochs = dc.extra_epochs() if p.kind == "control" else cfg.train.epochs
                keep = (s.mask() if p.kind == "lottery" else 0) + (0 if minimal else 2 * s.weights())
                out.append(Cost(p.name, p.kind, epochs, train * epochs, counts[cfg.data.valid] * epochs + 2 * tests,
                                keep, _run_bytes(s)))
    return out


def plan(cfg: Config, study: str, config_name: str = "") -> Plan:
    """The plan of a config's study ('lottery' or 'debias')."""
    counts, source = _counts(cfg)
    patterns = list(cfg.lottery.prunable if study == "lottery" else cfg.debias.prunable)
    sizes, notes = _sizes(cfg, patterns, study == "lottery" and cfg.lottery.prune_all_parameters)
    units = plan_lottery(cfg, counts, sizes) if study == "lottery" else plan_debias(cfg, counts, sizes)
    shared = len(cfg.seeds) * sizes.weights()  # every seed's initial weights (the rewind point)
    return Plan(config_name, study, units, shared, counts, source, sizes, notes)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def render(p: Plan, samples_per_second: float, source: str, processes: int) -> str:
    """The plan as Markdown: one row per kind of unit, then the totals."""
    kinds: dict[str, list[Cost]] = {}
    for u in p.units:
        kinds.setdefault(u.kind, []).append(u)
    lines = [f"# plan of {p.config or 'the config'} ({p.study})", "",
             f"Questions per split ({p.counted_from}): " + ", ".join(f"{k} {v:,}" for k, v in p.counts.items()),
             f"Model: {p.sizes.params:,} parameters, {p.sizes.prunable:,} in the prunable set; "
             f"{samples_per_second:,.0f} training samples/s ({source}), evaluation at {EVAL_SPEEDUP}x that.", ""]
    lines += ["| units | kind | epochs each | training samples | hours | kept at the end | needed while running |",
              "|---|---|---|---|---|---|---|"]
    for kind, us in kinds.items():
        lines.append(f"| {len(us)} | {kind} | {us[0].epochs} | {sum(u.samples for u in us):,} | "
                     f"{sum(u.hours(samples_per_second) for u in us):,.1f} | {_gb(sum(u.keeps for u in us))} | "
                     f"{_gb(max(u.running for u in us))} each |")
    total = sum(u.hours(samples_per_second) for u in p.units)
    lines += ["", f"Total: {len(p.units)} units, {sum(u.epochs for u in p.units):,} epochs, "
                  f"{sum(u.samples for u in p.units):,} training samples, {total:,.1f} GPU-hours at "
                  f"{samples_per_second:,.0f} samples/s; disk {_gb(p.end())} at the end (seeds' initial weights "
                  f"{_gb(p.shared)} included), at most {_gb(p.peak(processes))} at the peak with {processes} "
                  "process(es) running units at once."]
    lines += [f"Note: {n}." for n in p.notes]
    return "\n".join(lines) + "\n"
