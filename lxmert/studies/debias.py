"""Study B: compress and debias (Si et al. 2023) in three stages, with same-compute controls, a lottery-ticket
baseline and a question-only comparator per loss.

For every seed:
  stage 1  fine-tune the full model with each stage-1 loss (bce, lmh, lpf)                  -> "full"
  stage 2  from each stage-1 model, learn a mask per prunable weight (weights frozen; scores, answer
           head and the loss's own parameters trained) with each stage-2 loss, at every uniform
           and every per-modality sparsity; the setting is named <stage-1 loss>-<stage-2 loss>    -> "stage2"
  stage 3  optionally fine-tune each pruned model with its mask enforced, stage-2 loss       -> "stage3"
  control  each stage-1 model trained on densely with the stage-2 loss for as many epochs as stages 2
           and 3 add: tells "the subnetwork is better" from "more training"                  -> "control"
  lottery  low-magnitude one-shot mask from the BCE stage-1 weights at the uniform sparsities,
           rewound to the seed's initial weights and retrained with the mask (studies.tickets) -> "lottery"
Models are selected on the validation split only (the trainer keeps best/); every row (rows.DebiasRow)
reports the final and the best-on-valid model on every split, overall and per answer type, the question-only
accuracy of the seed for each loss beside it, the sparsity measured from the weights themselves and the
number of prunable weights per modality. The best-on-valid model of every row writes its predictions.

models/<exp>/seed_<s>/
    init.safetensors                        initial weights of the seed (shared by every stage 1)
    stage1_<loss>/                          unit: run/ + result.json
    <s1>-<s2>/<sparsity>/                   unit: stage2/ (run/, mask.safetensors, pruned.safetensors,
                                            best_pruned.safetensors, result.json), stage3/ (run/, result.json)
    control_<s1>-<s2>/                      unit: run/ + result.json
    lottery/<sparsity>/                     unit: level_<pct>/ (mask, run/, result.json) + result.json
<sparsity> is s50 for a uniform 0.5 and l70-v70-x70-p70 for per-modality values (percent removed).
Outputs: studies.debias_report.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from ..core import distributed as dist
from ..core import paths
from ..core.config import MODALITIES, Config, level_name
from ..core.files import load_tensors, read_object, remove_file, save_tensors, write_json
from ..core.logs import metrics_log
from ..core.paths import Run
from ..core.scheduler import Unit, run_units
from ..core.settings import DATA_KEYS, TRAIN_KEYS, model_keys, unit_settings
from ..data.datasets import BatchSampler
from ..modeling.vqa import VQAModel
from ..prune.learned import LearnedMasks, check_target
from ..prune.magnitude import check_level, prune
from ..prune.masks import full_mask, load_mask, load_mask_for, measure_weights, save_mask
from ..prune.prunable import prunable_tensors
from ..train.checkpoints import drop_weights, load_weights, run_summary
from ..train.trainer import RunSpec, Schedule
from .context import Context, tables_lock
from .debias_report import Target, pct, write_debias
from .dense import dense, dense_settings, question_only_rows, question_only_unit
from .priors import prior_rules
from .rows import DEBIAS_KEYS, DebiasRow, as_json, complete, measured
from .tickets import retrain_ticket, rewind_point

log = logging.getLogger("lxmert")

TAG_LETTERS = {"language": "l", "vision": "v", "cross": "x", "pooler": "p"}


def sparsity_settings(cfg: Config) -> list[tuple[str, Target]]:
    """(folder tag, target) of every stage-2 sparsity: uniform values, then per-modality mappings."""
    dc = cfg.debias
    out: list[tuple[str, Target]] = [(f"s{pct(s)}", s) for s in dc.sparsities]
    for values in dc.modality_sparsities:
        target = {m: values[m] for m in MODALITIES}
        out.append(("-".join(f"{TAG_LETTERS[m]}{pct(v)}" for m, v in target.items()), target))
    return out


# -- settings that decide what each unit computes ---------------------------------------------------------

def stage1_settings(cfg: Config, loss: str) -> dict:
    extra = ["debias.lmh_entropy"] if loss == "lmh" else ["debias.lpf_gamma"] if loss == "lpf" else []
    return {**dense_settings(cfg, loss), **unit_settings(cfg, extra)}


STAGE2_KEYS = ["debias.prunable", "debias.stage_start", "debias.stage2_epochs", "debias.stage2_lr", "debias.stage2_batch_size",
               "debias.stage2_warmup", "debias.reset_every", "debias.stage3", "debias.stage3_epochs",
               "debias.stage3_lr", "debias.stage3_batch_size", "debias.stage3_warmup", "debias.lmh_entropy",
               "debias.lpf_gamma"]
CONTROL_KEYS = ["debias.stage_start", "debias.stage2_epochs", "debias.stage3", "debias.stage3_epochs", "debias.lmh_entropy",
                "debias.lpf_gamma"]


def stage2_settings(cfg: Config, s1: str, s2: str) -> dict:
    return {**stage1_settings(cfg, s1), **unit_settings(cfg, STAGE2_KEYS), "stage2_loss": s2}


def control_settings(cfg: Config, s1: str, s2: str) -> dict:
    return {**stage1_settings(cfg, s1), **unit_settings(cfg, CONTROL_KEYS), "stage2_loss": s2}


def lottery_settings(cfg: Config) -> dict:
    keys = DATA_KEYS + model_keys() + TRAIN_KEYS + ["lottery.rewind_steps", "lottery.scope", "debias.prunable"]
    return unit_settings(cfg, keys, train__loss="bce")


# -- rows ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What a row is: its setting name, stage, losses and target sparsity (with its folder tag)."""

    setting: str
    stage: str
    stage1_loss: str
    stage2_loss: Optional[str] = None
    target: Target = 0.0
    tag: str = "full"


@dataclass(frozen=True)
class Planned:
    """One unit of a seed's grid (what the study runs and `python -m lxmert plan` costs)."""

    name: str
    kind: str  # stage1 | compress (stage 2, and stage 3 when debias.stage3) | control | lottery
    stage1_loss: str
    stage2_loss: Optional[str] = None
    tag: str = "full"
    target: Target = 0.0
    needs: tuple[str, ...] = ()
    stages: tuple[str, ...] = ("",)


def stage1_losses(cfg: Config) -> list[str]:
    """The stage-1 losses: the config's, and BCE for the lottery baseline (pruned from the BCE model)."""
    dc = cfg.debias
    return list(dict.fromkeys(dc.stage1_losses + (["bce"] if dc.lottery_baseline else [])))


def grid(cfg: Config, seed: int) -> list[Planned]:
    """The units of one seed, in study order."""
    dc = cfg.debias
    out = [Planned(paths.stage1(seed, loss), "stage1", loss) for loss in stage1_losses(cfg)]
    for s1 in dc.stage1_losses:
        needs = (paths.stage1(seed, s1),)
        for s2 in dc.stage2_losses:
            stages = ("stage2",) + (("stage3",) if dc.stage3 else ())
            out += [Planned(paths.compress(seed, s1, s2, tag), "compress", s1, s2, tag, target, needs, stages)
                    for tag, target in sparsity_settings(cfg)]
            if dc.controls:
                out.append(Planned(paths.control(seed, s1, s2), "control", s1, s2, needs=needs))
    if dc.lottery_baseline:
        out += [Planned(paths.ticket(seed, f"s{pct(s)}"), "lottery", "bce", None, f"s{pct(s)}", s,
                        (paths.stage1(seed, "bce"),)) for s in dc.sparsities]
    if cfg.blind.lxmert:
        out += [Planned(paths.question_only(seed, loss), "question_only", loss) for loss in row_losses(cfg)]
    return out


def row_losses(cfg: Config) -> list[str]:
    """Every loss a row of the study is trained with (the question-only models are reported per loss)."""
    return sorted(set(cfg.debias.stage1_losses) | set(cfg.debias.stage2_losses) |
                  ({"bce"} if cfg.debias.lottery_baseline else set()))


class SeedStudy:
    """The units of one seed."""

    def __init__(self, ctx: Context, seed: int):
        self.ctx, self.cfg, self.seed = ctx, ctx.cfg, seed
        self.results: list[Path] = []  # the result.json of every row, in study order

    def check(self) -> None:
        """Before any work: every stage-2 target and every lottery sparsity keeps some weight."""
        model = self.ctx.new_model(self.seed)
        prunable = prunable_tensors(model, self.cfg.debias.prunable)
        sizes: dict[str, list[int]] = {}
        for t in prunable:
            sizes.setdefault(t.modality, []).append(model.get_parameter(t.name).numel())
        for tag, target in sparsity_settings(self.cfg):
            check_target(sizes, target, "debias.sparsities" if tag.startswith("s") else "debias.modality_sparsities")
        if self.cfg.debias.lottery_baseline and self.cfg.debias.sparsities:
            check_level([n for ns in sizes.values() for n in ns], max(self.cfg.debias.sparsities),
                        self.cfg.lottery.scope, "debias.sparsities")

    def units(self) -> list[Unit]:
        cfg = self.cfg
        units = []
        for p in grid(cfg, self.seed):
            if p.kind == "stage1":
                units.append(self._unit(p.name, lambda p=p: self.full(p.stage1_loss), [""],
                                        stage1_settings(cfg, p.stage1_loss)))
            elif p.kind == "compress":
                units.append(self._unit(p.name, lambda p=p: self.compress(p.stage1_loss, p.stage2_loss, p.tag, p.target),
                                        p.stages, stage2_settings(cfg, p.stage1_loss, p.stage2_loss), p.needs,
                                        release=lambda p=p: self.release_compress(p.name)))
            elif p.kind == "question_only":
                units.append(question_only_unit(self.ctx, self.seed, p.stage1_loss,
                                                stage1_settings(cfg, p.stage1_loss)))
            elif p.kind == "control":
                units.append(self._unit(p.name, lambda p=p: self.control(p.stage1_loss, p.stage2_loss), [""],
                                        control_settings(cfg, p.stage1_loss, p.stage2_loss), p.needs,
                                        release=lambda p=p: self.release_run(self.ctx.paths.run(p.name))))
            else:
                units.append(self._unit(p.name, lambda p=p: self.lottery(p.target), [""], lottery_settings(cfg),
                                        p.needs, release=lambda p=p: self.release_run(
                                            self.ctx.paths.run(p.name, level_name(p.target)))))
        units[0].check = self.check
        return units

    def _unit(self, name: str, work: Callable[[], None], stages: list[str], settings: dict,
              needs: tuple[str, ...] = (), release: Optional[Callable[[], None]] = None) -> Unit:
        folder = self.ctx.paths.unit(name)
        self.results += [folder / sub / paths.RESULT for sub in stages]

        def finished() -> bool:
            return all(self._complete(folder / sub / paths.RESULT) for sub in stages)

        return Unit(name=name, folder=folder, work=work, finished=finished, settings=settings, needs=needs,
                    cleanup=(self.ctx.paths.predictions(name),), release=release)

    # -- what a finished unit keeps (checkpoints.keep) ----------------------------------------------------
    def release_run(self, run: Run) -> None:
        """A control's or a lottery ticket's weights: results, predictions and mask are all that stays."""
        if self.cfg.checkpoints.keep == "minimal":
            drop_weights(run, "best", "final")

    def release_compress(self, name: str) -> None:
        """Stage 2 keeps its masks and answer heads (its weights are rebuilt from them exactly:
        stage2_weights), stage 3 its result and predictions; stage 2's run (weights and scores) goes."""
        if self.cfg.checkpoints.keep != "minimal":
            return
        folder = self.ctx.paths.unit(name)
        drop_weights(Run(folder / "stage2" / paths.RUN), "best", "final")
        if not self.cfg.debias.stage3 or self._complete(folder / "stage3" / paths.RESULT):
            for file in (paths.PRUNED, paths.BEST_PRUNED):
                remove_file(folder / "stage2" / file)
        drop_weights(Run(folder / "stage3" / paths.RUN), "best", "final")

    def _complete(self, path: Path) -> bool:
        return complete(path, DebiasRow, self.ctx.splits, "study-B result")

    # -- the units ---------------------------------------------------------------------------------
    def stage1_run(self, loss: str) -> Run:
        return self.ctx.paths.run(paths.stage1(self.seed, loss))

    def full(self, loss: str) -> None:
        name = paths.stage1(self.seed, loss)
        started, run = time.time(), self.stage1_run(loss)
        capture = self.cfg.lottery.rewind_steps if loss == "bce" and self.cfg.debias.lottery_baseline else 0
        model, summary = dense(self.ctx, self.seed, loss, run, capture_step=capture)
        row = self._row(model, Setting(loss, "full", loss), run.final, run.best, summary, name, started,
                        epochs=len(summary["history"]))
        self._finish(self.ctx.paths.unit(name) / paths.RESULT, row)

    def compress(self, s1: str, s2: str, tag: str, target: Target) -> None:
        name = paths.compress(self.seed, s1, s2, tag)
        folder = self.ctx.paths.unit(name)
        stage1_epochs = self.cfg.train.epochs
        if not self._complete(folder / "stage2" / paths.RESULT):
            self.stage2(Setting(f"{s1}-{s2}", "stage2", s1, s2, target, tag), name, folder / "stage2", stage1_epochs)
        if self.cfg.debias.stage3 and not self._complete(folder / "stage3" / paths.RESULT):
            self.stage3(Setting(f"{s1}-{s2}", "stage3", s1, s2, target, tag), name, folder / "stage3",
                        stage1_epochs + self.cfg.debias.stage2_epochs)

    def stage2(self, what: Setting, name: str, folder: Path, before: int) -> None:
        started = time.time()
        if not (folder / paths.HEADS).exists():  # written last of what mask training leaves
            self._train_masks(what, folder)
        model = self.ctx.new_model(self.seed)
        summary = run_summary(Run(folder / paths.RUN))
        start = self.stage1_run(what.stage1_loss).weights(self.cfg.debias.stage_start)
        row = self._row(model, what, lambda: stage2_weights(start, folder, "final"),
                        lambda: stage2_weights(start, folder, "best"), summary, f"{name}/stage2",
                        started, epochs=before + self.cfg.debias.stage2_epochs)
        self._finish(folder / paths.RESULT, row)

    def _train_masks(self, what: Setting, folder: Path) -> None:
        """Stage 2 proper: learn the masks, then bake the final and the best-on-valid masks into weights."""
        dc = self.cfg.debias
        model = self.ctx.new_model(self.seed)
        load_weights(model, self.stage1_run(what.stage1_loss).weights(dc.stage_start))
        masks = LearnedMasks(model, what.target, dc.prunable)
        loss = self.ctx.loss(what.stage2_loss, model, self.seed)
        trainable = masks.scores() + list(model.head.parameters()) + list(loss.parameters())
        _train_only(model, trainable)
        schedule = Schedule.of(self.cfg, **dc.stage2_schedule())
        every, per_epoch = dc.reset_every, self._steps_per_epoch(schedule)

        def after_step(step: int) -> None:
            # On a schedule of steps only, never because a checkpoint is written (a checkpoint must change no
            # result); also at each epoch's end, so the model evaluated (and kept as best, and the final one)
            # meets its exact counts.
            if step % every == 0 or step % per_epoch == 0:
                masks.reset_thresholds()

        run = Run(folder / paths.RUN)
        spec = RunSpec(run=run, seed=self.seed, tag=f"seed {self.seed} {what.setting} {what.tag} stage 2", loss=loss,
                       schedule=schedule, params=trainable, after_step=after_step)
        self.ctx.train(model, spec)
        modalities = {t.name: t.modality for t in prunable_tensors(model, dc.prunable)}
        heads = {}
        for which, weights, out, mask in (("best", run.best, paths.BEST_PRUNED, paths.BEST_MASK),
                                          ("final", run.final, paths.PRUNED, paths.MASK)):
            load_weights(model, weights)
            masks.reset_thresholds()
            baked = _baked(model, masks)
            heads.update({f"{which}.{k}": v.detach().clone() for k, v in baked.items() if k.startswith("head.")})
            if dist.is_main():
                save_mask(folder / mask, masks.current_masks(), modalities)
                save_tensors(folder / out, baked)
        if dist.is_main():
            save_tensors(folder / paths.HEADS, heads)
        dist.barrier()  # the other ranks read these files next (stage 3)

    def stage3(self, what: Setting, name: str, folder: Path, before: int) -> None:
        dc, started = self.cfg.debias, time.time()
        model = self.ctx.new_model(self.seed)
        pruned, start = folder.parent / "stage2", dc.stage_start
        load_weights(model, stage2_weights(self.stage1_run(what.stage1_loss).weights(start), pruned, start), pruned)
        mask = load_mask_for(pruned / (paths.MASK if start == "final" else paths.BEST_MASK), model,
                             [t.name for t in prunable_tensors(model, dc.prunable)])
        run = Run(folder / paths.RUN)
        spec = RunSpec(run=run, seed=self.seed, tag=f"seed {self.seed} {what.setting} {what.tag} stage 3",
                       loss=self.ctx.loss(what.stage2_loss, model, self.seed),
                       schedule=Schedule.of(self.cfg, **dc.stage3_schedule()), masks=mask)
        summary = self.ctx.train(model, spec)
        row = self._row(model, what, run.final, run.best, summary, f"{name}/stage3", started,
                        epochs=before + dc.stage3_epochs)
        self._finish(folder / paths.RESULT, row)

    def control(self, s1: str, s2: str) -> None:
        """The stage-1 model trained on, dense, for the epochs stages 2 and 3 add (same compute)."""
        dc, started = self.cfg.debias, time.time()
        name = paths.control(self.seed, s1, s2)
        model = self.ctx.new_model(self.seed)
        load_weights(model, self.stage1_run(s1).weights(dc.stage_start))
        run = self.ctx.paths.run(name)
        spec = RunSpec(run=run, seed=self.seed, tag=f"seed {self.seed} control {s1}-{s2}",
                       loss=self.ctx.loss(s2, model, self.seed),
                       schedule=Schedule.of(self.cfg, epochs=dc.extra_epochs()))
        summary = self.ctx.train(model, spec)
        row = self._row(model, Setting(f"{s1}-{s2}", "control", s1, s2), run.final, run.best, summary, name,
                        started, epochs=self.cfg.train.epochs + dc.extra_epochs())
        # The stage-2 rows (without stage 3) add only stage2_epochs: the control's validation accuracy after
        # as many epochs is their same-compute point (its learning rate had not decayed yet by then).
        row.valid_after_stage2_epochs = summary["history"][dc.stage2_epochs - 1]["valid"]["overall"]
        self._finish(self.ctx.paths.unit(name) / paths.RESULT, row)

    def lottery(self, sparsity: float) -> None:
        """Low-magnitude one-shot mask of the BCE stage-1 weights (lottery.scope: each tensor, one global
        threshold or survivor rounds), rewound to the seed's initial weights (or the captured early step) and
        retrained with the mask, BCE, stage-1 schedule."""
        tag = f"s{pct(sparsity)}"
        name = paths.ticket(self.seed, tag)
        folder, started = self.ctx.paths.unit(name), time.time()
        level = folder / level_name(sparsity)
        model = self.ctx.new_model(self.seed)
        prunable = prunable_tensors(model, self.cfg.debias.prunable)  # the set mask training prunes
        stage1 = self.stage1_run("bce")
        rewind = rewind_point(self.ctx, self.seed, stage1)
        ticket = retrain_ticket(
            self.ctx, model, self.seed, level, prunable, stage1.final, rewind=rewind, loss="bce",
            tag=f"seed {self.seed} lottery {tag}",
            prune=lambda m: prune("low_magnitude", m, prunable, full_mask(m, prunable), sparsity,
                                  self.cfg.lottery.scope))
        run = Run(level / paths.RUN)
        row = self._row(model, Setting("lottery", "lottery", "bce", None, sparsity, tag), run.final, run.best,
                        ticket.summary, name, started, epochs=2 * self.cfg.train.epochs)
        row.lottery = {"schedule": "oneshot", "scope": self.cfg.lottery.scope,
                       "rewind_steps": self.cfg.lottery.rewind_steps, "prune_from": "final"}
        self._finish(folder / paths.RESULT, row)

    # -- helpers ---------------------------------------------------------------------------------
    def _steps_per_epoch(self, schedule: Schedule) -> int:
        """Optimizer steps per epoch, counted the way the trainer counts them."""
        sampler = BatchSampler(len(self.ctx.data.train), schedule.batch_size, self.seed, True, dist.rank(),
                               dist.world())
        return max(len(sampler.global_batches()) // schedule.grad_accum, 1)

    def _row(self, model: VQAModel, what: Setting, final: Weights, best: Weights, summary: dict, unit: str,
             started: float, epochs: int) -> DebiasRow:
        """A result row from the saved final and best-on-valid weights (plain weights, masks baked in; a file, or
        a function that rebuilds the state, called when it is loaded: one state in memory at a time): accuracy
        of both on every labelled split, predictions of the best, sparsity of the final."""
        _load(model, final)
        final_acc = self.ctx.evaluate(model)
        report = measure_weights(model, prunable_tensors(model, self.cfg.debias.prunable))
        _load(model, best)
        best_acc = self.ctx.evaluate_and_predict(model, unit)
        valid = self.cfg.data.valid
        losses = sorted({what.stage1_loss, what.stage2_loss or what.stage1_loss})
        return DebiasRow(
            setting=what.setting, seed=self.seed, stage=what.stage, stage1_loss=what.stage1_loss,
            stage2_loss=what.stage2_loss, sparsity_tag=what.tag, target_sparsity=what.target, epochs=epochs,
            **measured(report), valid_split=valid, valid=final_acc[valid]["overall"],
            valid_best=best_acc[valid]["overall"], final={k: v for k, v in final_acc.items() if k != valid},
            best={k: v for k, v in best_acc.items() if k != valid}, best_epoch=summary["best_epoch"],
            splits=self.ctx.splits, blind={loss: self.ctx.blind(self.seed, loss) for loss in losses},
            seconds=round(time.time() - started, 1), environment=self.ctx.environment)

    def _finish(self, path: Path, row: DebiasRow) -> None:
        if dist.is_main():
            write_json(path, as_json(row))
        dist.barrier()
        shifted = ", ".join(f"{k} {v['overall']:.2f}" for k, v in row.final.items())
        log.info("seed %d %s %s %s: valid %.2f, %s, measured sparsity %.4f", self.seed, row.setting, row.stage,
                 row.sparsity_tag, row.valid, shifted, row.measured_sparsity)
        metrics_log({"event": "debias", **as_json(row)})


def stage2_weights(stage1_final: Path, folder: Path, which: str) -> dict:
    """The final or best-on-valid weights of a stage-2 model: its file, or, once dropped (checkpoints.keep
    minimal), rebuilt exactly from what stage 2 cannot change: the frozen stage-1 final weights times the mask,
    with the answer head stage 2 trained."""
    path = folder / (paths.PRUNED if which == "final" else paths.BEST_PRUNED)
    if path.exists():
        return load_tensors(path)
    state = load_tensors(stage1_final)
    mask, _ = load_mask(folder / (paths.MASK if which == "final" else paths.BEST_MASK))
    for name, keep in mask.items():
        state[name] = state[name] * keep.to(state[name].dtype)
    heads = load_tensors(folder / paths.HEADS)
    state.update({k.removeprefix(f"{which}."): v for k, v in heads.items() if k.startswith(f"{which}.")})
    return state


# A row's weights: a safetensors file, or a function that rebuilds the state (stage 2, stage2_weights).
Weights = Union[Path, Callable[[], dict]]


def _load(model: VQAModel, weights: Weights) -> None:
    load_weights(model, weights if isinstance(weights, Path) else weights(), Path("stage 2 weights"))


def _baked(model: VQAModel, masks: LearnedMasks) -> dict:
    """The model's plain state dict with the current masks multiplied into the weights (the masks stay
    attached): the form every row's weights are saved and evaluated in."""
    state = {}
    current = masks.current_masks()
    for key, value in model.state_dict().items():
        module, mark, rest = key.partition(".parametrizations.weight.")
        if not mark or f"{module}.weight" not in current:  # weight norm's original0/1 (model.head=simple) stay
            state[key] = value
        elif rest == "original":  # the mask's own tensors (scores) go
            state[f"{module}.weight"] = value * current[f"{module}.weight"].to(value.dtype)
    return state


def _train_only(model: VQAModel, trainable: list) -> None:
    """Freeze every model parameter the optimizer does not own, so no gradient is computed for it
    (and DDP does not wait for gradients that never come)."""
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def run_debias(cfg: Config) -> Optional[dict]:
    """The whole grid for every seed; writes debias.json, a table and one plot per test split when all units
    are finished (by this process or others)."""
    ctx = Context.load(cfg)
    ctx.check_question_only()
    studies = [SeedStudy(ctx, seed) for seed in cfg.seeds]
    units = [u for study in studies for u in study.units()]
    if not run_units(units, cfg.experiment):
        return None
    rows = [read_object(path, DEBIAS_KEYS, "study-B result") for study in studies for path in study.results]
    result = {"experiment": cfg.experiment, "valid_split": cfg.data.valid, "test_splits": list(ctx.data.tests),
              "seeds": list(cfg.seeds), "rows": rows, "environment": ctx.environment,
              "question_only": question_only_rows(ctx, row_losses(cfg)),
              "priors": prior_rules(ctx.data.train, ctx.data.tests)}
    with tables_lock(cfg):
        if dist.is_main():
            write_debias(cfg, result)
    return result
