"""Study B's outputs, computed from the rows only: debias.json, the table of every setting and stage (mean ± std
over seeds, final and best-on-valid, with the question-only model of each loss), the same per answer type, and
one plot of accuracy against measured sparsity per test split."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.config import Config
from ..core.errors import InputError
from ..core.files import read_object, write_json
from ..core.paths import Experiment
from .figures import ANSWER_TYPES, machine, mean_std, mean_std_cell, plt, save_figure, seeds_text, write_table
from .rows import DEBIAS_KEYS

Target = float | dict[str, float]


def pct(x: float) -> str:
    """A fraction as a percent label: 0.5 -> '50', 0.125 -> '12.5'."""
    return f"{round(100 * x, 2):g}"


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
        return "/".join(pct(v) for v in target.values())
    return pct(target)


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
        body.append([f"question-only (bag of words) {loss}", "-", "-", "-", "-",
                     mean_std([_overall(a, valid) for a in accs])]
                    + [mean_std([_overall(a, t) for a in accs]) if kind == "final" else "-"
                       for t in tests for kind in ("final", "best")])
    for loss, rows in result.get("question_only", {}).items():
        body.append([f"question-only LXMERT {loss}", "-", "-", "-", "-",
                     mean_std([_overall(r["final"], valid) for r in rows])]
                    + [mean_std([_overall(r[kind], t) for r in rows]) for t in tests for kind in ("final", "best")])
    for rule, accs in result.get("priors", {}).items():
        body.append([f"prior: {rule}", "-", "-", "-", "-", "-"]
                    + [_rule_cell(accs, t, "overall") if kind == "final" else "-" for t in tests
                       for kind in ("final", "best")])
    return header, body


def _rule_cell(accs: dict, split: str, kind: str) -> str:
    """A prior rule's accuracy (one value: no seed is involved), '-' where it has none (the OOD mean of its parts)."""
    if split != OOD_MEAN and split not in accs:
        return "-"
    value = _accuracy(accs, split, kind)
    return "-" if value is None else f"{value:.2f}"


def answer_type_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Final accuracy per answer type, mean ± std over seeds, of every setting and of the question-only model
    of each loss: where a method's gain or loss under the shift comes from."""
    tests = _report_splits(result)
    header = ["setting", "stage", "target sparsity %"] + [f"{t} {a}" for t in tests for a in ANSWER_TYPES]

    def cells(accs: list[dict]) -> list[str]:
        return [mean_std_cell([_accuracy(a, t, kind) for a in accs]) for t in tests for kind in ANSWER_TYPES]

    body = [[setting, stage, _target_text(group[0]["target_sparsity"])] + cells([r["final"] for r in group])
            for (setting, stage, _), group in _ordered_groups(result)]
    body += [[f"question-only (bag of words) {loss}", "-", "-"] + cells(accs) for loss, accs in blind_rows(result).items()]
    body += [[f"question-only LXMERT {loss}", "-", "-"] + cells([r["final"] for r in rows])
             for loss, rows in result.get("question_only", {}).items()]
    body += [[f"prior: {rule}", "-", "-"] + [_rule_cell(accs, t, kind) for t in tests for kind in ANSWER_TYPES]
             for rule, accs in result.get("priors", {}).items()]
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
                   label=f"question-only (bag of words) {loss}")
    for loss, rows in result.get("question_only", {}).items():
        ax.axhline(float(np.mean([_overall(r["final"], split) for r in rows])), ls=":", lw=1, color="dimgrey",
                   label=f"question-only LXMERT {loss}")
    for rule, accs in result.get("priors", {}).items():
        value = _accuracy(accs, split, "overall") if split == OOD_MEAN or split in accs else None
        if value is not None:
            ax.axhline(value, ls="-", lw=0.8, color="lightgrey", label=f"prior: {rule}")
    ax.set(xlim=(0, 100), xlabel="measured sparsity (%)", ylabel=f"{split} accuracy (%)",
           title=f"{result['experiment']}: {split} accuracy of the final models")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, path)


def write_debias(cfg: Config, result: dict) -> None:
    out = Experiment(cfg).results
    write_json(out / "debias.json", result)
    header, body = debias_table(result)
    write_table(header, body, out / "debias_table.md", out / "debias_table.png",
                f"{cfg.experiment}: accuracy (%), {seeds_text(result['seeds'])}; models selected on "
                f"{result['valid_split']}; epochs = all training epochs behind the row{machine(result)}")
    header, body = answer_type_table(result)
    write_table(header, body, out / "debias_answer_types.md", out / "debias_answer_types.png",
                f"{cfg.experiment}: final accuracy (%) by answer type, {seeds_text(result['seeds'])}{machine(result)}")
    for split in _report_splits(result):
        plot_debias(result, split, out / f"debias_{split}.png")


def redraw(cfg: Config) -> None:
    """Table and plots again from result/<exp>/debias.json (no training)."""
    path = Experiment(cfg).result("debias.json")
    if path.exists():
        result = read_object(path, ("experiment", "valid_split", "test_splits", "seeds", "rows"), "study-B result")
        for i, row in enumerate(result["rows"]):
            missing = [k for k in DEBIAS_KEYS if k not in row]
            if missing:
                raise InputError(f"{path}: row {i} has no field '{missing[0]}'; rerun the study to rebuild it")
        splits = [t for t in _report_splits(result) if t != OOD_MEAN]
        for i, row in enumerate(result["rows"]):
            absent = [f"{kind} {t}" for kind in ("final", "best") for t in splits
                      if not isinstance(row[kind], dict) or t not in row[kind]]
            if absent:
                raise InputError(f"{path}: row {i} ({row['setting']} {row['stage']}) has no '{absent[0]}' accuracy, "
                                 "which other rows have; rerun the study to rebuild it")
        write_debias(cfg, result)
