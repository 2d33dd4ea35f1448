"""Plots and tables, computed only from the JSON files the experiments wrote."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import write_text, write_with  # noqa: E402


def mean_std(values: list[float]) -> str:
    """Mean ± std over seeds; one seed is shown as its single value (never '± 0.00')."""
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def mean_std_cell(values: list) -> str:
    """mean_std, or '-' where a seed has no value (e.g. a split without questions of an answer type)."""
    return "-" if None in values else mean_std(values)


def seeds_text(seeds: list) -> str:
    return "1 seed" if len(seeds) == 1 else f"mean ± std over {len(seeds)} seeds"


def save_figure(fig, path: Path) -> None:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_finetune(result: dict, path: Path) -> None:
    """Training loss and validation accuracy per epoch for each seed; question-only accuracy dashed."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    valid = result["valid_split"]
    for seed, s in result["seeds"].items():
        epochs = [e["epoch"] for e in s["epochs"]]
        ax_loss.plot(epochs, [e["loss"] for e in s["epochs"]], marker="o", label=f"seed {seed}")
        line, = ax_acc.plot(epochs, [e["valid"] for e in s["epochs"]], marker="o", label=f"seed {seed}")
        ax_acc.axhline(s["blind"][valid]["overall"], ls="--", color=line.get_color(),
                       label=f"question-only (seed {seed})")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel=f"{valid} accuracy (%)", title=f"{result['experiment']}: validation accuracy")
    ax_loss.legend()
    ax_acc.legend(fontsize=8)
    save_figure(fig, path)


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
    modes = sorted({r["mode"] for r in rows}, key=lambda m: ["low_magnitude", "random", "high_magnitude"].index(m))
    for mode in modes:
        fig, ax = plt.subplots(figsize=(6, 4))
        mine = [r for r in rows if r["mode"] == mode]
        for key, label, style in LOTTERY_CURVES:
            x, y, e = _by_level(mine, key)
            ax.errorbar(x, y, yerr=e, ls=style, marker="o", capsize=3, label=label)
        _baselines(ax, dense)
        ax.set(xlabel="sparsity level (%)", ylabel=f"{result['valid_split']} accuracy (%)",
               title=f"{result['experiment']}: {mode.replace('_', ' ')}")
        ax.legend(fontsize=8)
        paths.append(folder / f"lottery_{mode}.png")
        save_figure(fig, paths[-1])
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in modes:
        x, y, e = _by_level([r for r in rows if r["mode"] == mode], "accuracy_retrained")
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=mode.replace("_", " "))
    _baselines(ax, dense)
    ax.set(xlabel="sparsity level (%)", ylabel=f"{result['valid_split']} accuracy (%)",
           title=f"{result['experiment']}: retrained accuracy, all modes")
    ax.legend(fontsize=8)
    paths.append(folder / "lottery_all.png")
    save_figure(fig, paths[-1])
    return paths


def _baselines(ax, dense: dict) -> None:
    ax.axhline(dense["accuracy"]["mean"], ls="--", color="black", label="dense")
    ax.axhline(dense["blind"]["mean"], ls="--", color="grey", label="question-only")


def lottery_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Retrained accuracy by sparsity (rows) and mode (columns): mean ± std over seeds (one seed: its value)."""
    rows = result["rows"]
    modes = [m for m in ["low_magnitude", "random", "high_magnitude"] if any(r["mode"] == m for r in rows)]
    levels = sorted({r["target_sparsity"] for r in rows})
    d = result["dense"]
    per_seed = list(d["per_seed"].values())
    header = ["sparsity %", "measured %"] + [m.replace("_", " ") for m in modes]
    body = [["0 (dense)", "0.00"] + [mean_std(per_seed)] * len(modes)]
    for level in levels:
        at = [r for r in rows if r["target_sparsity"] == level]
        line = [f"{100 * level:g}", f"{100 * np.mean([r['measured_sparsity'] for r in at]):.2f}"]
        line += [mean_std([r["accuracy_retrained"] for r in at if r["mode"] == m]) for m in modes]
        body.append(line)
    blind = list({r["seed"]: r["accuracy_blind"] for r in rows}.values()) or [d["blind"]["mean"]]
    body.append(["question-only", "-"] + [mean_std(blind)] * len(modes))
    return header, body


ANSWER_TYPES = ("yes/no", "number", "other")


def lottery_type_table(result: dict, finetune: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """Retrained accuracy per answer type (mean ± std over seeds) by mode and sparsity, with the dense model
    and the question-only model of finetune.json when given: which questions a ticket keeps or loses."""
    rows, valid = result["rows"], result["valid_split"]
    modes = [m for m in ["low_magnitude", "random", "high_magnitude"] if any(r["mode"] == m for r in rows)]
    levels = sorted({r["target_sparsity"] for r in rows})

    def cells(accs: list[dict]) -> list[str]:
        return [mean_std_cell([a.get(t) for a in accs]) for t in ANSWER_TYPES]

    header = ["mode", "sparsity %"] + [f"{valid} {t}" for t in ANSWER_TYPES]
    seeds = list(finetune["seeds"].values()) if finetune else []
    body = [["dense", "0"] + cells([s["final"] for s in seeds])] if seeds else []
    for mode in modes:
        for level in levels:
            at = [r["retrained_by_type"] for r in rows if r["mode"] == mode and r["target_sparsity"] == level]
            body.append([mode.replace("_", " "), f"{100 * level:g}"] + cells(at))
    if seeds:
        body.append(["question-only", "-"] + cells([s["blind"][valid] for s in seeds]))
    return header, body


def write_table(header: list[str], body: list[list[str]], md_path: Path, png_path: Path, title: str) -> None:
    """The same table as Markdown and as a PNG image."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    write_text(md_path, f"# {title}\n\n" + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(1.6 * len(header) + 1, 0.35 * len(body) + 1))
    ax.axis("off")
    table = ax.table(cellText=body, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    ax.set_title(title, fontsize=9)
    save_figure(fig, png_path)


def redraw_all(cfg) -> None:
    """Every plot and table of the config's experiment again from its JSON results (no training)."""
    from .debias import redraw as redraw_debias
    from .lottery import redraw as redraw_lottery

    redraw_lottery(cfg)
    redraw_debias(cfg)
