"""Stage 0 of every study: the dense fine-tune of each seed, its evaluation and the blind baseline.

models/<experiment>/seed_<s>/init.safetensors   weights before fine-tuning (the default rewind point)
models/<experiment>/seed_<s>/dense/             the unit: training run (see training.py) + result.json
models/<experiment>/seed_<s>/blind_<loss>.json  question-only baseline of that seed and loss
result/<experiment>/finetune.json               per seed: final/best accuracy, blind baseline, curves
result/<experiment>/predictions/<unit>/<split>.json   answers of a unit's best-on-valid model
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed as dist
from .blind import train_blind
from .config import DATA_KEYS, TRAIN_KEYS, Config, model_keys, unit_settings
from .data import Data, load_data
from .evaluation import accuracy, predict, predictions_json
from .io import FileLock, InputError, atomic_folder, file_sha256, read_json, read_object, remove_temporaries, \
    load_tensors, save_tensors, tensor_metadata, write_json
from .losses import make_loss, question_type_prior
from .pretrain import ensure_pretrained
from .modeling import VQAModel, build_model
from .training import RunSpec, Trainer, load_weights, run_seed, seed_everything, setup_logging
from .units import Unit, once, run_units, setting_changes

log = logging.getLogger("lxmert")


@dataclass
class Context:
    """A loaded experiment: its config and data (loaded once, shared by every run)."""

    cfg: Config
    data: Data

    @classmethod
    def load(cls, cfg: Config) -> "Context":
        dist.init()
        check_writable(cfg)
        setup_logging(cfg)
        log.info("experiment %s: loading data from %s", cfg.experiment, cfg.data.root)
        data = load_data(cfg, log.info)
        ensure_pretrained(cfg)  # the embedded benchmark's stand-in encoder, made once (lxmert/pretrain.py)
        check_data_fingerprint(cfg)
        return cls(cfg, data)

    def seed_dir(self, seed: int) -> Path:
        return self.cfg.model_dir / f"seed_{seed}"

    def unit_dir(self, name: str) -> Path:
        return self.cfg.model_dir / name

    def predictions_dir(self, unit: str) -> Path:
        """result/<experiment>/predictions/<unit path>/: one <split>.json per evaluated split."""
        return self.cfg.result_dir / "predictions" / unit

    @property
    def splits(self) -> list[str]:
        """Every split a model is evaluated on: the validation split, then the test splits."""
        return [self.cfg.data.valid, *self.data.tests]

    @property
    def labelled(self) -> list[str]:
        return [n for n in self.splits if self._dataset(n).split.has_labels]

    def _dataset(self, name: str):
        return self.data.valid if name == self.cfg.data.valid else self.data.tests[name]

    @functools.cached_property
    def prior(self) -> torch.Tensor:
        """Question-type answer prior from the training split only (extra zero row: unseen types);
        computed once per experiment, only when a loss needs it."""
        train = self.data.train
        sp = train.split
        return question_type_prior(train.qtypes, (sp.label_ptr, sp.label_idx, sp.label_score),
                                   len(self.data.qtype_index) + 1, self.data.num_answers)

    def loss(self, name: str, model: VQAModel, seed: int) -> torch.nn.Module:
        """A loss module. Its own parameters (LMH's gate) are initialised from (seed, loss name), not from
        whatever the process's RNG holds, so a resumed study builds exactly the same module."""
        prior = None if name == "bce" else self.prior
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run_seed(seed, f"loss {name}"))
            return make_loss(name, prior, model.encoder.config.hidden_size, self.cfg.debias).to(dist.device())

    def new_model(self, seed: int) -> VQAModel:
        """A fresh model; its initialisation depends on the seed only."""
        seed_everything(seed)
        return build_model(self.cfg.model, len(self.data.tokenizer), self.data.store.feat_dim,
                           self.data.num_answers, answers=self.data.vocab.label2ans).to(dist.device())

    def init_weights(self, seed: int) -> Path:
        """models/<exp>/seed_<s>/init.safetensors, the weights before any training (made once; every dense
        fine-tune and every rewind starts from it). It records the settings it was built with and is
        refused when they differ from the config's (removing only the refused units' folders would
        otherwise train them from weights built with the old settings)."""
        path = self.seed_dir(seed) / "init.safetensors"
        mine = init_settings(self.cfg)
        once(path.parent, path.exists,
             lambda: save_tensors(path, self.new_model(seed).state_dict(),
                                  metadata={"settings": json.dumps(mine, sort_keys=True)}), of=path.name)
        check_init(path, mine, lambda: self._rebuilt_init(seed))
        return path

    def _rebuilt_init(self, seed: int) -> dict:
        """The seed's initial weights built again, every RNG (python, numpy, torch) left as it was."""
        import random

        saved = random.getstate(), np.random.get_state()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            try:
                return self.new_model(seed).state_dict()
            finally:
                random.setstate(saved[0])
                np.random.set_state(saved[1])

    def evaluate(self, model: VQAModel, splits: Optional[list[str]] = None) -> dict[str, dict]:
        """Accuracy on the validation split and every labelled test split (or the named ones)."""
        out = {}
        for name in self.labelled:
            if splits is None or name in splits:
                ds = self._dataset(name)
                out[name] = accuracy(ds, predict(model, ds, self.cfg.train.eval_batch_size, dist.device(),
                                                 self.cfg.train.precision))
        return out

    def evaluate_and_predict(self, model: VQAModel, unit: str) -> dict[str, dict]:
        """One prediction pass per split with the model as it is: accuracy on the labelled splits and
        result/<exp>/predictions/<unit>/<split>.json for every split (the EvalAI format)."""
        out = {}
        for name in self.splits:
            ds = self._dataset(name)
            preds = predict(model, ds, self.cfg.train.eval_batch_size, dist.device(), self.cfg.train.precision)
            if ds.split.has_labels:
                out[name] = accuracy(ds, preds)
            if dist.is_main():
                write_json(self.predictions_dir(unit) / f"{name}.json",
                           predictions_json(ds, preds, self.data.vocab.label2ans), indent=None)
        return out

    def blind(self, seed: int, loss: str = "bce") -> dict[str, dict]:
        """Question-only accuracy on the validation and labelled test splits for a seed and a training loss
        (made once, shared by every unit of the seed)."""
        path = self.seed_dir(seed) / f"blind_{loss}.json"

        def covered() -> bool:
            return path.exists() and set(self.labelled) <= set(read_json(path))

        def make() -> None:
            sets = {name: self._dataset(name) for name in self.labelled}
            write_json(path, train_blind(self.data.train, sets, len(self.data.tokenizer), seed, self.cfg.blind_epochs,
                                         loss=loss, prior=None if loss == "bce" else self.prior,
                                         debias=self.cfg.debias))

        once(path.parent, covered, make, of=path.name)
        return dist.broadcast(read_json(path) if dist.is_main() else None)


# -- experiment-wide checks --------------------------------------------------------------------------

def init_settings(cfg: Config) -> dict:
    """The settings recorded with a seed's initial weights: the data and model keys every unit records too (a
    superset of what the weights depend on: vocabulary, answers, feature size, encoder, head)."""
    return json.loads(json.dumps(unit_settings(cfg, DATA_KEYS + model_keys())))


_LEGACY_INIT_CHECKED: set[str] = set()


def check_init(path: Path, mine: dict, rebuild: Callable[[], dict]) -> None:
    """Refuse initial weights made under other settings (one error naming the keys and the file; keys
    recorded only since a later version read as the value they had before, as for units). A file without
    the record (written before it existed) is compared with what this config builds (`rebuild`, once per
    process) and refused unless every tensor is equal."""
    metadata = tensor_metadata(path)
    raw = None if metadata is None else metadata.get("settings")
    if raw is None:
        key = f"{path.resolve()} {json.dumps(mine, sort_keys=True)}"
        if key in _LEGACY_INIT_CHECKED:
            return
        weights, built = load_tensors(path), rebuild()  # load_tensors names an unreadable file
        if set(weights) != set(built) or any(not torch.equal(weights[k], built[k].cpu()) for k in weights):
            raise InputError(f"{path}: initial weights without a settings record (written by an older version) "
                             "that differ from what this config builds (another model.answer_prior, model or "
                             f"data); remove {path.parent} to recompute the seed, or start a new experiment")
        _LEGACY_INIT_CHECKED.add(key)
        return
    diffs = setting_changes(json.loads(raw), mine, shown=4)
    if diffs:
        raise InputError(f"{path}: initial weights made under other settings ({diffs}); remove {path.parent} to "
                         "recompute the seed, or start a new experiment")


def check_writable(cfg: Config) -> None:
    """Refuse before any work when an output folder cannot be written (read-only models/, result/, logs/).
    Nothing is created: the folder, or the nearest existing folder above it, is asked."""
    if not dist.is_main():
        return
    for folder in (cfg.model_dir, cfg.result_dir, cfg.log_path.parent):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not a folder" if not existing.is_dir() else "is not writable"
            raise InputError(f"cannot write to {folder}: {existing} {what}; fix the permissions or run elsewhere")


def data_files(cfg: Config) -> list[Path]:
    """The files an experiment's numbers depend on: question files, answer vocabulary, store layout and
    fingerprint, and a local pretrained encoder's weights."""
    d = cfg.data
    root = Path(d.root)
    store = Path(d.features) if Path(d.features).is_absolute() else root / d.features
    names = list(d.train) + [d.valid] + list(d.test)
    files = [root / f"{n}.json" for n in names] + [root / d.ans2label, store / "meta.json", store / "img_ids.json"]
    if cfg.model.pretrained and Path(cfg.model.pretrained).is_dir():
        files += sorted(Path(cfg.model.pretrained).glob("*.safetensors"))
    return files


def check_data_fingerprint(cfg: Config) -> None:
    """models/<experiment>/data.json records the data the experiment's runs were trained on; later runs
    (and resumed ones) with other data are refused, so finished runs are never mixed with new data. Files
    added to the experiment (a new test split) are added to the record."""
    if not dist.is_main():
        return
    files = {str(p): file_sha256(p) for p in data_files(cfg) if p.exists()}
    path = cfg.model_dir / "data.json"
    with FileLock(cfg.model_dir / ".data.json.lock"):
        remove_temporaries(cfg.model_dir, of=path.name)
        recorded = read_json(path, "experiment data record") if path.exists() else {}
        if not isinstance(recorded, dict):
            raise InputError(f"{path}: expected a JSON object; remove it to record the data again")
        changed = sorted(k for k in set(files) & set(recorded) if files[k] != recorded[k])
        if changed:
            raise InputError(f"{path}: the runs of experiment '{cfg.experiment}' were made with other data "
                             f"({', '.join(changed[:3])} differ); use another experiment name or remove "
                             f"{cfg.model_dir} and result/{cfg.experiment}")
        if set(files) - set(recorded):
            write_json(path, {**recorded, **files})


# -- training runs -------------------------------------------------------------------------------------

def train_run(ctx: Context, model: VQAModel, spec: RunSpec) -> dict:
    """Run (or resume, or skip) one training run; leaves the model at the final weights read back from disk
    (exactly what a resumed or skipped run uses)."""
    summary = Trainer(ctx.cfg, model, ctx.data.train, ctx.data.valid, spec).fit()
    load_weights(model, spec.folder / "final" / "model.safetensors")
    return summary


def dense_settings(cfg: Config, loss: Optional[str] = None) -> dict:
    """The settings a dense fine-tune (and its question-only baseline) is computed with."""
    keys = DATA_KEYS + model_keys() + TRAIN_KEYS + ["blind_epochs", "lottery.rewind_steps"]
    return unit_settings(cfg, keys, **({"train__loss": loss} if loss else {}))


def dense(ctx: Context, seed: int, loss: str, folder: Path, capture_step: int = 0) -> tuple[VQAModel, dict]:
    """Fine-tune the full model of one seed from its initial weights; returns the model at its final
    weights and the run's summary."""
    cfg = ctx.cfg
    init = ctx.init_weights(seed)
    model = ctx.new_model(seed)
    load_weights(model, init)
    spec = RunSpec(folder=folder, seed=seed, loss=ctx.loss(loss, model, seed), epochs=cfg.train.epochs,
                   lr=cfg.train.lr, capture_step=capture_step, tag=f"seed {seed} dense {loss}")
    return model, train_run(ctx, model, spec)


DENSE_ROW = ("seed", "loss", "final", "best", "best_epoch", "tests", "blind", "epochs", "splits")


def _row_complete(path: Path, ctx: Context) -> bool:
    """A unit's result.json exists and covers every split of the config (a new test split extends it)."""
    return path.exists() and set(ctx.splits) <= set(read_object(path, ("splits",), "result row")["splits"])


def dense_unit(ctx: Context, seed: int) -> Unit:
    cfg, name = ctx.cfg, f"seed_{seed}/dense"
    folder = ctx.unit_dir(name)

    def work() -> None:
        started = time.time()
        model, summary = dense(ctx, seed, cfg.train.loss, folder / "run", capture_step=cfg.lottery.rewind_steps)
        load_weights(model, folder / "run" / "best" / "model.safetensors")
        tests = ctx.evaluate_and_predict(model, name)
        blind = ctx.blind(seed, cfg.train.loss)
        row = {"seed": seed, "loss": cfg.train.loss, "final": summary["final"], "best": summary["best"],
               "best_epoch": summary["best_epoch"], "tests": {k: v for k, v in tests.items() if k != cfg.data.valid},
               "blind": blind, "splits": ctx.splits, "seconds": round(time.time() - started, 1),
               "epochs": [{"epoch": r["epoch"], "loss": r["loss"], "valid": r["valid"]["overall"]}
                          for r in summary["history"]]}
        if dist.is_main():
            write_json(folder / "result.json", row)
        log.info("seed %d: valid %.2f (best epoch %d: %.2f), question-only %.2f", seed, summary["final"]["overall"],
                 summary["best_epoch"], summary["best"]["overall"], blind[cfg.data.valid]["overall"])

    return Unit(name=name, folder=folder, work=work, finished=lambda: _row_complete(folder / "result.json", ctx),
                settings=dense_settings(cfg), cleanup=(ctx.predictions_dir(name),))


def dense_rows(ctx: Context) -> dict[str, dict]:
    return {str(s): read_object(ctx.unit_dir(f"seed_{s}/dense") / "result.json", DENSE_ROW, "dense result")
            for s in ctx.cfg.seeds}


def run_finetune(cfg: Config, ctx: Optional[Context] = None) -> Optional[dict]:
    """Dense fine-tune + evaluation + blind baseline for every seed; writes finetune.json and a plot when
    every seed is finished (by this process or others)."""
    ctx = ctx or Context.load(cfg)
    if not run_units([dense_unit(ctx, s) for s in cfg.seeds], cfg.experiment):
        return None
    with tables_lock(cfg):
        return write_finetune(ctx)


def tables_lock(cfg: Config) -> FileLock:
    """Held while result/<experiment>/ tables are written (by whichever process finishes the grid)."""
    lock = FileLock(cfg.result_dir / ".tables.lock")
    lock.acquire()
    remove_temporaries(cfg.result_dir, recursive=False)
    return lock


def write_finetune(ctx: Context) -> dict:
    from .plots import plot_finetune

    cfg = ctx.cfg
    seeds = dense_rows(ctx)
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
    load_weights(model, ctx.unit_dir(f"seed_{seed}/dense") / "run" / "best" / "model.safetensors")
    with atomic_folder(folder, overwrite=True) as tmp:
        model.encoder.save_pretrained(str(tmp))
        ctx.data.tokenizer.save_pretrained(str(tmp))
    log.info("exported the encoder of seed %d to %s", seed, folder)


def _mean_over_seeds(seeds: dict, valid: str) -> dict:
    out = {}
    for k in ("final", "best"):
        vals = [s[k]["overall"] for s in seeds.values()]
        out[k] = {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals)), 4), "seeds": len(vals)}
    valid_blind = [s["blind"][valid]["overall"] for s in seeds.values()]
    out["blind"] = {"mean": round(float(np.mean(valid_blind)), 4), "std": round(float(np.std(valid_blind)), 4),
                    "seeds": len(valid_blind)}
    return out
