"""Stage 0 of every study: the dense fine-tune of each seed, its evaluation and the blind baseline.

models/<experiment>/seed_<s>/init.safetensors   weights before fine-tuning (the default rewind point)
models/<experiment>/seed_<s>/dense/             the training run (see training.py)
result/<experiment>/finetune.json               per seed: final/best accuracy, blind baseline, curves
"""
from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed as dist
from .blind import train_blind
from .config import Config
from .data import Data, load_data
from .evaluation import accuracy, predict, predictions_json
from .io import InputError, atomic_folder, read_json, save_tensors, write_json
from .losses import make_loss, question_type_prior
from .modeling import VQAModel, build_model
from .training import RunSpec, Trainer, load_weights, seed_everything, setup_logging

log = logging.getLogger("lxmert")


@dataclass
class Context:
    """A loaded experiment: its config and data (loaded once, shared by every run)."""

    cfg: Config
    data: Data

    @classmethod
    def load(cls, cfg: Config) -> "Context":
        dist.init()
        setup_logging(cfg)
        log.info("experiment %s: loading data from %s", cfg.experiment, cfg.data.root)
        data = load_data(cfg, log.info)
        check_data_fingerprint(cfg)
        return cls(cfg, data)

    def seed_dir(self, seed: int) -> Path:
        return self.cfg.model_dir / f"seed_{seed}"

    @functools.cached_property
    def prior(self) -> torch.Tensor:
        """Question-type answer prior from the training split only (extra zero row: unseen types);
        computed once per experiment, only when a loss needs it."""
        train = self.data.train
        sp = train.split
        return question_type_prior(train.qtypes, (sp.label_ptr, sp.label_idx, sp.label_score),
                                   len(self.data.qtype_index) + 1, self.data.num_answers)

    def loss(self, name: str, model: VQAModel) -> torch.nn.Module:
        prior = None if name == "bce" else self.prior
        return make_loss(name, prior, model.encoder.config.hidden_size, self.cfg.debias)

    def new_model(self, seed: int) -> VQAModel:
        """A fresh model; its initialisation depends on the seed only."""
        seed_everything(seed)
        return build_model(self.cfg.model, len(self.data.tokenizer), self.data.store.feat_dim,
                           self.data.num_answers).to(dist.device())

    def evaluate(self, model: VQAModel, splits: Optional[list[str]] = None) -> dict[str, dict]:
        """Accuracy on the validation split and every test split (or the named ones)."""
        sets = {self.cfg.data.valid: self.data.valid, **self.data.tests}
        out = {}
        for name, ds in sets.items():
            if splits is not None and name not in splits:
                continue
            if ds.split.has_labels:
                out[name] = accuracy(ds, predict(model, ds, self.cfg.train.eval_batch_size, dist.device(),
                                                 self.cfg.train.precision))
        return out

    def blind(self, seed: int) -> dict[str, dict]:
        """Question-only accuracy on the validation and test splits (cached per seed)."""
        path = self.seed_dir(seed) / "blind.json"
        if path.exists():
            return read_json(path)
        sets = {self.cfg.data.valid: self.data.valid}
        sets.update({k: v for k, v in self.data.tests.items() if v.split.has_labels})
        result = train_blind(self.data.train, sets, len(self.data.tokenizer), seed, self.cfg.blind_epochs)
        if dist.is_main():
            write_json(path, result)
        return result


def data_files(cfg: Config) -> list[Path]:
    """The files an experiment's numbers depend on: question files, answer vocabulary, store layout."""
    d = cfg.data
    root = Path(d.root)
    store = Path(d.features) if Path(d.features).is_absolute() else root / d.features
    names = list(d.train) + [d.valid] + list(d.test)
    return [root / f"{n}.json" for n in names] + [root / d.ans2label, store / "meta.json", store / "img_ids.json"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_data_fingerprint(cfg: Config) -> None:
    """models/<experiment>/data.json records the data the experiment's runs were trained on; later runs
    (and resumed ones) with other data are refused, so finished runs are never mixed with new data."""
    files = {str(p): _sha256(p) for p in data_files(cfg) if p.exists()}
    path = cfg.model_dir / "data.json"
    if path.exists():
        recorded = read_json(path)
        changed = sorted(k for k in set(files) | set(recorded) if files.get(k) != recorded.get(k))
        if changed:
            raise InputError(f"{path}: the runs of experiment '{cfg.experiment}' were made with other data "
                             f"({', '.join(changed[:3])} differ); use another experiment name or remove "
                             f"{cfg.model_dir} and result/{cfg.experiment}")
    elif dist.is_main():
        write_json(path, files)


def finish_run(folder: Path, model: VQAModel) -> None:
    """Keep final weights, drop the bulky optimizer state of a finished run."""
    if dist.is_main():
        save_tensors(folder / "final" / "model.safetensors", model.state_dict())
        shutil.rmtree(folder / "last", ignore_errors=True)


def train_run(ctx: Context, model: VQAModel, spec: RunSpec) -> dict:
    """Run (or resume, or skip) one training run and leave the model at its final weights."""
    summary = Trainer(ctx.cfg, model, ctx.data.train, ctx.data.valid, spec).fit()
    final = spec.folder / "final" / "model.safetensors"
    if final.exists():
        load_weights(model, final)
    else:
        finish_run(spec.folder, model)
    dist.barrier()
    return summary


def dense(ctx: Context, seed: int, loss: str = "bce", folder: Optional[Path] = None,
          capture_step: int = 0) -> tuple[VQAModel, dict]:
    """Fine-tune the full model of one seed; returns the model at its final weights and the summary."""
    cfg = ctx.cfg
    folder = folder or ctx.seed_dir(seed) / "dense"
    model = ctx.new_model(seed)
    init = ctx.seed_dir(seed) / "init.safetensors"
    if init.exists():
        load_weights(model, init)
    elif dist.is_main():
        save_tensors(init, model.state_dict())
    dist.barrier()
    spec = RunSpec(folder=folder, seed=seed, loss=ctx.loss(loss, model).to(dist.device()), epochs=cfg.train.epochs,
                   lr=cfg.train.lr, capture_step=capture_step, tag=f"seed {seed} dense {loss}")
    started = time.time()
    summary = train_run(ctx, model, spec)
    summary.setdefault("seconds", round(time.time() - started, 1))
    return model, summary


def run_finetune(cfg: Config, ctx: Optional[Context] = None) -> dict:
    """Dense fine-tune + evaluation + blind baseline for every seed; writes finetune.json and a plot."""
    from .plots import plot_finetune

    ctx = ctx or Context.load(cfg)
    seeds = {}
    for seed in cfg.seeds:
        model, summary = dense(ctx, seed, capture_step=cfg.lottery.rewind_steps)
        tests = best_model_tests(ctx, model, seed)
        blind = ctx.blind(seed)
        seeds[str(seed)] = {
            "final": summary["final"], "best": summary["best"], "best_epoch": summary["best_epoch"],
            "test": tests, "blind": blind, "seconds": summary.get("seconds"),
            "epochs": [{"epoch": r["epoch"], "loss": r["loss"], "valid": r["valid"]["overall"]}
                       for r in summary["history"]],
        }
        log.info("seed %d: valid %.2f (best epoch %d: %.2f), question-only %.2f", seed, summary["final"]["overall"],
                 summary["best_epoch"], summary["best"]["overall"], blind[cfg.data.valid]["overall"])
    result = {"experiment": cfg.experiment, "valid_split": cfg.data.valid, "seeds": seeds,
              "mean": _mean_over_seeds(seeds, cfg.data.valid)}
    if dist.is_main():
        write_json(cfg.result_dir / "finetune.json", result)
        plot_finetune(result, cfg.result_dir / "finetune.png")
        if cfg.model.export:
            export_encoder(ctx, cfg.seeds[0], cfg.model.export)
    return result


def export_encoder(ctx: Context, seed: int, folder: str) -> None:
    """Save the best model's encoder (transformers format) and the tokenizer it was trained with, so
    another config can start from it with model.pretrained, like from released weights."""
    model = ctx.new_model(seed)
    load_weights(model, ctx.seed_dir(seed) / "dense" / "best" / "model.safetensors")
    with atomic_folder(folder, overwrite=True) as tmp:
        model.encoder.save_pretrained(str(tmp))
        ctx.data.tokenizer.save_pretrained(str(tmp))
    log.info("exported the encoder of seed %d to %s", seed, folder)


def best_model_tests(ctx: Context, model: VQAModel, seed: int) -> dict[str, dict]:
    """The best-on-valid model's predictions files (valid and test splits) and its accuracy on the
    labelled test splits: one prediction pass per split, done once per seed (cached in the run folder)."""
    cache = ctx.seed_dir(seed) / "dense" / "tests.json"
    if cache.exists():
        return read_json(cache)
    load_weights(model, ctx.seed_dir(seed) / "dense" / "best" / "model.safetensors")
    tests = {}
    for name, ds in {ctx.cfg.data.valid: ctx.data.valid, **ctx.data.tests}.items():
        preds = predict(model, ds, ctx.cfg.train.eval_batch_size, dist.device(), ctx.cfg.train.precision)
        if name in ctx.data.tests and ds.split.has_labels:
            tests[name] = accuracy(ds, preds)
        if dist.is_main():
            write_json(ctx.cfg.result_dir / f"predictions_seed{seed}_{name}.json",
                       predictions_json(ds, preds, ctx.data.vocab.label2ans), indent=None)
    if dist.is_main():
        write_json(cache, tests)
    return tests


def _mean_over_seeds(seeds: dict, valid: str) -> dict:
    keys = ["final", "best"]
    out = {}
    for k in keys:
        vals = [s[k]["overall"] for s in seeds.values()]
        out[k] = {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals)), 4)}
    valid_blind = [s["blind"][valid]["overall"] for s in seeds.values()]
    out["blind"] = {"mean": round(float(np.mean(valid_blind)), 4), "std": round(float(np.std(valid_blind)), 4)}
    return out
