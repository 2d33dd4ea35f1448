"""What every report of the studies shares: mean ± std cells, tables as Markdown and PNG, figures written
crash-safely; and the dense fine-tune's curves. Computed only from the JSON files the experiments wrote."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core.files import write_text, write_with  # noqa: E402


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


def machine(result: dict) -> str:
    """'; <CPU>' or '; <GPU>' of a result file (floats differ between CPU types: name it beside every table)."""
    env = result.get("environment") or {}
    where = env.get("gpu") or env.get("cpu")
    return f"; {where}" if where else ""


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


ANSWER_TYPES = ("yes/no", "number", "other")


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
