"""Study A's outputs, computed from the rows only: lottery.json, lottery.csv, one plot per mode and one of all
modes, the table of retrained accuracy by mode and sparsity, and the same per answer type."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..core.config import PRUNING_MODES, Config
from ..core.errors import InputError
from ..core.files import read_object, write_json, write_text
from ..core.paths import Experiment, structure_tag
from .figures import (ANSWER_TYPES, machine, mean_std, mean_std_cell, plot_finetune, plt, save_figure, seeds_text,
                      write_table)
from .rows import LEVEL_KEYS

MODES_ORDER = list(PRUNING_MODES)  # the order of every table, plot and legend


def lottery_result(cfg: Config, finetune: dict, rows: list[dict]) -> dict:
    valid = cfg.data.valid
    dense = [s["final"]["overall"] for s in finetune["seeds"].values()]
    blind = [s["blind"][valid]["overall"] for s in finetune["seeds"].values()]
    for row in rows:
        seed = finetune["seeds"][str(row["seed"])]
        row["accuracy_dense"] = seed["final"]["overall"]
        row["accuracy_blind"] = seed["blind"][valid]["overall"]
    return {
        "experiment": cfg.experiment, "valid_split": valid, "test_splits": list(cfg.data.test),
        "schedule": cfg.lottery.schedule, "scope": cfg.lottery.scope, "rewind_steps": cfg.lottery.rewind_steps,
        "prune_from": cfg.lottery.prune_from, "seeds": list(cfg.seeds), "granularity": cfg.lottery.granularity,
        "importance": cfg.lottery.importance, "group": cfg.lottery.group,
        "dense": {"accuracy": {"mean": round(float(np.mean(dense)), 4), "std": round(float(np.std(dense)), 4)},
                  "blind": {"mean": round(float(np.mean(blind)), 4), "std": round(float(np.std(blind)), 4)},
                  "per_seed": {s: v["final"]["overall"] for s, v in finetune["seeds"].items()},
                  "tests": {s: v["tests"] for s, v in finetune["seeds"].items()},
                  "blind_by_seed": {s: v["blind"] for s, v in finetune["seeds"].items()}},
        "question_only": finetune.get("question_only", []),
        "rows": rows,
    }


CSV_FIELDS = ["mode", "seed", "target_sparsity", "measured_sparsity", "accuracy_pruned", "accuracy_rewound",
              "accuracy_retrained", "accuracy_retrained_best", "accuracy_dense", "accuracy_blind", "best_epoch",
              "seconds"]


def stem(result: dict) -> str:
    """The name every file of a study A result starts with: 'lottery', plus the structured granularity's tag."""
    return "lottery" + structure_tag(result.get("granularity", "weights"), result.get("importance", "magnitude"),
                                     result.get("group", 4))


def level_label(result: dict) -> str:
    """What a level counts: weights (a fraction of the prunable set), heads or neurons (a fraction of them)."""
    granularity = result.get("granularity", "weights")
    if granularity in ("heads", "neurons"):
        return f"{granularity} removed %"
    return f"sparsity % ({result.get('group', 4)}-groups)" if granularity == "n_m" else "sparsity %"


def granularity_text(result: dict) -> str:
    granularity = result.get("granularity", "weights")
    if granularity in ("heads", "neurons"):
        return f", {granularity} by {result.get('importance', 'magnitude')}"
    return f", N:M in groups of {result.get('group', 4)}" if granularity == "n_m" else ""


def write_lottery(cfg: Config, result: dict) -> None:
    out, name = Experiment(cfg).results, stem(result)
    write_json(out / f"{name}.json", result)
    modalities = sorted({m for r in result["rows"] for m in r["measured_by_modality"] if m != "overall"})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_FIELDS + [f"measured_{m}" for m in modalities])
    for r in result["rows"]:
        writer.writerow([r[k] for k in CSV_FIELDS] + [r["measured_by_modality"].get(m, "") for m in modalities])
    write_text(out / f"{name}.csv", buf.getvalue())
    plot_lottery(result, out)
    header, body = lottery_table(result)
    valid = result["valid_split"]
    chosen = f"; {valid} also chose the fine-tuned weights pruned from: optimistic" \
        if result.get("prune_from") == "best" else ""
    write_table(header, body, out / f"{name}_table.md", out / f"{name}_table.png",
                f"{cfg.experiment}: retrained {valid} accuracy (%), last epoch, {seeds_text(result['seeds'])}, "
                f"{result['schedule']} {result['scope']} pruning{granularity_text(result)}{chosen}{machine(result)}")
    for split in result.get("test_splits", []):
        if any(split in r["tests"] for r in result["rows"]):
            header, body = lottery_split_table(result, split)
            write_table(header, body, out / f"{name}_{split}_table.md", out / f"{name}_{split}_table.png",
                        f"{cfg.experiment}: {split} accuracy (%) of the best-on-{valid} weights, "
                        f"{seeds_text(result['seeds'])}{granularity_text(result)}{machine(result)}")
    ft = out / "finetune.json"
    finetune = read_object(ft, ("seeds",), "finetune result") if ft.exists() else None
    header, body = lottery_type_table(result, finetune)
    write_table(header, body, out / f"{name}_answer_types.md", out / f"{name}_answer_types.png",
                f"{cfg.experiment}: retrained {result['valid_split']} accuracy (%) by answer type, "
                f"{seeds_text(result['seeds'])}{granularity_text(result)}{machine(result)}")


def redraw(cfg: Config) -> None:
    """Plots and tables again from the saved JSON (no training)."""
    out = Experiment(cfg).results
    ft = out / "finetune.json"
    if ft.exists():
        plot_finetune(read_object(ft, ("experiment", "valid_split", "seeds", "mean"), "finetune result"),
                      out / "finetune.png")
    for lt in sorted(out.glob("lottery*.json")):
        result = read_object(lt, ("experiment", "valid_split", "seeds", "dense", "rows"), "lottery result")
        for i, row in enumerate(result["rows"]):
            missing = [k for k in LEVEL_KEYS + ("accuracy_dense", "accuracy_blind") if k not in row]
            if missing:
                raise InputError(f"{lt}: row {i} has no field '{missing[0]}'; rerun the study to rebuild it")
        write_lottery(cfg, result)


LOTTERY_CURVES = [("accuracy_retrained", "retrained", "-"), ("accuracy_rewound", "rewound (before retraining)", ":"),
                  ("accuracy_pruned", "pruned (before rewinding)", "-.")]


def _by_level(rows: list[dict], key: str) -> tuple[list[float], list[float], list[float]]:
    groups = defaultdict(list)
    for r in rows:
        groups[r["target_sparsity"]].append(r[key])
    levels = sorted(groups)
    return ([100 * x for x in levels], [float(np.mean(groups[x])) for x in levels],
            [float(np.std(groups[x])) for x in levels])


def plot_lottery(result: dict, folder: Path) -> list[Path]:
    """One plot per mode (retrained, rewound, pruned, dense baseline dashed) and one with all modes."""
    rows, dense = result["rows"], result["dense"]
    paths = []
    modes = sorted({r["mode"] for r in rows}, key=MODES_ORDER.index)
    for mode in modes:
        fig, ax = plt.subplots(figsize=(6, 4))
        mine = [r for r in rows if r["mode"] == mode]
        for key, label, style in LOTTERY_CURVES:
            x, y, e = _by_level(mine, key)
            ax.errorbar(x, y, yerr=e, ls=style, marker="o", capsize=3, label=label)
        _baselines(ax, dense)
        ax.set(xlabel=f"level: {level_label(result)}", ylabel=f"{result['valid_split']} accuracy (%)",
               title=f"{result['experiment']}: {mode.replace('_', ' ')}{granularity_text(result)}")
        ax.legend(fontsize=8)
        paths.append(folder / f"{stem(result)}_{mode}.png")
        save_figure(fig, paths[-1])
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in modes:
        x, y, e = _by_level([r for r in rows if r["mode"] == mode], "accuracy_retrained")
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=mode.replace("_", " "))
    _baselines(ax, dense)
    ax.set(xlabel=f"level: {level_label(result)}", ylabel=f"{result['valid_split']} accuracy (%)",
           title=f"{result['experiment']}: retrained accuracy, all modes{granularity_text(result)}")
    ax.legend(fontsize=8)
    paths.append(folder / f"{stem(result)}_all.png")
    save_figure(fig, paths[-1])
    return paths


def _baselines(ax, dense: dict) -> None:
    ax.axhline(dense["accuracy"]["mean"], ls="--", color="black", label="dense")
    ax.axhline(dense["blind"]["mean"], ls="--", color="grey", label="question-only")


def lottery_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Retrained accuracy by sparsity (rows) and mode (columns): mean ± std over seeds (one seed: its value)."""
    rows = result["rows"]
    modes = [m for m in MODES_ORDER if any(r["mode"] == m for r in rows)]
    levels = sorted({r["target_sparsity"] for r in rows})
    d = result["dense"]
    per_seed = list(d["per_seed"].values())
    header = [level_label(result), "measured %"] + [m.replace("_", " ") for m in modes]
    body = [["0 (dense)", "0.00"] + [mean_std(per_seed)] * len(modes)]
    for level in levels:
        at = [r for r in rows if r["target_sparsity"] == level]
        line = [f"{100 * level:g}", f"{100 * np.mean([r['measured_sparsity'] for r in at]):.2f}"]
        line += [mean_std([r["accuracy_retrained"] for r in at if r["mode"] == m]) for m in modes]
        body.append(line)
    blind = list({r["seed"]: r["accuracy_blind"] for r in rows}.values()) or [d["blind"]["mean"]]
    body.append(["question-only (bag of words)", "-"] + [mean_std(blind)] * len(modes))
    lxmert = [q["final"][result["valid_split"]]["overall"] for q in result.get("question_only", [])]
    if lxmert:
        body.append(["question-only LXMERT", "-"] + [mean_std(lxmert)] * len(modes))
    return header, body


def lottery_split_table(result: dict, split: str) -> tuple[list[str], list[list[str]]]:
    """Accuracy on a test split of every level's best-on-valid weights (the weights a study tests with), by
    sparsity and mode, with the dense model's and both question-only models' (mean ± std over seeds)."""
    rows = result["rows"]
    modes = [m for m in MODES_ORDER if any(r["mode"] == m for r in rows)]
    dense = [t[split]["overall"] for t in result["dense"].get("tests", {}).values() if split in t]
    header = [level_label(result)] + [m.replace("_", " ") for m in modes]
    body = [["0 (dense)"] + [mean_std(dense)] * len(modes)] if dense else []
    for level in sorted({r["target_sparsity"] for r in rows}):
        body.append([f"{100 * level:g}"] + [mean_std([r["tests"][split]["overall"] for r in rows
                                                      if r["mode"] == m and r["target_sparsity"] == level])
                                             for m in modes])
    blind = [b[split]["overall"] for b in result["dense"].get("blind_by_seed", {}).values() if split in b]
    if blind:
        body.append(["question-only (bag of words)"] + [mean_std(blind)] * len(modes))
    lxmert = [q["best"][split]["overall"] for q in result.get("question_only", []) if split in q["best"]]
    if lxmert:
        body.append(["question-only LXMERT"] + [mean_std(lxmert)] * len(modes))
    return header, body


def lottery_type_table(result: dict, finetune: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """Retrained accuracy per answer type (mean ± std over seeds) by mode and sparsity, with the dense model
    and the question-only model of finetune.json when given: which questions a ticket keeps or loses."""
    rows, valid = result["rows"], result["valid_split"]
    modes = [m for m in MODES_ORDER if any(r["mode"] == m for r in rows)]
    levels = sorted({r["target_sparsity"] for r in rows})

    def cells(accs: list[dict]) -> list[str]:
        return [mean_std_cell([a.get(t) for a in accs]) for t in ANSWER_TYPES]

    header = ["mode", level_label(result)] + [f"{valid} {t}" for t in ANSWER_TYPES]
    seeds = list(finetune["seeds"].values()) if finetune else []
    body = [["dense", "0"] + cells([s["final"] for s in seeds])] if seeds else []
    for mode in modes:
        for level in levels:
            at = [r["retrained_by_type"] for r in rows if r["mode"] == mode and r["target_sparsity"] == level]
            body.append([mode.replace("_", " "), f"{100 * level:g}"] + cells(at))
    if seeds:
        body.append(["question-only (bag of words)", "-"] + cells([s["blind"][valid] for s in seeds]))
    if result.get("question_only"):
        body.append(["question-only LXMERT", "-"] + cells([q["final"][valid] for q in result["question_only"]]))
    return header, body
