"""One training run: AdamW with linear warmup/decay, clipping, evaluation every epoch, best and last
checkpoints, and exact resumption.

A run lives in a folder:
  ckpt-<step>/   model.safetensors + trainer.pt + manifest.json: the state after the latest finished
                 epoch (or every N steps). Written as a whole in a temporary folder and published by one
                 rename, so weights and optimizer state always belong to the same step; older
                 checkpoints are removed after the new one is published.
  best/model.safetensors      weights of the best validation epoch
  final/         model.safetensors + summary.json: the finished run (its presence means done)
Rerunning a finished run returns its summary; an interrupted one continues from its newest checkpoint
with the optimizer, scheduler, RNG states and step restored, so a CPU run gives bit-identical weights to
one that was never interrupted, wherever it was killed.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from . import distributed as dist
from .config import Config
from .data import BatchSampler, VQADataset, loader
from .errors import TrainingDiverged
from .evaluation import autocast, evaluate, to_device
from .io import (InputError, atomic_folder, file_sha256, load_state, load_tensors, read_object, remove_temporaries, remove_tree,
                 save_state, save_tensors, write_json)
from .masks import MaskEnforcer

log = logging.getLogger("lxmert")


def quiet() -> bool:
    """No progress bars under CI, when output is not a terminal, or on ranks other than 0."""
    return bool(os.environ.get("CI")) or not sys.stderr.isatty() or not dist.is_main()


@dataclass
class RunSpec:
    """What a training run does beyond the config's defaults."""

    folder: Path
    seed: int
    loss: nn.Module
    epochs: int
    lr: float
    masks: Optional[dict[str, torch.Tensor]] = None
    params: Optional[list[nn.Parameter]] = None
    after_step: Optional[Callable[[int], None]] = None
    capture_step: int = 0
    tag: str = ""  # names the run in logs; with the seed it also seeds the run's RNG (dropout)
    before_save: Optional[Callable[[], None]] = None
    batch_size: Optional[int] = None  # the config's train.batch_size unless a stage sets its own
    warmup: Optional[float] = None  # the config's train.warmup unless a stage sets its own


class _Objective(nn.Module):
    """Model + loss in one module, so DDP synchronises the loss's own parameters too."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict) -> torch.Tensor:
        logits, pooled = self.model(batch)
        return self.loss(logits.float(), batch["target"], pooled.float(), batch["qtype"])


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay on matrices only: not biases, LayerNorms, or mask scores (decay would pull kept
    scores under the mask threshold regardless of the loss)."""
    return p.ndim >= 2 and not any(k in name for k in ("LayerNorm", "layer_norm", "scores"))


def _param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if _decays(n, p)]
    other = [p for n, p in named if not _decays(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _optimizer(objective: _Objective, spec: RunSpec, cfg: Config, device: torch.device):
    if spec.params is not None:
        ids = {id(p) for p in spec.params}
        named = [(n, p) for n, p in objective.named_parameters() if id(p) in ids]
    else:
        named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    return adamw(_param_groups(named, cfg.train.weight_decay), spec.lr, device)


def adamw(params, lr: float, device: torch.device, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel on CPU and CUDA: one kernel for all tensors instead of a Python loop
    over them (the embedded model has ~170 tensors; the unfused loop makes bench/training.py's tiny step
    13 % slower on one CPU thread, docs/PERFORMANCE.md). Same update rule, other rounding."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_best(path: Path, epoch: int) -> None:
    """best/ is written when an epoch beats the best so far, outside the checkpoint. A kill between the two
    re-runs the epoch on resume, which rewrites best/ with the same weights (training is deterministic); if a
    non-deterministic rerun did not (another best epoch, e.g. on a GPU without deterministic kernels), the
    best-on-valid weights of this run are gone: refuse rather than report another epoch's weights."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        written = (f.metadata() or {}).get("epoch")
    if written != str(epoch):
        raise InputError(f"{path}: holds the weights of epoch {written}, but the run's best validation epoch is "
                         f"{epoch} (a resumed run that did not repeat itself exactly); remove {path.parent.parent} "
                         "to train it again")


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs one RunSpec on a model and the loaded data."""

    def __init__(self, cfg: Config, model: nn.Module, train: VQADataset, valid: VQADataset, spec: RunSpec):
        self.cfg, self.model, self.train, self.valid, self.spec = cfg, model, train, valid, spec
        self.device = dist.device()
        self.objective = _Objective(model, spec.loss).to(self.device)
        self.enforcer = MaskEnforcer(model, spec.masks) if spec.masks else None
        self.batch_size = spec.batch_size or cfg.train.batch_size
        self.sampler = BatchSampler(len(train), self.batch_size, spec.seed, True, dist.rank(), dist.world())
        self.batches_per_epoch = len(self.sampler.global_batches())
        self.steps_per_epoch = self.batches_per_epoch // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(train)} training questions give no optimizer step with a batch size of "
                             f"{self.batch_size} over {dist.world()} process(es) and train.grad_accum="
                             f"{cfg.train.grad_accum}")
        total = self.steps_per_epoch * spec.epochs
        self.optimizer = _optimizer(self.objective, spec, cfg, self.device)
        self.trained = [p for g in self.optimizer.param_groups for p in g["params"]]
        from transformers import get_linear_schedule_with_warmup

        warmup = cfg.train.warmup if spec.warmup is None else spec.warmup
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(warmup * total), total)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and cfg.train.precision == "fp16")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.history: list[dict] = []
        self.best = -1.0
        self.runner = self._wrap()

    def _wrap(self) -> nn.Module:
        runner: nn.Module = self.objective
        if self.cfg.train.compile and self.device.type == "cuda":
            runner = torch.compile(runner)
        if dist.active():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The pooled output never uses the vision half of the last cross layer: those parameters
            # get no gradient, which DDP must be told about.
            runner = nn.parallel.DistributedDataParallel(runner, device_ids=ids, find_unused_parameters=True)
        return runner

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.spec.folder

    def _save_checkpoint(self) -> None:
        """Publish the state as one new folder ckpt-<step>, then drop the older ones."""
        if self.spec.before_save is not None:
            self.spec.before_save()
        if not dist.is_main():
            return
        name = f"{CHECKPOINT_PREFIX}{self.step:09d}-{self.epoch:04d}-{self.batch_in_epoch:07d}"
        with atomic_folder(self.folder / name, overwrite=True) as tmp:
            save_tensors(tmp / "model.safetensors", self.objective.state_dict())
            save_state(tmp / "trainer.pt", {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "history": self.history, "best": self.best,
                "loss_sum": self.loss_sum, "loss_count": self.loss_count, "rng": _rng_state(),
                "masked": sorted(self.spec.masks or {})})
            write_json(tmp / "manifest.json", {"step": self.step, "files": _digests(tmp)})
        for old in checkpoints(self.folder)[:-1]:
            remove_tree(old)

    def _resume(self) -> bool:
        """Continue from the newest complete checkpoint (its files checked against its manifest)."""
        found = checkpoints(self.folder)
        if not found:
            return False
        newest = found[-1]
        _check_digests(newest)
        weights = load_tensors(newest / "model.safetensors")
        check_compatible(self.objective.state_dict(), weights, newest / "model.safetensors")
        self.objective.load_state_dict(weights)
        state = load_state(newest / "trainer.pt")
        check_masked(sorted(self.spec.masks or {}), state.get("masked"), newest / "trainer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history, self.best = list(state["history"]), state["best"]
        self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]
        _set_rng_state(state["rng"])
        if dist.is_main():
            for old in found[:-1]:  # a kill between publishing a checkpoint and removing the older ones
                remove_tree(old)
        log.info("%s: resumed from %s at epoch %d, step %d", self.spec.tag, newest, self.epoch + 1, self.step)
        return True

    def _finish(self, summary: dict) -> None:
        """The finished run as one folder (final weights + summary), then no checkpoint is needed."""
        if self.spec.before_save is not None:
            self.spec.before_save()
        if dist.is_main():
            with atomic_folder(self.folder / "final", overwrite=True) as tmp:
                save_tensors(tmp / "model.safetensors", self.model.state_dict())
                write_json(tmp / "summary.json", summary)
            for old in checkpoints(self.folder):
                remove_tree(old)
        dist.barrier()

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        if is_finished(self.folder):
            if dist.is_main():  # a kill after publishing final/ and before removing the checkpoints
                for old in checkpoints(self.folder):
                    remove_tree(old)
            return run_summary(self.folder)
        if dist.is_main():
            for path in remove_temporaries(self.folder):
                log.info("%s: removed %s, left by an interrupted write", self.spec.tag, path)
        if not self._resume():
            # A fresh run seeds its own RNG, so its dropout does not depend on what this process ran
            # before (a rerun that skips finished runs must give the same numbers as one that did not).
            seed_everything(run_seed(self.spec.seed, self.spec.tag))
        if self.enforcer is not None:
            self.enforcer.apply()
        epochs = range(self.epoch, self.spec.epochs)
        for epoch in tqdm(epochs, desc=f"{self.spec.tag} epochs", disable=quiet(), leave=False):
            self.epoch = epoch
            started = time.time()
            loss = self._epoch()
            acc = evaluate(self.model, self.valid, self.cfg.train.eval_batch_size, self.device, self.cfg.train.precision)
            record = {"epoch": epoch + 1, "step": self.step, "loss": loss, "valid": acc,
                      "seconds": round(time.time() - started, 2)}
            self.history.append(record)
            self._report(record)
            if acc["overall"] > self.best:
                self.best = acc["overall"]
                if dist.is_main():
                    save_tensors(self.folder / "best" / "model.safetensors", self.model.state_dict(),
                                 metadata={"epoch": str(epoch + 1)})
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            if self.epoch < self.spec.epochs:
                self._save_checkpoint()
        best_epoch = max(self.history, key=lambda r: r["valid"]["overall"])
        summary = {"history": self.history, "final": self.history[-1]["valid"], "best": best_epoch["valid"],
                   "best_epoch": best_epoch["epoch"], "steps": self.step}
        if dist.is_main():
            _check_best(self.folder / "best" / "model.safetensors", best_epoch["epoch"])
        self._finish(summary)
        return summary

    def _epoch(self) -> float:
        cfg = self.cfg.train
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        batches = loader(self.train, self.sampler, self.cfg.data.num_workers, self.device.type == "cuda")
        self.objective.train()
        # Gradients of a last, incomplete accumulation group are dropped, never carried into the next
        # epoch: a checkpoint at the epoch's end does not hold them, so carrying them would break resuming.
        self.optimizer.zero_grad(set_to_none=True)
        if self.batch_in_epoch == 0:
            self.loss_sum, self.loss_count = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}", disable=quiet(), leave=False)
        for batch in bar:
            batch = to_device(batch, self.device)
            with autocast(self.device, cfg.precision):
                loss = self.runner(batch)
            value = loss.item()  # the step's one host sync: divergence check and running mean
            if not math.isfinite(value):
                raise TrainingDiverged(self._diverged(value, batch))
            self.scaler.scale(loss / cfg.grad_accum).backward()
            self.batch_in_epoch += 1
            self.loss_sum, self.loss_count = self.loss_sum + value, self.loss_count + 1
            if self.batch_in_epoch % cfg.grad_accum == 0:
                self._optimizer_step()
                bar.set_postfix(loss=f"{self.loss_sum / self.loss_count:.3f}")
        return round(dist.mean(self.loss_sum / max(self.loss_count, 1)), 6)

    def _diverged(self, value: float, batch: dict) -> str:
        """The divergence message: where, which inputs were not finite (if any), what is kept."""
        text = f"{self.spec.tag}: loss became {value} at step {self.step + 1} (epoch {self.epoch + 1})"
        bad = _non_finite_inputs(batch, self.train)
        if bad:
            text += f"; the batch holds non-finite inputs: {bad}"
        found = checkpoints(self.folder)
        if found:
            return text + f"; last good checkpoint: {found[-1]} (rerun resumes from it)"
        return text + "; no checkpoint was written yet (a rerun starts this run again)"

    def _optimizer_step(self) -> None:
        cfg = self.cfg.train
        if self.enforcer is not None:
            self.enforcer.zero_grads()
        if cfg.clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trained, cfg.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.enforcer is not None:
            self.enforcer.apply()
        self.step += 1
        if self.spec.after_step is not None:
            self.spec.after_step(self.step)
        if self.spec.capture_step and self.step == self.spec.capture_step and dist.is_main():
            save_tensors(self.folder / "rewind.safetensors", self.model.state_dict())
        if cfg.save_every_steps and self.step % cfg.save_every_steps == 0 and \
                self.batch_in_epoch < self.batches_per_epoch:  # the epoch's end checkpoints anyway
            self._save_checkpoint()

    def _report(self, record: dict) -> None:
        if not dist.is_main():
            return
        acc = record["valid"]
        per_type = ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k not in ("overall", "questions"))
        log.info("%s | epoch %d/%d | step %d | loss %.4f | valid %.2f (%s) | %.1fs", self.spec.tag,
                 record["epoch"], self.spec.epochs, record["step"], record["loss"], acc["overall"], per_type,
                 record["seconds"])
        metrics_log({"event": "epoch", "run": self.spec.tag, **record})


CHECKPOINT_PREFIX = "ckpt-"


def checkpoints(folder: Path) -> list[Path]:
    """The published checkpoints of a run folder, oldest first (names sort by step)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def is_finished(folder: Path) -> bool:
    return (folder / "final" / "summary.json").is_file()


def run_summary(folder: Path) -> dict:
    """The summary of a finished run (history, final and best accuracy, best epoch, steps)."""
    return read_object(folder / "final" / "summary.json", ("history", "final", "best", "best_epoch", "steps"),
                       "run summary")


def run_seed(seed: int, tag: str) -> int:
    """The RNG seed of a fresh run: from the experiment seed and the run's name, within torch's range."""
    return (seed * 1_000_003 + zlib.crc32(tag.encode())) % 2**63


def _digests(folder: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(folder.iterdir())}


def _check_digests(folder: Path) -> None:
    """A checkpoint is published whole, so a mismatch means damage from outside (disk, a hand edit)."""
    manifest = read_object(folder / "manifest.json", ("step", "files"), "checkpoint manifest")
    found = _digests(folder)
    found.pop("manifest.json", None)
    if found != manifest["files"]:
        raise InputError(f"{folder}: checkpoint files differ from its manifest (damaged outside this program); "
                         f"remove {folder} to restart the run from its beginning")


def _non_finite_inputs(batch: dict, dataset: VQADataset) -> str:
    """Which images of a batch have non-finite features or boxes (checked only after a divergence)."""
    bad = []
    for key in ("visual_feats", "visual_pos"):
        rows = (~torch.isfinite(batch[key].float())).flatten(1).any(1).nonzero().flatten().tolist()
        index = batch["index"].tolist()
        for r in rows[:3]:
            q = index[r]
            bad.append(f"{key} of question {dataset.split.question_ids[q]} (feature-store row "
                       f"{dataset.split.rows[q]} of {dataset.store.folder})")
    return "; ".join(bad)


_METRICS_PATH: Optional[Path] = None


def setup_logging(cfg: Config) -> None:
    """Readable log in logs/<experiment>.log (and the console), JSON lines in logs/<experiment>.jsonl."""
    global _METRICS_PATH
    logger = logging.getLogger("lxmert")
    logger.setLevel(logging.INFO)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    logging.getLogger("lxmert.modeling").setLevel(logging.INFO if dist.is_main() else logging.WARNING)
    if dist.is_main():
        cfg.log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(cfg.log_path)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
        _METRICS_PATH = cfg.log_path.with_suffix(".jsonl")
    else:
        logger.setLevel(logging.WARNING)


def set_log_prefix(prefix: str) -> None:
    """Mark this process's log lines (a worker of a study)."""
    for handler in logging.getLogger("lxmert").handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S"))


def metrics_log(record: dict) -> None:
    import json

    if _METRICS_PATH is not None and dist.is_main():
        with open(_METRICS_PATH, "a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def check_compatible(expected: dict, found: dict, source: Path) -> None:
    """Refuse weights made for another config: name what differs (keys or shapes)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise InputError(f"{source} does not match this config: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {extra[:5]}"
                         f"{'...' if len(extra) > 5 else ''}")
    for k, v in expected.items():
        if tuple(found[k].shape) != tuple(v.shape):
            raise InputError(f"{source} does not match this config: '{k}' has shape {tuple(found[k].shape)}, "
                             f"this config needs {tuple(v.shape)}")


def check_masked(expected: list[str], found: Optional[list[str]], source: Path) -> None:
    """Refuse to resume a masked run with another prunable set (e.g. include_embeddings changed): the
    weights have the same shapes, so only the names of the masked tensors tell."""
    if found is None or list(found) == list(expected):
        return
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    raise InputError(f"{source} was trained with another prunable set than this config: {len(found)} masked "
                     f"tensors there, {len(expected)} here; not masked there: {missing[:5]}"
                     f"{'...' if len(missing) > 5 else ''}, not masked here: {extra[:5]}"
                     f"{'...' if len(extra) > 5 else ''}")


def load_weights(model: nn.Module, path: Path) -> None:
    weights = load_tensors(path)
    check_compatible(model.state_dict(), weights, path)
    model.load_state_dict(weights)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
