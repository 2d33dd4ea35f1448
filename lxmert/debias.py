"""Study B: compress and debias (Si et al. 2023) in three stages, plus a lottery-ticket baseline.

For every seed:
  stage 1  fine-tune the full model with each stage-1 loss (bce, lmh, lpf)               -> "full"
  stage 2  from each stage-1 model, learn a mask per prunable weight (weights frozen; scores, answer
           head and the loss's own parameters trained) with each stage-2 loss, at every uniform
           and every per-modality sparsity; the setting is named <stage-1 loss>-<stage-2 loss> -> "stage2"
  stage 3  optionally fine-tune each pruned model with its mask enforced, stage-2 loss    -> "stage3"
  lottery  low-magnitude one-shot mask from the BCE stage-1 weights at the uniform sparsities,
           rewound to the seed's initial weights and retrained with the mask (lottery.LotteryRun)
Models are selected on the validation split only (the trainer keeps best/); every row reports the final
and the best-on-valid model on every test split, overall and per answer type, with the question-only
accuracy of the seed beside it and the sparsity measured from the weights themselves.

models/<exp>/seed_<s>/
    init.safetensors                        initial weights of the seed (shared by every stage 1)
    stage1_<loss>/                          training run (best/, final/, done.json) + result.json
    <s1>-<s2>/<sparsity>/stage2/            run/, mask.safetensors, pruned.safetensors, result.json
    <s1>-<s2>/<sparsity>/stage3/            run/, result.json
    lottery/<sparsity>/                     level_<pct>/ (LotteryRun's mask, run/, result.json) + result.json
result/<exp>/debias.json, debias_table.{md,png}, debias_<test split>.png
A folder with a result.json is finished and never recomputed; an interrupted run resumes (training.py).
<sparsity> is s50 for a uniform 0.5 and l30-v30-x30-p70 for [language, vision, cross, pooler] values.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed as dist
from .config import Config
from .data import BatchSampler
from .finetune import Context, dense, train_run
from .io import read_json, save_tensors, write_json
from .lottery import LotteryRun
from .masks import fractions, full_mask, load_mask_for, measure_weights, save_mask
from .masktrain import MASKED_MODALITIES, LearnedMasks
from .modeling import VQAModel, prunable_tensors
from .training import RunSpec, load_weights, metrics_log

log = logging.getLogger("lxmert")

Target = float | dict[str, float]
TAG_LETTERS = {"language": "l", "vision": "v", "cross": "x", "pooler": "p"}


def _pct(x: float) -> str:
    return f"{round(100 * x, 2):g}"


def sparsity_settings(cfg: Config) -> list[tuple[str, Target]]:
    """(folder tag, target) of every stage-2 sparsity: uniform values, then per-modality lists."""
    dc = cfg.debias
    out: list[tuple[str, Target]] = [(f"s{_pct(s)}", s) for s in dc.sparsities]
    for values in dc.modality_sparsities:
        target = dict(zip(MASKED_MODALITIES, values))
        out.append(("-".join(f"{TAG_LETTERS[m]}{_pct(v)}" for m, v in target.items()), target))
    return out


class SeedStudy:
    """Every stage of one seed; one model object is reused (loaded with the weights each stage needs)."""

    def __init__(self, ctx: Context, seed: int):
        self.ctx, self.cfg, self.seed = ctx, ctx.cfg, seed
        self.dir = ctx.seed_dir(seed)
        self._model: Optional[VQAModel] = None

    @property
    def model(self) -> VQAModel:
        """Built on first use, so a rerun with every result present builds nothing."""
        if self._model is None:
            self._model = self.ctx.new_model(self.seed)
        return self._model

    def rows(self) -> list[dict]:
        dc = self.cfg.debias
        losses = list(dict.fromkeys(dc.stage1_losses + (["bce"] if dc.lottery_baseline else [])))
        rows = [self.full(loss) for loss in losses]
        for s1 in dc.stage1_losses:
            for s2 in dc.stage2_losses:
                for tag, target in sparsity_settings(self.cfg):
                    rows.append(self.stage2(s1, s2, tag, target))
                    if dc.stage3:
                        rows.append(self.stage3(s1, s2, tag, target))
        if dc.lottery_baseline:
            rows += [self.lottery(index, s) for index, s in enumerate(dc.sparsities)]
        return rows

    # -- the stages ------------------------------------------------------------------------------
    def stage1_folder(self, loss: str) -> Path:
        return self.dir / f"stage1_{loss}"

    def full(self, loss: str) -> dict:
        folder = self.stage1_folder(loss)
        if (folder / "result.json").exists():
            return read_json(folder / "result.json")
        started = time.time()
        capture = self.cfg.lottery.rewind_steps if loss == "bce" and self.cfg.debias.lottery_baseline else 0
        model, summary = dense(self.ctx, self.seed, loss, folder, capture_step=capture)
        final, best, measured = self._final_and_best(model, folder / "best" / "model.safetensors", summary)
        row = self._row(loss, loss, None, "full", 0.0, final, best, measured, summary, started)
        return self._finish(folder, row)

    def stage2(self, s1: str, s2: str, tag: str, target: Target) -> dict:
        folder = self.dir / f"{s1}-{s2}" / tag / "stage2"
        if (folder / "result.json").exists():
            return read_json(folder / "result.json")
        started = time.time()
        model = self.model
        load_weights(model, self.stage1_folder(s1) / "final" / "model.safetensors")
        masks = LearnedMasks(model, target)
        loss = self.ctx.loss(s2, model).to(dist.device())
        trainable = masks.scores() + list(model.head.parameters()) + list(loss.parameters())
        _train_only(model, trainable)
        every, per_epoch = self.cfg.debias.reset_every, self._steps_per_epoch()

        def after_step(step: int) -> None:
            # Also at each epoch's end, so the model evaluated (and kept as best) meets its exact counts.
            if step % every == 0 or step % per_epoch == 0:
                masks.reset_thresholds()

        spec = RunSpec(folder=folder / "run", seed=self.seed, loss=loss, epochs=self.cfg.debias.stage2_epochs,
                       lr=self.cfg.debias.stage2_lr, params=trainable, after_step=after_step,
                       before_save=masks.reset_thresholds, tag=f"seed {self.seed} {s1}-{s2} {tag} stage 2")
        summary = train_run(self.ctx, model, spec)
        best: Optional[dict] = None
        if not _best_is_last(summary):
            load_weights(model, folder / "run" / "best" / "model.safetensors")
            masks.reset_thresholds()
            best = self.ctx.evaluate(model)
            load_weights(model, folder / "run" / "final" / "model.safetensors")
        masks.reset_thresholds()
        mask = masks.remove()
        model.requires_grad_(True)
        final = self.ctx.evaluate(model)
        best = final if best is None else best
        measured = measure_weights(model, prunable_tensors(model))
        if dist.is_main():
            save_mask(folder / "mask.safetensors", mask, {t.name: t.modality for t in prunable_tensors(model)})
            save_tensors(folder / "pruned.safetensors", model.state_dict())
        row = self._row(f"{s1}-{s2}", s1, s2, "stage2", target, final, best, measured, summary, started, tag)
        return self._finish(folder, row)

    def stage3(self, s1: str, s2: str, tag: str, target: Target) -> dict:
        folder = self.dir / f"{s1}-{s2}" / tag / "stage3"
        if (folder / "result.json").exists():
            return read_json(folder / "result.json")
        started = time.time()
        model, pruned = self.model, folder.parent / "stage2"
        load_weights(model, pruned / "pruned.safetensors")
        mask = load_mask_for(pruned / "mask.safetensors", model, [t.name for t in prunable_tensors(model)])
        spec = RunSpec(folder=folder / "run", seed=self.seed, loss=self.ctx.loss(s2, model).to(dist.device()),
                       epochs=self.cfg.debias.stage3_epochs, lr=self.cfg.train.lr, masks=mask,
                       tag=f"seed {self.seed} {s1}-{s2} {tag} stage 3")
        summary = train_run(self.ctx, model, spec)
        final, best, measured = self._final_and_best(model, folder / "run" / "best" / "model.safetensors", summary)
        row = self._row(f"{s1}-{s2}", s1, s2, "stage3", target, final, best, measured, summary, started, tag)
        return self._finish(folder, row)

    def lottery(self, index: int, sparsity: float) -> dict:
        """One level of lottery.LotteryRun: BCE stage-1 weights, low-magnitude one-shot, rewind, retrain."""
        tag = f"s{_pct(sparsity)}"
        folder = self.dir / "lottery" / tag
        if (folder / "result.json").exists():
            return read_json(folder / "result.json")
        started = time.time()
        # the level is pruned one-shot from the BCE model with BCE retraining: say so in the row
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, loss="bce"),
                                  lottery=dataclasses.replace(self.cfg.lottery, schedule="oneshot"))
        run = LotteryRun(Context(cfg, self.ctx.data), self.model, self.seed, "low_magnitude")
        bce = self.stage1_folder("bce")
        run.folder, run.dense_weights = folder, bce / "final" / "model.safetensors"
        if cfg.lottery.rewind_steps:
            run.rewind_weights = bce / "rewind.safetensors"
        level, _, final_weights = run.level(index, sparsity, full_mask(self.model, run.prunable), run.dense_weights)
        load_weights(self.model, final_weights)
        run_folder = final_weights.parent.parent
        summary = read_json(run_folder / "done.json")
        final, best, measured = self._final_and_best(self.model, run_folder / "best" / "model.safetensors", summary)
        row = self._row("lottery", "bce", None, "lottery", sparsity, final, best, measured, summary, started, tag)
        row["lottery"] = {k: level[k] for k in ("accuracy_pruned", "accuracy_rewound", "schedule", "scope")}
        return self._finish(folder, row)

    # -- helpers ---------------------------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, counted the way the trainer counts them."""
        sampler = BatchSampler(len(self.ctx.data.train), self.cfg.train.batch_size, self.seed, True,
                               dist.rank(), dist.world())
        return max(len(sampler.global_batches()) // self.cfg.train.grad_accum, 1)

    def _final_and_best(self, model: VQAModel, best: Path, summary: dict) -> tuple[dict, dict, dict]:
        """Accuracies of the model as it is (final) and of the best-on-valid weights; sparsity of the final
        weights. May leave the model at the best weights."""
        final = self.ctx.evaluate(model)
        measured = measure_weights(model, prunable_tensors(model))
        if _best_is_last(summary):
            return final, final, measured
        load_weights(model, best)
        return final, self.ctx.evaluate(model), measured

    def _row(self, setting: str, s1: str, s2: Optional[str], stage: str, target: Target, final: dict,
             best: dict, measured: dict, summary: dict, started: float, tag: str = "full") -> dict:
        valid = self.cfg.data.valid
        return {
            "setting": setting, "seed": self.seed, "stage": stage, "stage1_loss": s1, "stage2_loss": s2,
            "sparsity_tag": tag, "target_sparsity": target,
            "measured_sparsity": fractions(measured)["overall"], "measured_by_modality": fractions(measured),
            "valid_split": valid, "valid": final[valid]["overall"], "valid_best": best[valid]["overall"],
            "final": {k: v for k, v in final.items() if k != valid},
            "best": {k: v for k, v in best.items() if k != valid},
            "best_epoch": summary["best_epoch"], "blind": self.ctx.blind(self.seed),
            "seconds": round(time.time() - started, 1),
        }

    def _finish(self, folder: Path, row: dict) -> dict:
        if dist.is_main():
            write_json(folder / "result.json", row)
        dist.barrier()
        shifted = ", ".join(f"{k} {v['overall']:.2f}" for k, v in row["final"].items())
        log.info("seed %d %s %s %s: valid %.2f, %s (question-only %s), measured sparsity %.4f", self.seed,
                 row["setting"], row["stage"], row["sparsity_tag"], row["valid"], shifted,
                 ", ".join(f"{k} {v['overall']:.2f}" for k, v in row["blind"].items()), row["measured_sparsity"])
        metrics_log({"event": "debias", **row})
        return row


def _best_is_last(summary: dict) -> bool:
    """The best-on-valid checkpoint is the final one (saved after the last evaluation, nothing trained since)."""
    return summary["best_epoch"] == summary["history"][-1]["epoch"]


def _train_only(model: VQAModel, trainable: list[torch.nn.Parameter]) -> None:
    """Freeze every model parameter the optimizer does not own, so no gradient is computed for it
    (and DDP does not wait for gradients that never come)."""
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def run_debias(cfg: Config) -> dict:
    """The whole grid for every seed; writes debias.json, a table and one plot per test split."""
    ctx = Context.load(cfg)
    rows = []
    for seed in cfg.seeds:
        rows += SeedStudy(ctx, seed).rows()
    result = {"experiment": cfg.experiment, "valid_split": cfg.data.valid,
              "test_splits": sorted({k for r in rows for k in r["final"]}, key=list(ctx.data.tests).index),
              "seeds": list(cfg.seeds), "rows": rows}
    if dist.is_main():
        write_debias(cfg, result)
    return result


# -- outputs: computed from the rows only --------------------------------------------------------

def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows of the same (setting, stage, sparsity) over seeds, in study order."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["stage"] != "full"):
        out[(r["setting"], r["stage"], r["sparsity_tag"])].append(r)
    return out


OOD_PREFIX, OOD_MEAN = "ood_", "ood_mean"  # VQA-VS: its score is the mean over the nine OOD test sets


def _report_splits(result: dict) -> list[str]:
    """The test splits of the outputs, plus the OOD mean when the tests include OOD sets (VQA-VS)."""
    tests = list(result["test_splits"])
    return tests + [OOD_MEAN] if sum(t.startswith(OOD_PREFIX) for t in tests) > 1 else tests


def _overall(accuracies: dict, split: str) -> float:
    """Overall accuracy of one split of a row's accuracies; the OOD mean is computed from its parts."""
    if split == OOD_MEAN:
        return float(np.mean([v["overall"] for k, v in accuracies.items() if k.startswith(OOD_PREFIX)]))
    return accuracies[split]["overall"]


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def _target_text(target: Target) -> str:
    if isinstance(target, dict):
        return "/".join(_pct(v) for v in target.values())
    return _pct(target)


def debias_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Mean ± std over seeds of valid and test accuracy (final and best-on-valid) per setting."""
    tests, valid = _report_splits(result), result["valid_split"]
    header = ["setting", "stage", "target sparsity %", "measured %", valid]
    header += [f"{t} {kind}" for t in tests for kind in ("final", "best")]
    body = []
    for (setting, stage, _), group in _groups(result["rows"]).items():
        line = [setting, stage, _target_text(group[0]["target_sparsity"]),
                f"{100 * np.mean([r['measured_sparsity'] for r in group]):.2f}",
                _mean_std([r["valid"] for r in group])]
        line += [_mean_std([_overall(r[kind], t) for r in group]) for t in tests for kind in ("final", "best")]
        body.append(line)
    blind = {s: [_overall(r["blind"], s) for r in result["rows"] if r["stage"] == "full"] for s in [valid] + tests}
    body.append(["question-only", "-", "-", "-", _mean_std(blind[valid])]
                + [_mean_std(blind[t]) if kind == "final" else "-" for t in tests for kind in ("final", "best")])
    return header, body


def _point(group: list[dict], split: str) -> tuple[float, float, float]:
    """(measured sparsity %, mean accuracy, std of accuracy) of the final models of a group."""
    acc = [_overall(r["final"], split) for r in group]
    return 100 * float(np.mean([r["measured_sparsity"] for r in group])), float(np.mean(acc)), float(np.std(acc))


PLOT_STAGES = {"stage2": ("-", "o", ""), "stage3": ("--", "s", " + stage 3"), "lottery": (":", "^", "")}


def plot_debias(result: dict, split: str, path: Path) -> None:
    """Accuracy on one test split against measured sparsity: a line per setting and stage over the uniform
    sparsities, a hollow marker per per-modality setting, full models and question-only as horizontal lines."""
    from .plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = _groups(result["rows"])
    settings = list(dict.fromkeys(setting for setting, stage, _ in groups if stage != "full"))
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
    full = [(setting, g) for (setting, stage, _), g in groups.items() if stage == "full"]
    for j, (setting, g) in enumerate(full):
        ax.axhline(_point(g, split)[1], ls="-.", lw=1, color=colors[(len(settings) + j) % len(colors)],
                   label=f"full {setting}")
    blind = [_overall(r["blind"], split) for r in result["rows"] if r["stage"] == "full"]
    if blind:
        ax.axhline(float(np.mean(blind)), ls="--", color="grey", label="question-only")
    ax.set(xlim=(0, 100), xlabel="measured sparsity (%)", ylabel=f"{split} accuracy (%)",
           title=f"{result['experiment']}: {split} accuracy of the final models")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def write_debias(cfg: Config, result: dict) -> None:
    from .plots import write_table

    out = cfg.result_dir
    write_json(out / "debias.json", result)
    header, body = debias_table(result)
    write_table(header, body, out / "debias_table.md", out / "debias_table.png",
                f"{cfg.experiment}: accuracy (%), mean ± std over {len(result['seeds'])} seed(s); models selected "
                f"on {result['valid_split']}")
    for split in _report_splits(result):
        plot_debias(result, split, out / f"debias_{split}.png")


def redraw(cfg: Config) -> None:
    """Table and plots again from result/<exp>/debias.json (no training)."""
    path = cfg.result_dir / "debias.json"
    if path.exists():
        write_debias(cfg, read_json(path))
