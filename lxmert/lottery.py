"""The lottery-ticket study: iterative (or one-shot) pruning with weight rewinding.

For every seed: fine-tune the dense model (finetune.py). Then, per mode, level by level:
  1. prune the trained model of the previous level (the dense model for the first level, or always
     with the `oneshot` schedule) to the level's sparsity               -> accuracy_pruned
  2. rewind the surviving weights to the rewind point, keep the mask    -> accuracy_rewound
  3. retrain with the mask enforced after every optimizer step          -> accuracy_retrained(_best)
  4. measure the sparsity from the retrained weights themselves.

models/<exp>/seed_<s>/<schedule>_<scope>/<mode>/level_<pct>/
    mask.safetensors (bit-packed), run/ (training run: best/ and final/ weights), result.json
A level with a result.json is finished and never recomputed; an interrupted level resumes its run.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import numpy as np

from . import distributed as dist
from .config import Config
from .finetune import Context, run_finetune, train_run
from .io import read_json, write_json, write_text
from .masks import apply_mask, fractions, full_mask, load_mask_for, measure_weights, save_mask
from .modeling import VQAModel, prunable_tensors
from .pruning import prune
from .training import RunSpec, load_weights, metrics_log

log = logging.getLogger("lxmert")


class LotteryRun:
    """The levels of one (seed, mode)."""

    def __init__(self, ctx: Context, model: VQAModel, seed: int, mode: str):
        self.ctx, self.model, self.seed, self.mode = ctx, model, seed, mode
        lc = ctx.cfg.lottery
        self.prunable = prunable_tensors(model, lc.include_embeddings, lc.include_head)
        self.modalities = {t.name: t.modality for t in self.prunable}
        self.folder = ctx.seed_dir(seed) / f"{lc.schedule}_{lc.scope}" / mode
        dense = ctx.seed_dir(seed) / "dense"
        self.dense_weights = dense / "final" / "model.safetensors"
        self.rewind_weights = (ctx.seed_dir(seed) / "init.safetensors" if lc.rewind_steps == 0
                               else dense / "rewind.safetensors")

    def evaluate(self) -> float:
        return self.ctx.evaluate(self.model, [self.ctx.cfg.data.valid])[self.ctx.cfg.data.valid]["overall"]

    def load_mask(self, path: Path) -> dict:
        return load_mask_for(path, self.model, [t.name for t in self.prunable])

    def levels(self) -> list[dict]:
        lc = self.ctx.cfg.lottery
        mask = full_mask(self.model, self.prunable)
        trained = self.dense_weights
        rows = []
        for index, level in enumerate(lc.levels):
            if lc.schedule == "oneshot":
                mask, trained = full_mask(self.model, self.prunable), self.dense_weights
            row, mask, trained = self.level(index, level, mask, trained)
            rows.append(row)
        return rows

    def level(self, index: int, level: float, current: dict, trained: Path):
        cfg = self.ctx.cfg
        folder = self.folder / f"level_{round(100 * level, 2):g}"
        final = folder / "run" / "final" / "model.safetensors"
        if (folder / "result.json").exists():
            return read_json(folder / "result.json"), self.load_mask(folder / "mask.safetensors"), final
        started = time.time()
        load_weights(self.model, trained)
        if (folder / "mask.safetensors").exists():
            mask = self.load_mask(folder / "mask.safetensors")
        else:
            mask = dist.broadcast(prune(self.mode, self.model, self.prunable, current, level, cfg.lottery.scope,
                                        seed=self.seed * 1000 + index) if dist.is_main() else None)
            if dist.is_main():
                save_mask(folder / "mask.safetensors", mask, self.modalities)
        apply_mask(self.model, mask)
        acc_pruned = self.evaluate()
        load_weights(self.model, self.rewind_weights)
        apply_mask(self.model, mask)
        acc_rewound = self.evaluate()
        tag = f"seed {self.seed} {self.mode} {100 * level:g}%"
        spec = RunSpec(folder=folder / "run", seed=self.seed, loss=self.ctx.loss(cfg.train.loss, self.model),
                       epochs=cfg.train.epochs, lr=cfg.train.lr, masks=mask, tag=tag)
        summary = train_run(self.ctx, self.model, spec)
        measured = measure_weights(self.model, self.prunable)
        row = {
            "mode": self.mode, "seed": self.seed, "target_sparsity": level,
            "measured_sparsity": fractions(measured)["overall"],
            "measured_by_modality": fractions(measured)} | {
            "accuracy_pruned": acc_pruned, "accuracy_rewound": acc_rewound,
            "accuracy_retrained": summary["final"]["overall"], "accuracy_retrained_best": summary["best"]["overall"],
            "best_epoch": summary["best_epoch"], "retrained_by_type": summary["final"],
            "seconds": round(time.time() - started, 1), "schedule": cfg.lottery.schedule, "scope": cfg.lottery.scope,
        }
        if dist.is_main():
            write_json(folder / "result.json", row)
            write_json(folder / "sparsity.json", measured)
        log.info("%s: pruned %.2f, rewound %.2f, retrained %.2f (best %.2f), measured sparsity %.4f", tag,
                 acc_pruned, acc_rewound, row["accuracy_retrained"], row["accuracy_retrained_best"],
                 row["measured_sparsity"])
        metrics_log({"event": "level", **row})
        return row, mask, final


def run_lottery(cfg: Config) -> dict:
    ctx = Context.load(cfg)
    finetune = run_finetune(cfg, ctx)
    rows = []
    for seed in cfg.seeds:
        model = ctx.new_model(seed)
        for mode in cfg.lottery.modes:
            rows += LotteryRun(ctx, model, seed, mode).levels()
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
        "scope": cfg.lottery.scope, "rewind_steps": cfg.lottery.rewind_steps,
        "dense": {"accuracy": {"mean": round(float(np.mean(dense)), 4), "std": round(float(np.std(dense)), 4)},
                  "blind": {"mean": round(float(np.mean(blind)), 4), "std": round(float(np.std(blind)), 4)},
                  "per_seed": {s: v["final"]["overall"] for s, v in finetune["seeds"].items()}},
        "rows": rows,
    }


CSV_FIELDS = ["mode", "seed", "target_sparsity", "measured_sparsity", "accuracy_pruned", "accuracy_rewound",
              "accuracy_retrained", "accuracy_retrained_best", "accuracy_dense", "accuracy_blind", "best_epoch",
              "seconds"]


def write_lottery(cfg: Config, result: dict) -> None:
    from .plots import lottery_table, plot_lottery, write_table

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
                f"{cfg.experiment}: retrained {result['valid_split']} accuracy (%), mean ± std over "
                f"{len(cfg.seeds)} seed(s), {cfg.lottery.schedule} {cfg.lottery.scope} pruning")


def redraw(cfg: Config) -> None:
    """Plots and tables again from the saved JSON (no training)."""
    from .plots import plot_finetune

    ft = cfg.result_dir / "finetune.json"
    if ft.exists():
        plot_finetune(read_json(ft), cfg.result_dir / "finetune.png")
    lt = cfg.result_dir / "lottery.json"
    if lt.exists():
        write_lottery(cfg, read_json(lt))
