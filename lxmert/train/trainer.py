"""One training run: AdamW with linear warmup/decay, clipping, evaluation every epoch, best and last
checkpoints, and exact resumption.

A run lives in a folder (core.paths.Run):
  ckpt-<step>/   model.safetensors + trainer.pt + manifest.json: the state after the latest finished
                 epoch (or every N steps). Written as a whole in a temporary folder and published by one
                 rename, so weights and optimizer state always belong to the same step; older
                 checkpoints are removed after the new one is published.
  best/model.safetensors      weights of the best validation epoch
  final/         model.safetensors + summary.json: the finished run (its presence means done)
Rerunning a finished run returns its summary; an interrupted one continues from its newest checkpoint
with the optimizer, scheduler, RNG states and step restored, so a CPU run gives bit-identical weights to
one that was never interrupted, wherever it was killed.

Everything a run does is in its RunSpec: the schedule (epochs, lr, batch size, warmup, clip, ...) is
resolved from the config when the spec is made (Schedule.of), never filled in here.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from ..core import distributed as dist
from ..core.config import Config
from ..core.errors import InputError, TrainingDiverged
from ..core.files import (
    atomic_folder,
    load_state,
    load_tensors,
    remove_temporaries,
    remove_tree,
    save_state,
    save_tensors,
    write_json,
)
from ..core.logs import metrics_log, quiet
from ..core.paths import Run
from ..data.datasets import BatchSampler, VQADataset, loader
from ..prune.masks import MaskEnforcer
from .checkpoints import (
    check_best,
    check_compatible,
    check_digests,
    check_masked,
    digests,
    is_finished,
    load_weights,
    resumed_rng,
    rng_state,
    run_seed,
    run_summary,
    seed_everything,
    set_rng_state,
)
from .evaluation import autocast, evaluate, to_device
from .optimizers import optimizer

log = logging.getLogger("lxmert")


@dataclass(frozen=True)
class Schedule:
    """Every training setting of a run, resolved."""

    epochs: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    optimizer: str
    warmup: float
    clip: float
    precision: str
    compile: bool
    eval_batch_size: int
    save_every_steps: int
    log_every: int
    num_workers: int
    prefetch_factor: int

    @classmethod
    def of(cls, cfg: Config, **stage) -> "Schedule":
        """The config's train section (and data.num_workers), with the values a stage sets itself on top
        (e.g. DebiasConfig.stage2_schedule())."""
        t = cfg.train
        return replace(cls(epochs=t.epochs, batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr,
                           weight_decay=t.weight_decay, optimizer=t.optimizer, warmup=t.warmup, clip=t.clip, precision=t.precision,
                           compile=t.compile, eval_batch_size=t.eval_batch_size,
                           save_every_steps=t.save_every_steps, log_every=t.log_every,
                           num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor), **stage)


@dataclass
class RunSpec:
    """One training run: where, what it trains with, and what it does besides the plain loop."""

    run: Run
    seed: int
    tag: str  # names the run in logs; with the seed it also seeds the run's RNG (dropout)
    loss: nn.Module
    schedule: Schedule
    masks: Optional[dict[str, torch.Tensor]] = None  # fixed masks, enforced after every step
    params: Optional[list[nn.Parameter]] = None  # the parameters trained (default: every one that requires grad)
    after_step: Optional[Callable[[int], None]] = None
    capture_step: int = 0  # also save the weights after this many steps (run.rewind)


class _Objective(nn.Module):
    """Model + loss in one module, so DDP synchronises the loss's own parameters too."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict) -> torch.Tensor:
        logits, pooled = self.model(batch)
        return self.loss(logits.float(), batch["target"], pooled.float(), batch["qtype"])


def _optimizer(objective: _Objective, spec: RunSpec, device: torch.device) -> torch.optim.Optimizer:
    if spec.params is not None:
        ids = {id(p) for p in spec.params}
        named = [(n, p) for n, p in objective.named_parameters() if id(p) in ids]
    else:
        named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    s = spec.schedule
    return optimizer(s.optimizer, named, s.lr, s.weight_decay, device)


class Trainer:
    """Runs one RunSpec on a model and the loaded data."""

    def __init__(self, model: nn.Module, train: VQADataset, valid: VQADataset, spec: RunSpec):
        self.model, self.train, self.valid, self.spec = model, train, valid, spec
        s = self.schedule = spec.schedule
        self.device = dist.device()
        self.objective = _Objective(model, spec.loss).to(self.device)
        self.enforcer = MaskEnforcer(model, spec.masks) if spec.masks else None
        self.sampler = BatchSampler(len(train), s.batch_size, spec.seed, True, dist.rank(), dist.world())
        self.batches_per_epoch = len(self.sampler.global_batches())
        self.steps_per_epoch = self.batches_per_epoch // s.grad_accum
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(train)} training questions give no optimizer step with a batch size of "
                             f"{s.batch_size} over {dist.world()} process(es) and train.grad_accum={s.grad_accum}")
        total = self.steps_per_epoch * s.epochs
        self.optimizer = _optimizer(self.objective, spec, self.device)
        self.trained = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(s.warmup * total), total)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and s.precision == "fp16")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # losses not yet read on the host
        self.history: list[dict] = []
        self.best = -1.0
        self.runner = self._wrap()

    def _wrap(self) -> nn.Module:
        """DDP around the objective, then torch.compile around that (PyTorch's order for DDP: the compiler
        splits the graph at DDP's bucket boundaries so communication overlaps the backward pass)."""
        runner: nn.Module = self.objective
        if dist.active():
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The pooled output never uses the vision half of the last cross layer: those parameters
            # get no gradient, which DDP must be told about.
            runner = nn.parallel.DistributedDataParallel(runner, device_ids=ids, find_unused_parameters=True)
        self.ddp = runner if dist.active() else None
        if self.schedule.compile and self.device.type == "cuda":
            runner = torch.compile(runner)
        return runner

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def run(self) -> Run:
        return self.spec.run

    def _save_checkpoint(self) -> None:
        """Publish the state as one new folder ckpt-<step>, then drop the older ones. Saving changes nothing
        the run computes: a run checkpointed every step ends with the same weights as one never checkpointed."""
        self._flush()  # a diverged loss is found before its weights are saved
        states = dist.gather(rng_state())
        if not dist.is_main():
            return
        with atomic_folder(self.run.checkpoint(self.step, self.epoch, self.batch_in_epoch), overwrite=True) as tmp:
            save_tensors(tmp / "model.safetensors", self.objective.state_dict())
            save_state(tmp / "trainer.pt", {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "history": self.history, "best": self.best,
                "loss_sum": self.loss_sum, "loss_count": self.loss_count, "rng": states[0], "rngs": states,
                "masked": sorted(self.spec.masks or {})})
            write_json(tmp / "manifest.json", {"step": self.step, "files": digests(tmp)})
        for old in self.run.checkpoints()[:-1]:
            remove_tree(old)

    def _resume(self) -> bool:
        """Continue from the newest complete checkpoint (its files checked against its manifest)."""
        found = self.run.checkpoints()
        if not found:
            return False
        newest = found[-1]
        check_digests(newest)
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
        set_rng_state(resumed_rng(state, self.spec.seed, self.spec.tag))
        if dist.is_main():
            for old in found[:-1]:  # a kill between publishing a checkpoint and removing the older ones
                remove_tree(old)
        log.info("%s: resumed from %s at epoch %d, step %d", self.spec.tag, newest, self.epoch + 1, self.step)
        return True

    def _finish(self, summary: dict) -> None:
        """The finished run as one folder (final weights + summary), then no checkpoint is needed."""
        if dist.is_main():
            with atomic_folder(self.run.final.parent, overwrite=True) as tmp:
                save_tensors(tmp / self.run.final.name, self.model.state_dict())
                write_json(tmp / self.run.summary.name, summary)
            for old in self.run.checkpoints():
                remove_tree(old)
        dist.barrier()

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        if is_finished(self.run):
            if dist.is_main():  # a kill after publishing final/ and before removing the checkpoints
                for old in self.run.checkpoints():
                    remove_tree(old)
            return run_summary(self.run)
        if dist.is_main():
            for path in remove_temporaries(self.run.folder):
                log.info("%s: removed %s, left by an interrupted write", self.spec.tag, path)
        if not self._resume():
            # A fresh run seeds its own RNG, so its dropout does not depend on what this process ran
            # before (a rerun that skips finished runs must give the same numbers as one that did not).
            seed_everything(run_seed(self.spec.seed, self.spec.tag))
        if self.enforcer is not None:
            self.enforcer.apply()
        s = self.schedule
        for epoch in tqdm(range(self.epoch, s.epochs), desc=f"{self.spec.tag} epochs", disable=quiet(), leave=False):
            self.epoch = epoch
            started = time.time()
            loss = self._epoch()
            acc = evaluate(self.model, self.valid, s.eval_batch_size, self.device, s.precision, s.num_workers)
            record = {"epoch": epoch + 1, "step": self.step, "loss": loss, "valid": acc,
                      "seconds": round(time.time() - started, 2)}
            self.history.append(record)
            self._report(record)
            if acc["overall"] > self.best:
                self.best = acc["overall"]
                if dist.is_main():
                    save_tensors(self.run.best, self.model.state_dict(), metadata={"epoch": str(epoch + 1)})
            self.epoch, self.batch_in_epoch = epoch + 1, 0
            if self.epoch < s.epochs:
                self._save_checkpoint()
        best_epoch = max(self.history, key=lambda r: r["valid"]["overall"])
        summary = {"history": self.history, "final": self.history[-1]["valid"], "best": best_epoch["valid"],
                   "best_epoch": best_epoch["epoch"], "steps": self.step}
        if dist.is_main():
            check_best(self.run.best, best_epoch["epoch"])
        self._finish(summary)
        return summary

    def _epoch(self) -> float:
        s = self.schedule
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        batches = loader(self.train, self.sampler, s.num_workers, self.device.type == "cuda", s.prefetch_factor)
        self.objective.train()
        # Gradients of a last, incomplete accumulation group are dropped, never carried into the next
        # epoch: a checkpoint at the epoch's end does not hold them, so carrying them would break resuming.
        self.optimizer.zero_grad(set_to_none=True)
        if self.batch_in_epoch == 0:
            self.loss_sum, self.loss_count = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}", disable=quiet(), leave=False)
        for batch in bar:
            index = batch["index"]
            batch = to_device(batch, self.device)
            last = (self.batch_in_epoch + 1) % s.grad_accum == 0
            # DDP all-reduces the gradients of the last micro-step of an accumulation group only
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with autocast(self.device, s.precision):
                    loss = self.runner(batch)
                self.scaler.scale(loss / s.grad_accum).backward()
            self.pending.append((loss.detach(), index, self.step + 1))  # read on the host every log_every steps
            self.batch_in_epoch += 1
            if last:
                self._optimizer_step()
                if self.step % s.log_every == 0:
                    self._flush()
                    bar.set_postfix(loss=f"{self.loss_sum / max(self.loss_count, 1):.3f}")
        self._flush()
        return round(dist.mean(self.loss_sum / max(self.loss_count, 1)), 6)

    def _flush(self) -> None:
        """The one host sync of the losses since the last: the running mean, and divergence named by its step."""
        if not self.pending:
            return
        values = torch.stack([loss for loss, _, _ in self.pending]).float().cpu().tolist()
        for value, (_, index, step) in zip(values, self.pending):
            if not math.isfinite(value):
                raise TrainingDiverged(self._diverged(value, index, step))
        self.loss_sum, self.loss_count = self.loss_sum + sum(values), self.loss_count + len(values)
        self.pending = []

    def _diverged(self, value: float, index: torch.Tensor, step: int) -> str:
        """The divergence message: where, which inputs were not finite (if any), what is kept."""
        text = f"{self.spec.tag}: loss became {value} at step {step} (epoch {self.epoch + 1})"
        bad = _non_finite_inputs(self.train.batch(index.tolist()), self.train)
        if bad:
            text += f"; the batch holds non-finite inputs: {bad}"
        found = self.run.checkpoints()
        if found:
            return text + f"; last good checkpoint: {found[-1]} (rerun resumes from it)"
        return text + "; no checkpoint was written yet (a rerun starts this run again)"

    def _optimizer_step(self) -> None:
        s = self.schedule
        if self.enforcer is not None:
            self.enforcer.zero_grads()
        if s.clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trained, s.clip)
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
            save_tensors(self.run.rewind, self.model.state_dict())
        if s.save_every_steps and self.step % s.save_every_steps == 0 and \
                self.batch_in_epoch < self.batches_per_epoch:  # the epoch's end checkpoints anyway
            self._save_checkpoint()

    def _report(self, record: dict) -> None:
        if not dist.is_main():
            return
        acc = record["valid"]
        per_type = ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if k not in ("overall", "questions"))
        log.info("%s | epoch %d/%d | step %d | loss %.4f | valid %.2f (%s) | %.1fs", self.spec.tag,
                 record["epoch"], self.schedule.epochs, record["step"], record["loss"], acc["overall"], per_type,
                 record["seconds"])
        metrics_log({"event": "epoch", "run": self.spec.tag, **record})


def train_run(model: nn.Module, train: VQADataset, valid: VQADataset, spec: RunSpec) -> dict:
    """Run (or resume, or skip) one training run; leaves the model at the final weights read back from disk
    (exactly what a resumed or skipped run uses)."""
    summary = Trainer(model, train, valid, spec).fit()
    if not spec.run.final.exists():
        raise InputError(f"{spec.run.folder}: the run is finished but its weights were not kept (checkpoints.keep: "
                         f"minimal), and they are needed again (a split added to the experiment?); remove "
                         f"{spec.run.folder} and run again with checkpoints.keep=all to retrain it from its start "
                         "(the same weights on a CPU)")
    load_weights(model, spec.run.final)
    return summary


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
