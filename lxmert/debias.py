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
           rewound to the seed's initial weights and retrained with the mask                 -> "lottery"
Models are selected on the validation split only (the trainer keeps best/); every row reports the final
and the best-on-valid model on every split, overall and per answer type, the question-only accuracy of
the seed for each loss beside it, the sparsity measured from the weights themselves and the number of
prunable weights per modality. The best-on-valid model of every row writes its predictions.

models/<exp>/seed_<s>/
    init.safetensors                        initial weights of the seed (shared by every stage 1)
    stage1_<loss>/                          unit: run/ + result.json
    <s1>-<s2>/<sparsity>/                   unit: stage2/ (run/, mask.safetensors, pruned.safetensors,
                                            best_pruned.safetensors, result.json), stage3/ (run/, result.json)
    control_<s1>-<s2>/                      unit: run/ + result.json
    lottery/<sparsity>/                     unit: level_<pct>/ (mask, run/, result.json) + result.json
result/<exp>/debias.json, debias_table.{md,png}, debias_answer_types.{md,png}, debias_<split>.png,
predictions/<unit>/[<stage>/]<split>.json
<sparsity> is s50 for a uniform 0.5 and l70-v70-x70-p70 for per-modality values (percent removed).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import distributed as dist
from .config import DATA_KEYS, MODALITIES, TRAIN_KEYS, Config, level_name, model_keys, unit_settings
from .data import BatchSampler
from .finetune import Context, dense, dense_settings, tables_lock, train_run
from .io import read_object, save_tensors, write_json
from .masks import apply_mask, fractions, full_mask, load_mask_for, measure_weights, save_mask
from .masktrain import LearnedMasks
from .modeling import VQAModel, prunable_tensors
from .plots import ANSWER_TYPES, mean_std, mean_std_cell, seeds_text
from .pruning import prune
from .training import RunSpec, load_weights, metrics_log, run_summary
from .units import Unit, run_units

log = logging.getLogger("lxmert")

Target = float | dict[str, float]
TAG_LETTERS = {"language": "l", "vision": "v", "cross": "x", "pooler": "p"}
ROW_KEYS = ("setting", "seed", "stage", "stage1_loss", "stage2_loss", "sparsity_tag", "target_sparsity",
            "measured_sparsity", "valid", "valid_best", "final", "best", "best_epoch", "blind", "splits")


def _pct(x: float) -> str:
    return f"{round(100 * x, 2):g}"


def sparsity_settings(cfg: Config) -> list[tuple[str, Target]]:
    """(folder tag, target) of every stage-2 sparsity: uniform values, then per-modality mappings."""
    dc = cfg.debias
    out: list[tuple[str, Target]] = [(f"s{_pct(s)}", s) for s in dc.sparsities]
    for values in dc.modality_sparsities:
        target = {m: values[m] for m in MODALITIES}
        out.append(("-".join(f"{TAG_LETTERS[m]}{_pct(v)}" for m, v in target.items()), target))
    return out


class SeedStudy:
    """The units of one seed."""

    def __init__(self, ctx: Context, seed: int):
        self.ctx, self.cfg, self.seed = ctx, ctx.cfg, seed
        self.results: list[Path] = []  # the result.json of every row, in study order

    def name(self, *parts: str) -> str:
        return "/".join([f"seed_{self.seed}", *parts])

    def stage1_losses(self) -> list[str]:
        dc = self.cfg.debias
        return list(dict.fromkeys(dc.stage1_losses + (["bce"] if dc.lottery_baseline else [])))

    def units(self) -> list[Unit]:
        dc = self.cfg.debias
        units = [self._unit(self.name(f"stage1_{loss}"), lambda loss=loss: self.full(loss), [("", "full")],
                            self._stage1_settings(loss)) for loss in self.stage1_losses()]
        for s1 in dc.stage1_losses:
            needs = (self.name(f"stage1_{s1}"),)
            for s2 in dc.stage2_losses:
                for tag, target in sparsity_settings(self.cfg):
                    stages = [("stage2", "stage2")] + ([("stage3", "stage3")] if dc.stage3 else [])
                    units.append(self._unit(self.name(f"{s1}-{s2}", tag),
                                            lambda s1=s1, s2=s2, tag=tag, t=target: self.compress(s1, s2, tag, t),
                                            stages, self._stage2_settings(s1, s2), needs))
                if dc.controls:
                    units.append(self._unit(self.name(f"control_{s1}-{s2}"),
                                            lambda s1=s1, s2=s2: self.control(s1, s2), [("", "control")],
                                            self._control_settings(s1, s2), needs))
        if dc.lottery_baseline:
            for s in dc.sparsities:
                units.append(self._unit(self.name("lottery", f"s{_pct(s)}"), lambda s=s: self.lottery(s),
                                        [("", "lottery")], self._lottery_settings(),
                                        (self.name("stage1_bce"),)))
        return units

    def _unit(self, name: str, work: Callable[[], None], stages: list[tuple[str, str]], settings: dict,
              needs: tuple[str, ...] = ()) -> Unit:
        folder = self.ctx.unit_dir(name)
        self.results += [folder / sub / "result.json" for sub, _ in stages]

        def finished() -> bool:
            return all(_complete(folder / sub / "result.json", self.ctx) for sub, _ in stages)

        return Unit(name=name, folder=folder, work=work, finished=finished, settings=settings, needs=needs,
                    cleanup=(self.ctx.predictions_dir(name),))

    # -- settings that decide what each unit computes ----------------------------------------------
    def _stage1_settings(self, loss: str) -> dict:
        extra = ["debias.lmh_entropy"] if loss == "lmh" else ["debias.lpf_gamma"] if loss == "lpf" else []
        return {**dense_settings(self.cfg, loss), **unit_settings(self.cfg, extra)}

    def _stage2_settings(self, s1: str, s2: str) -> dict:
        keys = ["debias.prunable", "debias.stage2_epochs", "debias.stage2_lr", "debias.stage2_batch_size",
                "debias.stage2_warmup", "debias.reset_every", "debias.stage3", "debias.stage3_epochs",
                "debias.stage3_lr", "debias.stage3_batch_size", "debias.stage3_warmup", "debias.lmh_entropy",
                "debias.lpf_gamma"]
        return {**self._stage1_settings(s1), **unit_settings(self.cfg, keys), "stage2_loss": s2}

    def _control_settings(self, s1: str, s2: str) -> dict:
        keys = ["debias.stage2_epochs", "debias.stage3", "debias.stage3_epochs", "debias.lmh_entropy",
                "debias.lpf_gamma"]
        return {**self._stage1_settings(s1), **unit_settings(self.cfg, keys), "stage2_loss": s2}

    def _lottery_settings(self) -> dict:
        keys = DATA_KEYS + model_keys() + TRAIN_KEYS + ["lottery.rewind_steps", "lottery.scope", "debias.prunable"]
        return unit_settings(self.cfg, keys, train__loss="bce")

    # -- the units ---------------------------------------------------------------------------------
    def stage1_weights(self, loss: str) -> Path:
        return self.ctx.unit_dir(self.name(f"stage1_{loss}")) / "run" / "final" / "model.safetensors"

    def full(self, loss: str) -> None:
        name = self.name(f"stage1_{loss}")
        folder, started = self.ctx.unit_dir(name), time.time()
        capture = self.cfg.lottery.rewind_steps if loss == "bce" and self.cfg.debias.lottery_baseline else 0
        model, summary = dense(self.ctx, self.seed, loss, folder / "run", capture_step=capture)
        run = folder / "run"
        row = self._row(model, loss, loss, None, "full", 0.0, "full", run / "final" / "model.safetensors",
                        run / "best" / "model.safetensors", summary, name, started, epochs=summary_epochs(summary))
        self._finish(folder / "result.json", row)

    def compress(self, s1: str, s2: str, tag: str, target: Target) -> None:
        name = self.name(f"{s1}-{s2}", tag)
        folder = self.ctx.unit_dir(name)
        stage1_epochs = self.cfg.train.epochs
        if not _complete(folder / "stage2" / "result.json", self.ctx):
            self.stage2(s1, s2, tag, target, name, folder / "stage2", stage1_epochs)
        if self.cfg.debias.stage3 and not _complete(folder / "stage3" / "result.json", self.ctx):
            self.stage3(s1, s2, tag, target, name, folder / "stage3",
                        stage1_epochs + self.cfg.debias.stage2_epochs)

    def stage2(self, s1: str, s2: str, tag: str, target: Target, name: str, folder: Path, before: int) -> None:
        dc, started = self.cfg.debias, time.time()
        if not (folder / "pruned.safetensors").exists():
            self._train_masks(s1, s2, tag, target, folder)
        model = self.ctx.new_model(self.seed)
        summary = run_summary(folder / "run")
        row = self._row(model, f"{s1}-{s2}", s1, s2, "stage2", target, tag, folder / "pruned.safetensors",
                        folder / "best_pruned.safetensors", summary, f"{name}/stage2", started,
                        epochs=before + dc.stage2_epochs)
        self._finish(folder / "result.json", row)

    def _train_masks(self, s1: str, s2: str, tag: str, target: Target, folder: Path) -> None:
        """Stage 2 proper: learn the masks, then bake the final and the best-on-valid masks into weights."""
        dc = self.cfg.debias
        model = self.ctx.new_model(self.seed)
        load_weights(model, self.stage1_weights(s1))
        masks = LearnedMasks(model, target, dc.prunable)
        loss = self.ctx.loss(s2, model, self.seed)
        trainable = masks.scores() + list(model.head.parameters()) + list(loss.parameters())
        _train_only(model, trainable)
        every, per_epoch = dc.reset_every, self._steps_per_epoch(dc.stage2_batch_size)

        def after_step(step: int) -> None:
            # Also at each epoch's end, so the model evaluated (and kept as best) meets its exact counts.
            if step % every == 0 or step % per_epoch == 0:
                masks.reset_thresholds()

        spec = RunSpec(folder=folder / "run", seed=self.seed, loss=loss, epochs=dc.stage2_epochs, lr=dc.stage2_lr,
                       params=trainable, after_step=after_step, before_save=masks.reset_thresholds,
                       batch_size=dc.stage2_batch_size or None, warmup=dc.stage2_warmup,
                       tag=f"seed {self.seed} {s1}-{s2} {tag} stage 2")
        train_run(self.ctx, model, spec)
        modalities = {t.name: t.modality for t in prunable_tensors(model, dc.prunable)}
        for weights, out in (("best", "best_pruned.safetensors"), ("final", "pruned.safetensors")):
            load_weights(model, folder / "run" / weights / "model.safetensors")
            masks.reset_thresholds()
            baked = _baked(model, masks)
            if dist.is_main():
                if out == "pruned.safetensors":
                    save_mask(folder / "mask.safetensors", masks.current_masks(), modalities)
                save_tensors(folder / out, baked)
        dist.barrier()  # the other ranks read these files next (stage 3)

    def stage3(self, s1: str, s2: str, tag: str, target: Target, name: str, folder: Path, before: int) -> None:
        dc, started = self.cfg.debias, time.time()
        model = self.ctx.new_model(self.seed)
        pruned = folder.parent / "stage2"
        load_weights(model, pruned / "pruned.safetensors")
        mask = load_mask_for(pruned / "mask.safetensors", model,
                             [t.name for t in prunable_tensors(model, dc.prunable)])
        spec = RunSpec(folder=folder / "run", seed=self.seed, loss=self.ctx.loss(s2, model, self.seed),
                       epochs=dc.stage3_epochs, lr=dc.stage3_lr or self.cfg.train.lr, masks=mask,
                       batch_size=dc.stage3_batch_size or None, warmup=dc.stage3_warmup,
                       tag=f"seed {self.seed} {s1}-{s2} {tag} stage 3")
        summary = train_run(self.ctx, model, spec)
        run = folder / "run"
        row = self._row(model, f"{s1}-{s2}", s1, s2, "stage3", target, tag, run / "final" / "model.safetensors",
                        run / "best" / "model.safetensors", summary, f"{name}/stage3", started,
                        epochs=before + dc.stage3_epochs)
        self._finish(folder / "result.json", row)

    def control(self, s1: str, s2: str) -> None:
        """The stage-1 model trained on, dense, for the epochs stages 2 and 3 add (same compute)."""
        dc, started = self.cfg.debias, time.time()
        name = self.name(f"control_{s1}-{s2}")
        folder = self.ctx.unit_dir(name)
        extra = dc.stage2_epochs + (dc.stage3_epochs if dc.stage3 else 0)
        model = self.ctx.new_model(self.seed)
        load_weights(model, self.stage1_weights(s1))
        spec = RunSpec(folder=folder / "run", seed=self.seed, loss=self.ctx.loss(s2, model, self.seed),
                       epochs=extra, lr=self.cfg.train.lr, tag=f"seed {self.seed} control {s1}-{s2}")
        summary = train_run(self.ctx, model, spec)
        run = folder / "run"
        row = self._row(model, f"{s1}-{s2}", s1, s2, "control", 0.0, "full", run / "final" / "model.safetensors",
                        run / "best" / "model.safetensors", summary, name, started,
                        epochs=self.cfg.train.epochs + extra)
        # The stage-2 rows (without stage 3) add only stage2_epochs: the control's validation accuracy after
        # as many epochs is their same-compute point (its learning rate had not decayed yet by then).
        row["valid_after_stage2_epochs"] = summary["history"][dc.stage2_epochs - 1]["valid"]["overall"]
        self._finish(folder / "result.json", row)

    def lottery(self, sparsity: float) -> None:
        """Low-magnitude one-shot mask of the BCE stage-1 weights (lottery.scope: each tensor, one global
        threshold or survivor rounds), rewound to the seed's initial weights (or the captured early step) and
        retrained with the mask, BCE, stage-1 schedule."""
        tag = f"s{_pct(sparsity)}"
        name = self.name("lottery", tag)
        folder, started = self.ctx.unit_dir(name), time.time()
        level = folder / level_name(sparsity)
        model = self.ctx.new_model(self.seed)
        prunable = prunable_tensors(model, self.cfg.debias.prunable)  # the set mask training prunes
        stage1 = self.stage1_weights("bce")
        load_weights(model, stage1)
        if (level / "mask.safetensors").exists():
            mask = load_mask_for(level / "mask.safetensors", model, [t.name for t in prunable])
        else:
            mask = dist.broadcast(prune("low_magnitude", model, prunable, full_mask(model, prunable), sparsity,
                                        self.cfg.lottery.scope) if dist.is_main() else None)
            if dist.is_main():
                save_mask(level / "mask.safetensors", mask, {t.name: t.modality for t in prunable})
        rewind = (self.ctx.init_weights(self.seed) if self.cfg.lottery.rewind_steps == 0
                  else stage1.parent.parent / "rewind.safetensors")
        load_weights(model, rewind)
        apply_mask(model, mask)
        spec = RunSpec(folder=level / "run", seed=self.seed, loss=self.ctx.loss("bce", model, self.seed),
                       epochs=self.cfg.train.epochs, lr=self.cfg.train.lr, masks=mask,
                       tag=f"seed {self.seed} lottery {tag}")
        summary = train_run(self.ctx, model, spec)
        run = level / "run"
        row = self._row(model, "lottery", "bce", None, "lottery", sparsity, tag, run / "final" / "model.safetensors",
                        run / "best" / "model.safetensors", summary, name, started,
                        epochs=2 * self.cfg.train.epochs)
        row["lottery"] = {"schedule": "oneshot", "scope": self.cfg.lottery.scope,
                          "rewind_steps": self.cfg.lottery.rewind_steps, "prune_from": "final"}
        self._finish(folder / "result.json", row)

    # -- helpers ---------------------------------------------------------------------------------
    def _steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps per epoch, counted the way the trainer counts them."""
        sampler = BatchSampler(len(self.ctx.data.train), batch_size or self.cfg.train.batch_size, self.seed, True,
                               dist.rank(), dist.world())
        return max(len(sampler.global_batches()) // self.cfg.train.grad_accum, 1)

    def _row(self, model: VQAModel, setting: str, s1: str, s2: Optional[str], stage: str, target: Target, tag: str,
             final: Path, best: Path, summary: dict, unit: str, started: float, epochs: int) -> dict:
        """A result row from the saved final and best-on-valid weights (plain weights, masks baked in):
        accuracy of both on every labelled split, predictions of the best, sparsity of the final."""
        load_weights(model, final)
        final_acc = self.ctx.evaluate(model)
        measured = measure_weights(model, prunable_tensors(model, self.cfg.debias.prunable))
        load_weights(model, best)
        best_acc = self.ctx.evaluate_and_predict(model, unit)
        valid = self.cfg.data.valid
        losses = sorted({s1, s2 or s1})
        return {
            "setting": setting, "seed": self.seed, "stage": stage, "stage1_loss": s1, "stage2_loss": s2,
            "sparsity_tag": tag, "target_sparsity": target, "epochs": epochs,
            "measured_sparsity": fractions(measured)["overall"], "measured_by_modality": fractions(measured),
            "prunable_by_modality": measured["prunable_by_modality"],
            "valid_split": valid, "valid": final_acc[valid]["overall"], "valid_best": best_acc[valid]["overall"],
            "final": {k: v for k, v in final_acc.items() if k != valid},
            "best": {k: v for k, v in best_acc.items() if k != valid},
            "best_epoch": summary["best_epoch"], "splits": self.ctx.splits,
            "blind": {loss: self.ctx.blind(self.seed, loss) for loss in losses},
            "seconds": round(time.time() - started, 1),
        }

    def _finish(self, path: Path, row: dict) -> None:
        if dist.is_main():
            write_json(path, row)
        dist.barrier()
        shifted = ", ".join(f"{k} {v['overall']:.2f}" for k, v in row["final"].items())
        log.info("seed %d %s %s %s: valid %.2f, %s, measured sparsity %.4f", self.seed, row["setting"], row["stage"],
                 row["sparsity_tag"], row["valid"], shifted, row["measured_sparsity"])
        metrics_log({"event": "debias", **row})


def summary_epochs(summary: dict) -> int:
    return len(summary["history"])


def _complete(path: Path, ctx: Context) -> bool:
    return path.exists() and set(ctx.splits) <= set(read_object(path, ROW_KEYS, "study-B result")["splits"])


def _baked(model: VQAModel, masks: LearnedMasks) -> dict:
    """The model's plain state dict with the current masks multiplied into the weights (the masks stay
    attached): the form every row's weights are saved and evaluated in."""
    state = {}
    current = masks.current_masks()
    for key, value in model.state_dict().items():
        if ".parametrizations.weight." not in key:
            state[key] = value
        elif key.endswith(".parametrizations.weight.original"):
            module = key[: -len(".parametrizations.weight.original")]
            keep = current[f"{module}.weight"]
            state[f"{module}.weight"] = value * keep.to(value.dtype)
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
    studies = [SeedStudy(ctx, seed) for seed in cfg.seeds]
    units = [u for study in studies for u in study.units()]
    if not run_units(units, cfg.experiment):
        return None
    rows = [read_object(path, ROW_KEYS, "study-B result") for study in studies for path in study.results]
    result = {"experiment": cfg.experiment, "valid_split": cfg.data.valid, "test_splits": list(ctx.data.tests),
              "seeds": list(cfg.seeds), "rows": rows}
    with tables_lock(cfg):
        if dist.is_main():
            write_debias(cfg, result)
    return result


# -- outputs: computed from the rows only --------------------------------------------------------

STAGE_ORDER = {"full": 0, "control": 1, "stage2": 2, "stage3": 3, "lottery": 4}


def _ordered_groups(result: dict) -> list[tuple[tuple, list[dict]]]:
    """The groups in table order: full models first, then by setting and stage."""
    return sorted(_groups(result["rows"]).items(), key=lambda kv: (STAGE_ORDER[kv[0][1]] if kv[0][1] == "full"
                                                                  else 1, kv[0][0], STAGE_ORDER[kv[0][1]]))


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows of the same (setting, stage, sparsity) over seeds, full models first."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["stage"] != "full"):
        out[(r["setting"], r["stage"], r["sparsity_tag"])].append(r)
    return out


OOD_PREFIX, OOD_MEAN = "ood_", "ood_mean"  # VQA-VS: its score is the mean over the nine OOD test sets


def _report_splits(result: dict) -> list[str]:
    """The labelled test splits of the outputs, plus the OOD mean when the tests include OOD sets (VQA-VS)."""
    tests = [t for t in result["test_splits"] if any(t in r["final"] for r in result["rows"])]
    return tests + [OOD_MEAN] if sum(t.startswith(OOD_PREFIX) for t in tests) > 1 else tests


def _overall(accuracies: dict, split: str) -> float:
    """Overall accuracy of one split of a row's accuracies; the OOD mean is computed from its parts."""
    return _accuracy(accuracies, split, "overall")


def _accuracy(accuracies: dict, split: str, kind: str) -> Optional[float]:
    """Accuracy `kind` (overall or an answer type) of one split; None where the split has no such question.
    The OOD mean is the mean of its parts."""
    if split == OOD_MEAN:
        parts = [v.get(kind) for k, v in accuracies.items() if k.startswith(OOD_PREFIX)]
        return None if None in parts else float(np.mean(parts))
    return accuracies[split].get(kind)


def _target_text(target: Target) -> str:
    if isinstance(target, dict):
        return "/".join(_pct(v) for v in target.values())
    return _pct(target)


def blind_rows(result: dict) -> dict[str, list[dict]]:
    """Question-only accuracies per training loss, one entry per seed."""
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in result["rows"]:
        for loss, accs in r["blind"].items():
            out[loss][r["seed"]] = accs
    return {loss: list(by_seed.values()) for loss, by_seed in sorted(out.items())}


def debias_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Mean ± std over seeds of valid and test accuracy (final and best-on-valid) per setting, with the
    question-only model of each loss; one seed shows its single value."""
    tests, valid = _report_splits(result), result["valid_split"]
    header = ["setting", "stage", "epochs", "target sparsity %", "measured %", valid]
    header += [f"{t} {kind}" for t in tests for kind in ("final", "best")]
    body = []
    for (setting, stage, _), group in _ordered_groups(result):
        line = [setting, stage, str(group[0]["epochs"]), _target_text(group[0]["target_sparsity"]),
                f"{100 * np.mean([r['measured_sparsity'] for r in group]):.2f}", mean_std([r["valid"] for r in group])]
        line += [mean_std([_overall(r[kind], t) for r in group]) for t in tests for kind in ("final", "best")]
        body.append(line)
    for loss, accs in blind_rows(result).items():
        body.append([f"question-only {loss}", "-", "-", "-", "-", mean_std([_overall(a, valid) for a in accs])]
                    + [mean_std([_overall(a, t) for a in accs]) if kind == "final" else "-"
                       for t in tests for kind in ("final", "best")])
    return header, body


def answer_type_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Final accuracy per answer type, mean ± std over seeds, of every setting and of the question-only model
    of each loss: where a method's gain or loss under the shift comes from."""
    tests = _report_splits(result)
    header = ["setting", "stage", "target sparsity %"] + [f"{t} {a}" for t in tests for a in ANSWER_TYPES]

    def cells(accs: list[dict]) -> list[str]:
        return [mean_std_cell([_accuracy(a, t, kind) for a in accs]) for t in tests for kind in ANSWER_TYPES]

    body = [[setting, stage, _target_text(group[0]["target_sparsity"])] + cells([r["final"] for r in group])
            for (setting, stage, _), group in _ordered_groups(result)]
    body += [[f"question-only {loss}", "-", "-"] + cells(accs) for loss, accs in blind_rows(result).items()]
    return header, body


def _point(group: list[dict], split: str) -> tuple[float, float, float]:
    """(measured sparsity %, mean accuracy, std of accuracy) of the final models of a group."""
    acc = [_overall(r["final"], split) for r in group]
    return 100 * float(np.mean([r["measured_sparsity"] for r in group])), float(np.mean(acc)), float(np.std(acc))


PLOT_STAGES = {"stage2": ("-", "o", ""), "stage3": ("--", "s", " + stage 3"), "lottery": (":", "^", "")}


def plot_debias(result: dict, split: str, path: Path) -> None:
    """Accuracy on one test split against measured sparsity: a line per setting and stage over the uniform
    sparsities, a hollow marker per per-modality setting, full models, same-compute controls and the
    question-only model of each loss as horizontal lines."""
    from .plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = _groups(result["rows"])
    settings = list(dict.fromkeys(s for s, stage, _ in groups if stage in PLOT_STAGES))
    for i, setting in enumerate(settings):
        color = "black" if setting == "lottery" else colors[i % len(colors)]
        for stage, (ls, marker, suffix) in PLOT_STAGES.items():
            mine = {tag: g for (s, st, tag), g in groups.items() if s == setting and st == stage}
            uniform = sorted(_point(g, split) for g in mine.values() if not isinstance(g[0]["target_sparsity"], dict))
            if uniform:
                x, y, err = zip(*uniform)
                ax.errorbar(x, y, yerr=err, ls=ls, marker=marker, color=color, capsize=3, label=f"{setting}{suffix}")
            for tag, g in mine.items():
                if isinstance(g[0]["target_sparsity"], dict):
                    x, y, _ = _point(g, split)
                    ax.plot([x], [y], marker=marker, ls="none", color=color, mfc="none",
                            label=f"{setting}{suffix} {tag}")
    lines = [(f"full {s}", g, "-.") for (s, st, _), g in groups.items() if st == "full"]
    lines += [(f"control {s}", g, (0, (1, 3))) for (s, st, _), g in groups.items() if st == "control"]
    for j, (label, g, ls) in enumerate(lines):
        ax.axhline(_point(g, split)[1], ls=ls, lw=1, color=colors[(len(settings) + j) % len(colors)], label=label)
    for loss, accs in blind_rows(result).items():
        ax.axhline(float(np.mean([_overall(a, split) for a in accs])), ls="--", lw=1, color="grey",
                   label=f"question-only {loss}")
    ax.set(xlim=(0, 100), xlabel="measured sparsity (%)", ylabel=f"{split} accuracy (%)",
           title=f"{result['experiment']}: {split} accuracy of the final models")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def write_debias(cfg: Config, result: dict) -> None:
    from .plots import write_table

    out = cfg.result_dir
    write_json(out / "debias.json", result)
    header, body = debias_table(result)
    write_table(header, body, out / "debias_table.md", out / "debias_table.png",
                f"{cfg.experiment}: accuracy (%), {seeds_text(result['seeds'])}; models selected on "
                f"{result['valid_split']}; epochs = all training epochs behind the row")
    header, body = answer_type_table(result)
    write_table(header, body, out / "debias_answer_types.md", out / "debias_answer_types.png",
                f"{cfg.experiment}: final accuracy (%) by answer type, {seeds_text(result['seeds'])}")
    for split in _report_splits(result):
        plot_debias(result, split, out / f"debias_{split}.png")


def redraw(cfg: Config) -> None:
    """Table and plots again from result/<exp>/debias.json (no training)."""
    path = cfg.result_dir / "debias.json"
    if path.exists():
        result = read_object(path, ("experiment", "valid_split", "test_splits", "seeds", "rows"), "study-B result")
        for i, row in enumerate(result["rows"]):
            missing = [k for k in ROW_KEYS + ("epochs",) if k not in row]
            if missing:
                from .io import InputError

                raise InputError(f"{path}: row {i} has no field '{missing[0]}'; rerun the study to rebuild it")
        write_debias(cfg, result)
