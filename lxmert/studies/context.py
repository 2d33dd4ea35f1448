"""A loaded experiment, shared by every unit of a study: its config, paths and data, and what the units need of
them (models built from a seed, losses, evaluation with predictions, question-only baselines, training runs),
plus the experiment-wide checks made before any work."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..core import distributed as dist
from ..core import environment
from ..core.config import Config
from ..core.environment import check_device
from ..core.errors import InputError
from ..core.files import (
    file_sha256,
    load_tensors,
    read_json,
    remove_temporaries,
    save_tensors,
    tensor_metadata,
    write_json,
)
from ..core.locks import FileLock
from ..core.logs import setup_logging
from ..core.paths import Experiment
from ..core.scheduler import once
from ..core.settings import DATA_KEYS, model_keys, plain, setting_changes, unit_settings
from ..data.datasets import Data, VQADataset, load_data
from ..data.features import sample_rows
from ..embedded.generator import prepare_embedded
from ..embedded.pretrain import ensure_pretrained
from ..modeling.losses import make_loss, question_type_prior
from ..modeling.vqa import VQAModel, build_model, check_inputs
from ..train.blind import train_blind
from ..train.checkpoints import run_seed, seed_everything
from ..train.evaluation import accuracy, predict, predictions_json, to_device
from ..train.trainer import RunSpec, train_run

log = logging.getLogger("lxmert")


@dataclass
class Context:
    """A loaded experiment: its config, output paths and data (loaded once, shared by every run)."""

    cfg: Config
    data: Data

    @classmethod
    def load(cls, cfg: Config) -> "Context":
        check_device(cfg)
        dist.init()
        check_writable(cfg)
        setup_logging(cfg)
        log.info("experiment %s: %s", cfg.experiment, environment.summary(environment.describe(cfg)))
        log.info("experiment %s: loading data from %s", cfg.experiment, cfg.data.root)
        if cfg.data.dataset == "embedded":
            prepare_embedded(cfg, log.info)
        data = load_data(cfg, log.info)
        ensure_pretrained(cfg)  # the embedded benchmark's stand-in encoder, made once (embedded/pretrain.py)
        largest = max(int(ds.split.input_ids.max()) for ds in [data.train, data.valid, *data.tests.values()])
        check_inputs(cfg.model, largest, data.store.feat_dim, cfg.data.max_seq_length)
        check_data_fingerprint(cfg, data)
        return cls(cfg, data)

    @functools.cached_property
    def paths(self) -> Experiment:
        return Experiment(self.cfg)

    @functools.cached_property
    def environment(self) -> dict:
        """What this process runs on (core.environment.describe): recorded in every row and result file."""
        return environment.describe(self.cfg)

    @property
    def splits(self) -> list[str]:
        """Every split a model is evaluated on: the validation split, then the test splits."""
        return [self.cfg.data.valid, *self.data.tests]

    @property
    def labelled(self) -> list[str]:
        return [n for n in self.splits if self.dataset(n).split.has_labels]

    def dataset(self, name: str) -> VQADataset:
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
        path = self.paths.init(seed)
        mine = init_settings(self.cfg)
        drawn = seed if self.cfg.train.dense_seed is None else self.cfg.train.dense_seed
        once(path.parent, path.exists,
             lambda: save_tensors(path, self.new_model(drawn).state_dict(),
                                  metadata={"settings": json.dumps(mine, sort_keys=True)}), of=path.name)
        check_init(path, mine, lambda: self._rebuilt_init(drawn))
        return path

    def _rebuilt_init(self, seed: int) -> dict:
        """The seed's initial weights built again, every RNG (python, numpy, torch) left as it was."""
        with rng_kept():
            return self.new_model(seed).state_dict()

    def check_question_only(self) -> None:
        """Before any training, with blind.lxmert: one forward and backward of the question-only model (the
        first seed's initial weights, the image zeroed) on two training questions. With the image zeroed, an
        LXMERT encoder whose biases are all zero (a fresh one, model.pretrained null: transformers initialises
        every bias to zero) feeds every vision-layer LayerNorm a constant input, whose backward multiplies the
        gradient by 1/sqrt(eps) (1e6 at LXMERT's eps 1e-12) per LayerNorm; from a few vision layers on (base
        size: 5 + 5) the gradients overflow and the first step leaves NaN weights. Refused here, in one line,
        instead of a divergence after the dense units have trained."""
        if not self.cfg.blind.lxmert:
            return
        with rng_kept():  # the forward draws dropout too: every RNG is left as it was
            model = self.new_model(self.cfg.seeds[0])
            model.sees_image = False
            batch = to_device(self.data.train.batch([0, min(1, len(self.data.train) - 1)]), dist.device())
            logits, _ = model(batch)
            torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["target"]).backward()
            bad = [n for n, p in model.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
        bad = dist.broadcast(bad)  # one verdict for every process (rank 0's)
        if bad:
            raise InputError(
                f"the question-only LXMERT (blind.lxmert) cannot train from these weights: with the image zeroed "
                f"{len(bad)} gradients are not finite ({bad[0]}, ...), because the encoder's biases give its vision "
                f"layers a constant input (model.pretrained={self.cfg.model.pretrained or 'null'}: a fresh encoder has zero "
                f"biases) and each LayerNorm then scales the gradient by 1/sqrt(eps); give pretrained weights "
                f"(model.pretrained) or set blind.lxmert=false")

    def train(self, model: VQAModel, spec: RunSpec) -> dict:
        """Run (or resume, or skip) one training run on the experiment's training and validation splits."""
        return train_run(model, self.data.train, self.data.valid, spec)

    def evaluate(self, model: VQAModel, splits: Optional[list[str]] = None) -> dict[str, dict]:
        """Accuracy on the validation split and every labelled test split (or the named ones)."""
        out = {}
        for name in self.labelled:
            if splits is None or name in splits:
                ds = self.dataset(name)
                out[name] = accuracy(ds, predict(model, ds, self.cfg.train.eval_batch_size, dist.device(),
                                                 self.cfg.train.precision, self.cfg.data.num_workers))
        return out

    def importance_batches(self, model: VQAModel, seed: int, count: int, loss: str
                           ) -> tuple[list[dict], Callable[[dict], torch.Tensor]]:
        """`count` training batches of train.batch_size questions, a sample seeded by [seed, 7] (one fixed draw
        per seed), and
        the study's loss of the model on a batch (what gradient importance averages)."""
        train, size = self.data.train, self.cfg.train.batch_size
        order = np.random.default_rng([seed, 7]).permutation(len(train))[:count * size]
        batches = [train.batch(sorted(order[i:i + size].tolist())) for i in range(0, len(order), size)]
        criterion = self.loss(loss, model, seed)
        device = dist.device()

        def loss_of(batch: dict) -> torch.Tensor:
            batch = to_device(batch, device)
            logits, pooled = model(batch)
            return criterion(logits.float(), batch["target"], pooled.float(), batch["qtype"])
        return batches, loss_of

    def valid_accuracy(self, model: VQAModel) -> float:
        return self.evaluate(model, [self.cfg.data.valid])[self.cfg.data.valid]["overall"]

    def evaluate_and_predict(self, model: VQAModel, unit: str) -> dict[str, dict]:
        """One prediction pass per split with the model as it is: accuracy on the labelled splits and
        result/<exp>/predictions/<unit>/<split>.json for every split (the EvalAI format)."""
        out = {}
        for name in self.splits:
            ds = self.dataset(name)
            preds = predict(model, ds, self.cfg.train.eval_batch_size, dist.device(), self.cfg.train.precision,
                            self.cfg.data.num_workers)
            if ds.split.has_labels:
                out[name] = accuracy(ds, preds)
            if dist.is_main():
                write_json(self.paths.predictions(unit) / f"{name}.json",
                           predictions_json(ds, preds, self.data.vocab.label2ans), indent=None)
        return out

    def blind(self, seed: int, loss: str = "bce") -> dict[str, dict]:
        """Question-only accuracy on the validation and labelled test splits for a seed and a training loss
        (made once, shared by every unit of the seed)."""
        path = self.paths.blind(seed, loss)

        def covered() -> bool:
            return path.exists() and set(self.labelled) <= set(read_json(path))

        def make() -> None:
            sets = {name: self.dataset(name) for name in self.labelled}
            write_json(path, train_blind(self.data.train, sets, len(self.data.tokenizer), seed, self.cfg.blind,
                                         loss=loss, prior=None if loss == "bce" else self.prior,
                                         debias=self.cfg.debias))

        once(path.parent, covered, make, of=path.name)
        return dist.broadcast(read_json(path) if dist.is_main() else None)


@contextlib.contextmanager
def rng_kept():
    """Run the block with every RNG (python, numpy, torch CPU and current CUDA device) restored afterwards."""
    saved = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def tables_lock(cfg: Config) -> FileLock:
    """Held while result/<experiment>/ tables are written (by whichever process finishes the grid)."""
    paths = Experiment(cfg)
    lock = FileLock(paths.tables_lock)
    lock.acquire()
    remove_temporaries(paths.results, recursive=False)
    return lock


# -- experiment-wide checks --------------------------------------------------------------------------

def init_settings(cfg: Config) -> dict:
    """The settings recorded with a seed's initial weights: the data and model keys every unit records too (a
    superset of what the weights depend on: vocabulary, answers, feature size, encoder, head) and the seed
    they are drawn from (train.dense_seed)."""
    return plain(unit_settings(cfg, DATA_KEYS + model_keys() + ["train.dense_seed"]))


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
    paths = Experiment(cfg)
    for folder in (paths.models, paths.results, paths.log.parent):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not a folder" if not existing.is_dir() else "is not writable"
            raise InputError(f"cannot write to {folder}: {existing} {what}; fix the permissions or run elsewhere")


def data_files(cfg: Config) -> list[Path]:
    """The files an experiment's numbers depend on: question files, answer vocabulary, and a local pretrained
    encoder's weights (the feature store is fingerprinted by the rows the splits use: used_rows)."""
    d = cfg.data
    root = Path(d.root)
    names = list(d.train) + [d.valid] + list(d.test)
    files = [root / f"{n}.json" for n in names] + [root / d.ans2label]
    if cfg.model.pretrained and Path(cfg.model.pretrained).is_dir():
        files += sorted(Path(cfg.model.pretrained).glob("*.safetensors"))
    return files


def used_rows(data: Data) -> dict[str, str]:
    """{'<store> rows of <split>': digest} for every loaded split: the ids of the images the split uses, their
    arrays' shape and a sample of their rows (features.sample_rows). Images added to the store later (the
    test2015 features of a test-server split) change no digest of a split that does not use them."""
    out = {}
    store = data.store
    for ds in [data.train, data.valid, *data.tests.values()]:
        rows = np.unique(ds.split.rows)
        digest = hashlib.sha256(json.dumps([store.ids[r] for r in rows.tolist()]).encode())
        digest.update(str((store.num_boxes, store.feat_dim, str(store._features.dtype))).encode())
        for r in rows[sample_rows(len(rows))]:
            digest.update(np.ascontiguousarray(store._features[r]).tobytes())
            digest.update(np.ascontiguousarray(store._boxes[r]).tobytes())
        out[f"{store.folder} rows of {ds.split.name}"] = digest.hexdigest()
    return out


def check_data_fingerprint(cfg: Config, data: Data) -> None:
    """models/<experiment>/data.json records the data the experiment's runs were trained on; later runs
    (and resumed ones) with other data are refused, so finished runs are never mixed with new data. Files
    added to the experiment (a new test split) are added to the record."""
    if not dist.is_main():
        return
    paths = Experiment(cfg)
    files = {**{str(p): file_sha256(p) for p in data_files(cfg) if p.exists()}, **used_rows(data)}
    path = paths.data_record
    with FileLock(path.parent / f".{path.name}.lock"):
        remove_temporaries(path.parent, of=path.name)
        recorded = read_json(path, "experiment data record") if path.exists() else {}
        if not isinstance(recorded, dict):
            raise InputError(f"{path}: expected a JSON object; remove it to record the data again")
        changed = sorted(k for k in set(files) & set(recorded) if files[k] != recorded[k])
        if changed:
            raise InputError(f"{path}: the runs of experiment '{cfg.experiment}' were made with other data "
                             f"({', '.join(changed[:3])} differ); use another experiment name or remove "
                             f"{paths.models} and {paths.results}")
        if set(files) - set(recorded):
            write_json(path, {**recorded, **files})
