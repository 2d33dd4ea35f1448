"""How much of the embedded study's spread the stand-in pretraining brings: the ± of the tables covers the
fine-tuning seeds only, while every study reads one stand-in (as a real study reads one release), made by one
pretraining run whose floats also depend on the CPU type.

    python -m bench.standin_seeds [--pretrain-seeds 0,1,2] [--config run/configs/embedded.yaml] [KEY=VALUE ...]

For each pretraining seed it makes a stand-in of its own (models/embedded_pretrain_p<seed>/encoder) and runs the
study on it as experiment <experiment>_p<seed> (the config's own pretraining seed: its own stand-in and experiment) (`python -m lxmert lottery`, the overrides given passed on, e.g.
seeds=[0,1] lottery.levels=[0.4,0.8] to shorten it), then reports, for the dense model and every level, the
mean over fine-tuning seeds per stand-in, the spread of those means across stand-ins and the spread across
fine-tuning seeds within a stand-in; appended to docs/RESULTS.md (--no-append: printed only). Run from the
repository root; a study already run is read back, not run again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import append  # noqa: E402
from lxmert.core.config import load_config  # noqa: E402

DOC = ROOT / "docs" / "RESULTS.md"


def _run(config: str, seed: int, overrides: list[str]) -> Path:
    """The study on the stand-in of pretraining seed `seed`; its result folder. The config's own pretraining
    seed is its own experiment and stand-in (the default study, read back when it is finished)."""
    cfg = load_config(config, overrides)
    base = cfg.experiment
    if seed == cfg.pretrain.seed:
        subprocess.run([sys.executable, "-m", "lxmert", "lottery", "--config", config, *overrides], cwd=ROOT, check=True)
        return ROOT / "result" / base
    export = f"models/embedded_pretrain_p{seed}/encoder"
    items = [*overrides, f"experiment={base}_p{seed}", f"pretrain.seed={seed}", f"pretrain.export={export}",
             f"model.pretrained={export}"]
    subprocess.run([sys.executable, "-m", "lxmert", "lottery", "--config", config, *items], cwd=ROOT, check=True)
    return ROOT / "result" / f"{base}_p{seed}"


def _cells(per_standin: list[list[float]]) -> list[str]:
    """Mean per stand-in, the std of those means (across stand-ins), the mean std within a stand-in."""
    means = [float(np.mean(v)) for v in per_standin]
    within = float(np.mean([np.std(v) for v in per_standin]))
    return [" / ".join(f"{m:.2f}" for m in means), f"{np.std(means):.2f}", f"{within:.2f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-seeds", default="0,1,2", help="pretraining seeds, comma-separated")
    parser.add_argument("--config", default="run/configs/embedded.yaml")
    parser.add_argument("--no-append", action="store_true", help="print the table only")
    parser.add_argument("overrides", nargs="*", help="passed on to every study (key=value)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.pretrain_seeds.split(",")]
    results = [json.loads((_run(args.config, s, args.overrides) / "lottery.json").read_text()) for s in seeds]
    valid = results[0]["valid_split"]
    rows = [["dense", "-"] + _cells([list(r["dense"]["per_seed"].values()) for r in results])]
    for mode in dict.fromkeys(row["mode"] for row in results[0]["rows"]):
        for level in sorted({row["target_sparsity"] for row in results[0]["rows"]}):
            rows.append([mode.replace("_", " "), f"{100 * level:g}"] + _cells(
                [[row["accuracy_retrained"] for row in r["rows"] if row["mode"] == mode
                  and row["target_sparsity"] == level] for r in results]))
    notes = (f"Command: `python -m bench.standin_seeds {' '.join(sys.argv[1:] if argv is None else argv)}`. "
             f"Retrained {valid} accuracy (%, last epoch) of study A on the stand-ins of pretraining seeds "
             f"{', '.join(map(str, seeds))} (one stand-in each), {len(results[0]['seeds'])} fine-tuning seed(s) "
             "per stand-in. 'across stand-ins': the std of the per-stand-in means (the pretraining's share); "
             "'within': the mean over stand-ins of the std over fine-tuning seeds (the ± of the README tables).")
    if args.no_append:
        print("\n".join(" | ".join(r) for r in rows))
        print(notes)
    else:
        append("Study A across stand-ins: the pretraining's share of the spread",
               ["mode", "sparsity %", "mean per stand-in", "std across stand-ins", "std within a stand-in"],
               rows, notes, doc=DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
