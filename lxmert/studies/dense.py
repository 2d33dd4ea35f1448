"""Stage 0 of every study: the dense fine-tune of each seed, its evaluation and the question-only baseline.

models/<experiment>/seed_<s>/dense/        the unit: run/ (training run) + result.json (rows.DenseRow)
result/<experiment>/finetune.json, .png    per seed: final/best accuracy, question-only accuracy, curves
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from ..core import distributed as dist
from ..core import paths
from ..core.config import Config
from ..core.files import read_object, write_json
from ..core.paths import Run
from ..core.scheduler import Unit, run_units
from ..core.settings import DATA_KEYS, TRAIN_KEYS, model_keys, unit_settings
from ..modeling.vqa import VQAModel
from ..train.checkpoints import drop_weights, load_weights
from ..train.trainer import RunSpec, Schedule
from .context import Context, tables_lock
from .figures import plot_finetune
from .rows import DENSE_KEYS, QUESTION_ONLY_KEYS, DenseRow, QuestionOnlyRow, as_json, complete

log = logging.getLogger("lxmert")


def dense_settings(cfg: Config, loss: Optional[str] = None) -> dict:
    """The settings a dense fine-tune (and its question-only baseline) is computed with."""
    keys = DATA_KEYS + model_keys() + TRAIN_KEYS + ["blind.epochs", "blind.lr", "blind.batch_size",
                                                    "lottery.rewind_steps"]
    return unit_settings(cfg, keys, **({"train__loss": loss} if loss else {}))


def dense(ctx: Context, seed: int, loss: str, run: Run, capture_step: int = 0) -> tuple[VQAModel, dict]:
    """Fine-tune the full model of one seed from its initial weights; returns the model at its final
    weights and the run's summary. With train.dense_seed the run draws from that seed instead (data order,
    dropout), as the original study's fine-tunes all did."""
    init = ctx.init_weights(seed)
    model = ctx.new_model(seed)
    load_weights(model, init)
    drawn = seed if ctx.cfg.train.dense_seed is None else ctx.cfg.train.dense_seed
    spec = RunSpec(run=run, seed=drawn, tag=f"seed {drawn} dense {loss}", loss=ctx.loss(loss, model, drawn),
                   schedule=Schedule.of(ctx.cfg), capture_step=capture_step)
    return model, ctx.train(model, spec)


def dense_unit(ctx: Context, seed: int) -> Unit:
    cfg, name = ctx.cfg, paths.dense(seed)
    folder = ctx.paths.unit(name)
    run = ctx.paths.run(name)

    def work() -> None:
        started = time.time()
        model, summary = dense(ctx, seed, cfg.train.loss, run, capture_step=cfg.lottery.rewind_steps)
        load_weights(model, run.best)
        tests = ctx.evaluate_and_predict(model, name)
        blind = ctx.blind(seed, cfg.train.loss)
        row = DenseRow(seed=seed, loss=cfg.train.loss, final=summary["final"], best=summary["best"],
                       best_epoch=summary["best_epoch"], tests={k: v for k, v in tests.items() if k != cfg.data.valid},
                       blind=blind, splits=ctx.splits, seconds=round(time.time() - started, 1),
                       epochs=[{"epoch": r["epoch"], "loss": r["loss"], "valid": r["valid"]["overall"]}
                               for r in summary["history"]], environment=ctx.environment)
        if dist.is_main():
            write_json(folder / paths.RESULT, as_json(row))
        log.info("seed %d: valid %.2f (best epoch %d: %.2f), question-only %.2f", seed, summary["final"]["overall"],
                 summary["best_epoch"], summary["best"]["overall"], blind[cfg.data.valid]["overall"])

    return Unit(name=name, folder=folder, work=work,
                finished=lambda: complete(folder / paths.RESULT, DenseRow, ctx.splits, "result row"),
                settings=dense_settings(cfg), cleanup=(ctx.paths.predictions(name),))


def question_only_unit(ctx: Context, seed: int, loss: str, settings: dict) -> Unit:
    """The dense fine-tune of one seed and loss with the image removed (VQAModel.sees_image false: every
    region feature and box zero), evaluated with its last and its best-on-valid weights on every split: what
    the study's own model gets from the question alone (the bag-of-words model can understate it)."""
    name = paths.question_only(seed, loss)
    folder, run = ctx.paths.unit(name), ctx.paths.run(name)

    def work() -> None:
        started = time.time()
        model = ctx.new_model(seed)
        load_weights(model, ctx.init_weights(seed))
        model.sees_image = False
        spec = RunSpec(run=run, seed=seed, tag=f"seed {seed} question-only {loss}", loss=ctx.loss(loss, model, seed),
                       schedule=Schedule.of(ctx.cfg))
        summary = ctx.train(model, spec)
        final = ctx.evaluate(model)
        load_weights(model, run.best)
        row = QuestionOnlyRow(seed=seed, loss=loss, final=final, best=ctx.evaluate(model),
                              best_epoch=summary["best_epoch"], splits=ctx.splits,
                              seconds=round(time.time() - started, 1), environment=ctx.environment)
        if dist.is_main():
            write_json(folder / paths.RESULT, as_json(row))
        log.info("seed %d question-only LXMERT (%s): valid %.2f", seed, loss, final[ctx.cfg.data.valid]["overall"])

    def release() -> None:
        if ctx.cfg.checkpoints.keep == "minimal":
            drop_weights(run, "best", "final")

    return Unit(name=name, folder=folder, work=work, settings=settings, release=release,
                finished=lambda: complete(folder / paths.RESULT, QuestionOnlyRow, ctx.splits, "question-only result"))


def question_only_rows(ctx: Context, losses: list[str]) -> dict[str, list[dict]]:
    """loss -> the question-only LXMERT row of every seed ({} without blind.lxmert)."""
    if not ctx.cfg.blind.lxmert:
        return {}
    return {loss: [read_object(ctx.paths.unit(paths.question_only(s, loss)) / paths.RESULT, QUESTION_ONLY_KEYS,
                               "question-only result") for s in ctx.cfg.seeds] for loss in losses}


def dense_rows(ctx: Context) -> dict[str, dict]:
    return {str(s): read_object(ctx.paths.unit(paths.dense(s)) / paths.RESULT, DENSE_KEYS, "dense result")
            for s in ctx.cfg.seeds}


def run_finetune(cfg: Config, ctx: Optional[Context] = None) -> Optional[dict]:
    """Dense fine-tune + evaluation + blind baseline for every seed; writes finetune.json and a plot when
    every seed is finished (by this process or others)."""
    ctx = ctx or Context.load(cfg)
    if not run_units(study_a_units(ctx), cfg.experiment):
        return None
    with tables_lock(cfg):
        return write_finetune(ctx)


def study_a_units(ctx: Context) -> list[Unit]:
    """The dense fine-tune of every seed and, with blind.lxmert, its question-only twin."""
    cfg = ctx.cfg
    ctx.check_question_only()
    units = [dense_unit(ctx, s) for s in cfg.seeds]
    if cfg.blind.lxmert:
        units += [question_only_unit(ctx, s, cfg.train.loss, dense_settings(cfg)) for s in cfg.seeds]
    return units


def write_finetune(ctx: Context) -> dict:
    cfg = ctx.cfg
    seeds = dense_rows(ctx)
    result = {"experiment": cfg.experiment, "valid_split": cfg.data.valid, "seeds": seeds,
              "mean": _mean_over_seeds(seeds, cfg.data.valid), "environment": ctx.environment,
              "question_only": question_only_rows(ctx, [cfg.train.loss]).get(cfg.train.loss, [])}
    if dist.is_main():
        write_json(ctx.paths.result("finetune.json"), result)
        plot_finetune(result, ctx.paths.result("finetune.png"))
    return result


def _mean_over_seeds(seeds: dict, valid: str) -> dict:
    out = {}
    for k in ("final", "best"):
        vals = [s[k]["overall"] for s in seeds.values()]
        out[k] = {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals)), 4), "seeds": len(vals)}
    valid_blind = [s["blind"][valid]["overall"] for s in seeds.values()]
    out["blind"] = {"mean": round(float(np.mean(valid_blind)), 4), "std": round(float(np.std(valid_blind)), 4),
                    "seeds": len(valid_blind)}
    return out
