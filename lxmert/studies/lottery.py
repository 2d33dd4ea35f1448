"""Study A, lottery tickets: iterative (or one-shot) pruning with weight rewinding.

For every seed: fine-tune the dense model (studies.dense). Then, per mode, level by level (studies.tickets):
  1. prune the trained model of the previous level (the dense model for the first level, or always
     with the `oneshot` schedule) to the level's sparsity               -> accuracy_pruned
  2. rewind the surviving weights to the rewind point, keep the mask    -> accuracy_rewound
  3. retrain with the mask enforced after every optimizer step          -> accuracy_retrained(_best)
  4. measure the sparsity from the retrained weights themselves, evaluate the best-on-valid weights on
     every split and write their predictions.

models/<exp>/seed_<s>/<schedule>_<scope>/<mode>/level_<pct>/
    level.json (target, parent level), mask.safetensors (bit-packed), run/ (training run), result.json
Units of work (core.scheduler): with the iterative schedule the levels of one (seed, mode) form one unit
(each level needs the one before); with the one-shot schedule every level is a unit. A level with a
result.json is finished; an interrupted level resumes its run.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Optional

from ..core import distributed as dist
from ..core import paths
from ..core.config import Config
from ..core.errors import InputError
from ..core.files import read_json, read_object, write_json
from ..core.logs import metrics_log
from ..core.scheduler import Unit, run_units
from ..core.settings import DATA_KEYS, TRAIN_KEYS, model_keys, unit_settings
from ..modeling.vqa import VQAModel
from ..prune.magnitude import check_level, prune
from ..prune.masks import full_mask, load_mask_for, measure_weights
from ..prune.prunable import PrunableTensor, prunable_tensors
from ..prune.structure import check_granularity, gradient_importance, prune_n_m, prune_structured, structure_groups
from ..train.checkpoints import drop_weights, load_weights
from .context import Context, tables_lock
from .dense import study_a_units, write_finetune
from .lottery_report import lottery_result, write_lottery
from .rows import LEVEL_KEYS, LevelRow, as_json, complete, measured
from .tickets import Mask, retrain_ticket, rewind_point

log = logging.getLogger("lxmert")


class LotteryChain:
    """The levels of one (seed, mode): each level is pruned from its parent (the previous level when
    iterative, the dense model when one-shot)."""

    def __init__(self, ctx: Context, seed: int, mode: str):
        self.ctx, self.seed, self.mode = ctx, seed, mode
        lc = ctx.cfg.lottery
        self.name = paths.chain(seed, lc.schedule, lc.scope, mode, paths.structure_tag(lc.granularity, lc.importance,
                                                                                      lc.group))
        self.folder = ctx.paths.unit(self.name)
        self.dense_run = ctx.paths.run(paths.dense(seed))

    @functools.cached_property
    def model(self) -> VQAModel:
        return self.ctx.new_model(self.seed)

    @property
    def prunable(self) -> list[PrunableTensor]:
        lc = self.ctx.cfg.lottery
        return prunable_tensors(self.model, lc.prunable, lc.prune_all_parameters)

    def parent(self, index: int) -> Optional[float]:
        lc = self.ctx.cfg.lottery
        return None if lc.schedule == "oneshot" or index == 0 else lc.levels[index - 1]

    def level_folder(self, level: float) -> Path:
        return self.ctx.paths.unit(self.unit_name(level))

    def unit_name(self, level: float) -> str:
        return paths.level(self.name, level)

    # -- consistency -----------------------------------------------------------------------------
    def check(self) -> None:
        """Before any work: the largest level keeps some weight, and no level is reused from another parent."""
        lc = self.ctx.cfg.lottery
        sizes = [self.model.get_parameter(t.name).numel() for t in self.prunable]
        check_level(sizes, max(lc.levels), lc.scope, "lottery.levels")
        check_granularity(self.model, self.prunable, lc.granularity, lc.group)
        self.check_parents()

    def check_parents(self) -> None:
        """A level already pruned from another parent (levels inserted into an iterative chain) cannot be
        reused: its mask depends on every level before it."""
        for index, level in enumerate(self.ctx.cfg.lottery.levels):
            path = self.level_folder(level) / paths.LEVEL
            if path.exists():
                recorded = read_object(path, ("target", "parent"), "level record")
                if recorded["parent"] != self.parent(index):
                    was = "the dense model" if recorded["parent"] is None else f"level {recorded['parent']}"
                    now = "the dense model" if self.parent(index) is None else f"level {self.parent(index)}"
                    raise InputError(f"{path}: level {level} was pruned from {was}, lottery.levels now prunes it "
                                     f"from {now}; add levels only after the last one, or start a new experiment "
                                     f"(experiment=NEW_NAME)")

    def settings(self) -> dict:
        lc = self.ctx.cfg.lottery
        keys = DATA_KEYS + model_keys() + TRAIN_KEYS + ["lottery.schedule", "lottery.scope", "lottery.rewind_steps",
                                                        "lottery.prune_from", "lottery.prunable", "lottery.enforce_masks",
                                                        "lottery.prune_all_parameters", "lottery.original_high_level",
                                                        "lottery.granularity"]
        if lc.granularity in ("heads", "neurons"):
            keys += ["lottery.importance"] + (["lottery.importance_batches"] if lc.importance == "gradient" else [])
        elif lc.granularity == "n_m":
            keys += ["lottery.group"]
        return unit_settings(self.ctx.cfg, keys)

    def prune(self, model: VQAModel, current: Mask, level: float) -> Mask:
        """The level's mask from the trained weights in `model` (studies.tickets calls it once per level)."""
        cfg, lc, prunable = self.ctx.cfg, self.ctx.cfg.lottery, self.prunable
        if lc.granularity == "weights":
            return prune(self.mode, model, prunable, current, level, lc.scope, seed=self.seed, salt=level,
                         mirrored=lc.original_high_level == "mirrored")
        if lc.granularity == "n_m":
            return prune_n_m(self.mode, model, prunable, current, level, lc.group, seed=self.seed, salt=level)
        importance = None
        if lc.importance == "gradient":
            importance = gradient_importance(model, structure_groups(model, lc.granularity, prunable),
                                             *self.ctx.importance_batches(model, self.seed, lc.importance_batches,
                                                                          cfg.train.loss))
        return prune_structured(self.mode, model, prunable, current, level, lc.granularity, lc.scope,
                                seed=self.seed, salt=level, importance=importance)

    # -- the work --------------------------------------------------------------------------------
    def finished(self, level: float) -> bool:
        return complete(self.level_folder(level) / paths.RESULT, LevelRow, self.ctx.splits, "level result")

    def units(self) -> list[Unit]:
        lc, dense = self.ctx.cfg.lottery, (paths.dense(self.seed),)
        if lc.schedule == "oneshot":
            return [Unit(name=self.unit_name(level), folder=self.level_folder(level),
                         work=lambda i=i, level=level: self.level(i, level),
                         finished=lambda level=level: self.finished(level), settings=self.settings(), needs=dense,
                         check=self.check, release=lambda level=level: self.release(level),
                         cleanup=(self.ctx.paths.predictions(self.unit_name(level)),))
                    for i, level in enumerate(lc.levels)]
        return [Unit(name=self.name, folder=self.folder, work=self.levels,
                     finished=lambda: all(self.finished(level) for level in lc.levels), settings=self.settings(),
                     needs=dense, check=self.check, release=self.release,
                     cleanup=tuple(self.ctx.paths.predictions(self.unit_name(level)) for level in lc.levels))]

    def levels(self) -> None:
        for index, level in enumerate(self.ctx.cfg.lottery.levels):
            self.level(index, level)
            self.release()

    def release(self, level: Optional[float] = None) -> None:
        """checkpoints.keep minimal: a finished level keeps its mask, result and predictions; of its weights
        only the final ones of an iterative chain's last finished level stay (the next level, or a level
        added to the grid later, is pruned from them). A one-shot level is a unit of its own (`level`): it
        drops its own weights only, under its own lock."""
        if self.ctx.cfg.checkpoints.keep == "all":
            return
        if level is not None:
            if self.finished(level):
                drop_weights(paths.Run(self.level_folder(level) / paths.RUN), "best", "final")
            return
        lc = self.ctx.cfg.lottery
        done = [level for level in lc.levels if self.finished(level)]
        for level in done:
            last = lc.schedule == "iterative" and level == done[-1]
            drop_weights(paths.Run(self.level_folder(level) / paths.RUN), *(("best",) if last else ("best", "final")))

    def _start(self, index: int) -> tuple[Mask, Path]:
        """The mask and trained weights a level is pruned from."""
        parent = self.parent(index)
        if parent is None:
            return full_mask(self.model, self.prunable), self.dense_run.weights(self.ctx.cfg.lottery.prune_from)
        folder = self.level_folder(parent)
        mask = load_mask_for(folder / paths.MASK, self.model, [t.name for t in self.prunable])
        return mask, paths.Run(folder / paths.RUN).final

    def level(self, index: int, level: float) -> dict:
        cfg, folder, name = self.ctx.cfg, self.level_folder(level), self.unit_name(level)
        if self.finished(level):
            return read_json(folder / paths.RESULT)
        started = time.time()
        current, trained = self._start(index)
        rewind = rewind_point(self.ctx, self.seed, self.dense_run)
        model, prunable = self.model, self.prunable
        tag = f"seed {self.seed} {self.mode} {100 * level:g}%"
        ticket = retrain_ticket(
            self.ctx, model, self.seed, folder, prunable, trained, rewind=rewind, loss=cfg.train.loss, tag=tag,
            prune=lambda m: self.prune(m, current, level),
            enforce=cfg.lottery.enforce_masks,
            record={"target": level, "parent": self.parent(index)})
        report = measure_weights(model, prunable)
        load_weights(model, paths.Run(folder / paths.RUN).best)
        tests = self.ctx.evaluate_and_predict(model, name)
        summary = ticket.summary
        row = LevelRow(mode=self.mode, seed=self.seed, target_sparsity=level, parent=self.parent(index),
                       **measured(report), accuracy_pruned=ticket.accuracy_pruned,
                       accuracy_rewound=ticket.accuracy_rewound, accuracy_retrained=summary["final"]["overall"],
                       accuracy_retrained_best=summary["best"]["overall"], best_epoch=summary["best_epoch"],
                       retrained_by_type=summary["final"],
                       tests={k: v for k, v in tests.items() if k != cfg.data.valid}, splits=self.ctx.splits,
                       seconds=round(time.time() - started, 1), schedule=cfg.lottery.schedule,
                       scope=cfg.lottery.scope, environment=self.ctx.environment)
        if dist.is_main():
            write_json(folder / paths.SPARSITY, report)
            write_json(folder / paths.RESULT, as_json(row))
        log.info("%s: pruned %.2f, rewound %.2f, retrained %.2f (best %.2f), measured sparsity %.4f", tag,
                 row.accuracy_pruned, row.accuracy_rewound, row.accuracy_retrained, row.accuracy_retrained_best,
                 row.measured_sparsity)
        metrics_log({"event": "level", **as_json(row)})
        return as_json(row)


def lottery_units(ctx: Context) -> tuple[list[Unit], list[LotteryChain]]:
    cfg = ctx.cfg
    chains = [LotteryChain(ctx, seed, mode) for seed in cfg.seeds for mode in cfg.lottery.modes]
    units = study_a_units(ctx) + [u for chain in chains for u in chain.units()]
    return units, chains


def run_lottery(cfg: Config) -> Optional[dict]:
    ctx = Context.load(cfg)
    units, chains = lottery_units(ctx)
    if not run_units(units, cfg.experiment):
        return None
    with tables_lock(cfg):
        finetune = write_finetune(ctx)
        rows = [read_object(c.level_folder(level) / paths.RESULT, LEVEL_KEYS, "level result")
                for c in chains for level in cfg.lottery.levels]
        result = lottery_result(cfg, finetune, rows)
        result["environment"] = ctx.environment
        if dist.is_main():
            write_lottery(cfg, result)
    return result
