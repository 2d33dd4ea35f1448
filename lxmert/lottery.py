"""The lottery-ticket study: iterative (or one-shot) pruning with weight rewinding.

For every seed: fine-tune the dense model (finetune.py). Then, per mode, level by level:
  1. prune the trained model of the previous level (the dense model for the first level, or always
     with the `oneshot` schedule) to the level's sparsity               -> accuracy_pruned
  2. rewind the surviving weights to the rewind point, keep the mask    -> accuracy_rewound
  3. retrain with the mask enforced after every optimizer step          -> accuracy_retrained(_best)
  4. measure the sparsity from the retrained weights themselves, evaluate the best-on-valid weights on
     every split and write their predictions.

models/<exp>/seed_<s>/<schedule>_<scope>/<mode>/level_<pct>/
    level.json (target, parent level), mask.safetensors (bit-packed), run/ (training run), result.json
Units of work (lxmert.units): with the iterative schedule the levels of one (seed, mode) form one unit
(each level needs the one before); with the one-shot schedule every level is a unit. A level with a
result.json is finished; an interrupted level resumes its run.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import distributed as dist
from .config import DATA_KEYS, TRAIN_KEYS, Config, level_name, model_keys, unit_settings
from .finetune import Context, dense_unit, tables_lock, train_run, write_finetune
from .io import InputError, read_json, read_object, write_json, write_text
from .masks import apply_mask, fractions, full_mask, load_mask_for, measure_weights, save_mask
from .modeling import VQAModel, prunable_tensors
from .pruning import prune
from .training import RunSpec, load_weights, metrics_log
from .units import Unit, run_units

log = logging.getLogger("lxmert")

ROW_KEYS = ("mode", "seed", "target_sparsity", "measured_sparsity", "measured_by_modality", "accuracy_pruned",
            "accuracy_rewound", "accuracy_retrained", "accuracy_retrained_best", "best_epoch", "splits")


class LotteryChain:
    """The levels of one (seed, mode): each level is pruned from its parent (the previous level when
    iterative, the dense model when one-shot)."""

    def __init__(self, ctx: Context, seed: int, mode: str):
        self.ctx, self.seed, self.mode = ctx, seed, mode
        lc = ctx.cfg.lottery
        self.name = f"seed_{seed}/{lc.schedule}_{lc.scope}/{mode}"
        self.folder = ctx.unit_dir(self.name)
        dense = ctx.unit_dir(f"seed_{seed}/dense") / "run"
        self.dense_weights = dense / lc.prune_from / "model.safetensors"
        self.rewind_weights = (ctx.seed_dir(seed) / "init.safetensors" if lc.rewind_steps == 0
                               else dense / "rewind.safetensors")
        self._model: Optional[VQAModel] = None

    @property
    def model(self) -> VQAModel:
        if self._model is None:
            self._model = self.ctx.new_model(self.seed)
        return self._model

    @property
    def prunable(self):
        return prunable_tensors(self.model, self.ctx.cfg.lottery.prunable)

    def parent(self, index: int) -> Optional[float]:
        lc = self.ctx.cfg.lottery
        return None if lc.schedule == "oneshot" or index == 0 else lc.levels[index - 1]

    def level_folder(self, level: float) -> Path:
        return self.folder / level_name(level)

    def unit_name(self, level: float) -> str:
        return f"{self.name}/{level_name(level)}"

    # -- consistency -----------------------------------------------------------------------------
    def check_parents(self) -> None:
        """A level already pruned from another parent (levels inserted into an iterative chain) cannot be
        reused: its mask depends on every level before it."""
        for index, level in enumerate(self.ctx.cfg.lottery.levels):
            path = self.level_folder(level) / "level.json"
            if path.exists():
                recorded = read_object(path, ("target", "parent"), "level record")
                if recorded["parent"] != self.parent(index):
                    was = "the dense model" if recorded["parent"] is None else f"level {recorded['parent']}"
                    now = "the dense model" if self.parent(index) is None else f"level {self.parent(index)}"
                    raise InputError(f"{path}: level {level} was pruned from {was}, lottery.levels now prunes it "
                                     f"from {now}; add levels only after the last one, or start a new experiment "
                                     f"(experiment=NEW_NAME)")

    def settings(self) -> dict:
        keys = DATA_KEYS + model_keys() + TRAIN_KEYS + ["lottery.schedule", "lottery.scope", "lottery.rewind_steps",
                                                        "lottery.prune_from", "lottery.prunable"]
        return unit_settings(self.ctx.cfg, keys)

    # -- the work --------------------------------------------------------------------------------
    def finished(self, level: float) -> bool:
        path = self.level_folder(level) / "result.json"
        return path.exists() and set(self.ctx.splits) <= set(read_object(path, ROW_KEYS, "level result")["splits"])

    def units(self) -> list[Unit]:
        lc, dense = self.ctx.cfg.lottery, (f"seed_{self.seed}/dense",)
        if lc.schedule == "oneshot":
            return [Unit(name=self.unit_name(level), folder=self.level_folder(level),
                         work=lambda i=i, level=level: self.level(i, level),
                         finished=lambda level=level: self.finished(level), settings=self.settings(), needs=dense,
                         check=self.check_parents, cleanup=(self.ctx.predictions_dir(self.unit_name(level)),))
                    for i, level in enumerate(lc.levels)]
        return [Unit(name=self.name, folder=self.folder, work=self.levels,
                     finished=lambda: all(self.finished(level) for level in lc.levels), settings=self.settings(),
                     needs=dense, check=self.check_parents,
                     cleanup=tuple(self.ctx.predictions_dir(self.unit_name(level)) for level in lc.levels))]

    def levels(self) -> None:
        for index, level in enumerate(self.ctx.cfg.lottery.levels):
            self.level(index, level)

    def load_mask(self, path: Path) -> dict:
        return load_mask_for(path, self.model, [t.name for t in self.prunable])

    def _start(self, index: int) -> tuple[dict, Path]:
        """The mask and trained weights a level is pruned from."""
        parent = self.parent(index)
        if parent is None:
            return full_mask(self.model, self.prunable), self.dense_weights
        folder = self.level_folder(parent)
        return self.load_mask(folder / "mask.safetensors"), folder / "run" / "final" / "model.safetensors"

    def level(self, index: int, level: float) -> dict:
        cfg, folder = self.ctx.cfg, self.level_folder(level)
        if self.finished(level):
            return read_json(folder / "result.json")
        started = time.time()
        current, trained = self._start(index)
        self.ctx.init_weights(self.seed)
        model = self.model
        load_weights(model, trained)
        if (folder / "mask.safetensors").exists():
            mask = self.load_mask(folder / "mask.safetensors")
        else:
            if dist.is_main():
                write_json(folder / "level.json", {"target": level, "parent": self.parent(index)})
            mask = dist.broadcast(prune(self.mode, model, self.prunable, current, level, cfg.lottery.scope,
                                        seed=self.seed, salt=level) if dist.is_main() else None)
            if dist.is_main():
                save_mask(folder / "mask.safetensors", mask, {t.name: t.modality for t in self.prunable})
        apply_mask(model, mask)
        acc_pruned = self.ctx.evaluate(model, [cfg.data.valid])[cfg.data.valid]["overall"]
        load_weights(model, self.rewind_weights)
        apply_mask(model, mask)
        acc_rewound = self.ctx.evaluate(model, [cfg.data.valid])[cfg.data.valid]["overall"]
        tag = f"seed {self.seed} {self.mode} {100 * level:g}%"
        spec = RunSpec(folder=folder / "run", seed=self.seed, loss=self.ctx.loss(cfg.train.loss, model, self.seed),
                       epochs=cfg.train.epochs, lr=cfg.train.lr, masks=mask, tag=tag)
        summary = train_run(self.ctx, model, spec)
        measured = measure_weights(model, self.prunable)
        load_weights(model, folder / "run" / "best" / "model.safetensors")
        tests = self.ctx.evaluate_and_predict(model, self.unit_name(level))
        row = {
            "mode": self.mode, "seed": self.seed, "target_sparsity": level, "parent": self.parent(index),
            "measured_sparsity": fractions(measured)["overall"], "measured_by_modality": fractions(measured),
            "prunable_by_modality": measured["prunable_by_modality"],
            "accuracy_pruned": acc_pruned, "accuracy_rewound": acc_rewound,
            "accuracy_retrained": summary["final"]["overall"], "accuracy_retrained_best": summary["best"]["overall"],
            "best_epoch": summary["best_epoch"], "retrained_by_type": summary["final"],
            "tests": {k: v for k, v in tests.items() if k != cfg.data.valid}, "splits": self.ctx.splits,
            "seconds": round(time.time() - started, 1), "schedule": cfg.lottery.schedule, "scope": cfg.lottery.scope,
        }
        if dist.is_main():
            write_json(folder / "sparsity.json", measured)
            write_json(folder / "result.json", row)
        log.info("%s: pruned %.2f, rewound %.2f, retrained %.2f (best %.2f), measured sparsity %.4f", tag,
                 acc_pruned, acc_rewound, row["accuracy_retrained"], row["accuracy_retrained_best"],
                 row["measured_sparsity"])
        metrics_log({"event": "level", **row})
        return row


def lottery_units(ctx: Context) -> tuple[list[Unit], list[LotteryChain]]:
    cfg = ctx.cfg
    chains = [LotteryChain(ctx, seed, mode) for seed in cfg.seeds for mode in cfg.lottery.modes]
    units = [dense_unit(ctx, s) for s in cfg.seeds] + [u for chain in chains for u in chain.units()]
    return units, chains


def run_lottery(cfg: Config) -> Optional[dict]:
    ctx = Context.load(cfg)
    units, chains = lottery_units(ctx)
    if not run_units(units, cfg.experiment):
        return None
    with tables_lock(cfg):
        finetune = write_finetune(ctx)
        rows = [read_object(c.level_folder(level) / "result.json", ROW_KEYS, "level result")
                for c in chains for level in cfg.lottery.levels]
        result = lottery_result(cfg, finetune, rows)
        if dist.is_main():
            write_lottery(cfg, result)
    return result


def lottery_result(cfg: Config, finetune: dict, rows: list[dict]) -> dict:
    valid = cfg.data.valid
    dense = [s["final"]["overall"] for s in finetune["seeds"].values()]
    blind = [s["blind"][valid]["overall"] for s in finetune["seeds"].values()]
    for row in rows:
        seed = finetune["seeds"][str(row["seed"])]
        row["accuracy_dense"] = seed["final"]["overall"]
        row["accuracy_blind"] = seed["blind"][valid]["overall"]
    return {
        "experiment": cfg.experiment, "valid_split": valid, "schedule": cfg.lottery.schedule,
        "scope": cfg.lottery.scope, "rewind_steps": cfg.lottery.rewind_steps, "prune_from": cfg.lottery.prune_from,
        "seeds": list(cfg.seeds),
        "dense": {"accuracy": {"mean": round(float(np.mean(dense)), 4), "std": round(float(np.std(dense)), 4)},
                  "blind": {"mean": round(float(np.mean(blind)), 4), "std": round(float(np.std(blind)), 4)},
                  "per_seed": {s: v["final"]["overall"] for s, v in finetune["seeds"].items()}},
        "rows": rows,
    }


CSV_FIELDS = ["mode", "seed", "target_sparsity", "measured_sparsity", "accuracy_pruned", "accuracy_rewound",
              "accuracy_retrained", "accuracy_retrained_best", "accuracy_dense", "accuracy_blind", "best_epoch",
              "seconds"]


def write_lottery(cfg: Config, result: dict) -> None:
    from .plots import lottery_table, lottery_type_table, plot_lottery, seeds_text, write_table

    out = cfg.result_dir
    write_json(out / "lottery.json", result)
    modalities = sorted({m for r in result["rows"] for m in r["measured_by_modality"] if m != "overall"})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_FIELDS + [f"measured_{m}" for m in modalities])
    for r in result["rows"]:
        writer.writerow([r[k] for k in CSV_FIELDS] + [r["measured_by_modality"].get(m, "") for m in modalities])
    write_text(out / "lottery.csv", buf.getvalue())
    plot_lottery(result, out)
    header, body = lottery_table(result)
    write_table(header, body, out / "lottery_table.md", out / "lottery_table.png",
                f"{cfg.experiment}: retrained {result['valid_split']} accuracy (%), {seeds_text(result['seeds'])}, "
                f"{cfg.lottery.schedule} {cfg.lottery.scope} pruning")
    ft = out / "finetune.json"
    finetune = read_object(ft, ("seeds",), "finetune result") if ft.exists() else None
    header, body = lottery_type_table(result, finetune)
    write_table(header, body, out / "lottery_answer_types.md", out / "lottery_answer_types.png",
                f"{cfg.experiment}: retrained {result['valid_split']} accuracy (%) by answer type, "
                f"{seeds_text(result['seeds'])}")


def redraw(cfg: Config) -> None:
    """Plots and tables again from the saved JSON (no training)."""
    from .plots import plot_finetune

    ft = cfg.result_dir / "finetune.json"
    if ft.exists():
        plot_finetune(read_object(ft, ("experiment", "valid_split", "seeds", "mean"), "finetune result"),
                      cfg.result_dir / "finetune.png")
    lt = cfg.result_dir / "lottery.json"
    if lt.exists():
        result = read_object(lt, ("experiment", "valid_split", "seeds", "dense", "rows"), "lottery result")
        for i, row in enumerate(result["rows"]):
            missing = [k for k in ROW_KEYS + ("accuracy_dense", "accuracy_blind") if k not in row]
            if missing:
                raise InputError(f"{lt}: row {i} has no field '{missing[0]}'; rerun the study to rebuild it")
        write_lottery(cfg, result)
