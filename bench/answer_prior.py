"""Why the embedded configs set model.answer_prior: what the answer head's starting point does to the image
evidence the stand-in brings to the fine-tune.

    python -m bench.answer_prior [--epochs 1,4] [--no-append]

The stand-in's QA head was trained with a softmax (LXMERT's QA pretraining), so under the fine-tune's
sigmoid (BCE) loss every answer starts near probability 0.5, and the first steps push almost every logit
down at once. This script fine-tunes study A's dense model (run/configs/embedded.yaml, seed 0, the study's
code) from the stand-in for each number of epochs, with model.answer_prior null (the head as exported) and
0.01, in a temporary folder (the data and the stand-in are read from data/ and models/, made first if
missing), and reports for minival's "does the picture show a <shape>?" questions (a family the stand-in
pretraining shares) the AUC of the yes-minus-no logit margin against the true answer (0.5: no image
evidence left; the majority answer of the soft label is the truth), the share answered "yes", and the whole
minival accuracy. The "before" row is the stand-in itself (the shift moves both logits alike, so its margin
is the same with either setting). Appends the table to docs/LEARNABILITY.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import append  # noqa: E402
from lxmert.core.config import load_config  # noqa: E402
from lxmert.core.paths import Experiment, Run  # noqa: E402
from lxmert.studies.context import Context  # noqa: E402
from lxmert.studies.dense import dense  # noqa: E402
from lxmert.train.evaluation import evaluate  # noqa: E402

FAMILY = "does the picture"


def auc(margin: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random 'yes' question gets a larger margin than a random 'no' one (ties half)."""
    pos, neg = margin[positive], margin[~positive]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


@torch.no_grad()
def existence(ctx: Context, model) -> tuple[float, float, int]:
    """AUC and share answered yes on the validation split's existence questions, and their number."""
    data = ctx.data.valid
    sp = data.split
    index = [i for i, t in enumerate(sp.question_types) if t == FAMILY]
    model.eval()
    logits, _ = model(data.batch(index, targets=False))
    yes, no = ctx.data.vocab.ans2label["yes"], ctx.data.vocab.ans2label["no"]
    truth = np.array([sp.label_idx[sp.label_ptr[i]:sp.label_ptr[i + 1]][
        np.argmax(sp.label_score[sp.label_ptr[i]:sp.label_ptr[i + 1]])] == yes for i in index])
    margin = (logits[:, yes] - logits[:, no]).numpy()
    answered_yes = (logits.argmax(1) == yes).float().mean().item()
    return auc(margin, truth), answered_yes, len(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="1,4", help="comma-separated numbers of fine-tune epochs")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to docs/LEARNABILITY.md")
    args = parser.parse_args()
    epochs = [int(e) for e in args.epochs.split(",")]
    base = load_config(str(ROOT / "run" / "configs" / "embedded.yaml"), ["seeds=[0]"])
    absolute = [f"data.root={(ROOT / base.data.root).resolve()}",
                f"model.pretrained={(ROOT / base.model.pretrained).resolve()}",
                f"pretrain.export={(ROOT / base.pretrain.export).resolve()}"]
    rows = []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for prior in ("null", "0.01"):
                for n in epochs:
                    cfg = load_config(str(ROOT / "run" / "configs" / "embedded.yaml"),
                                      ["seeds=[0]", f"experiment=answer_prior_{prior}_{n}", f"train.epochs={n}",
                                       f"model.answer_prior={prior}", *absolute])
                    ctx = Context.load(cfg)
                    if not rows:
                        standin = ctx.new_model(0)
                        area, share, count = existence(ctx, standin)
                        acc = evaluate(standin, ctx.data.valid, 256, torch.device("cpu"))["overall"]
                        rows.append(["stand-in (before fine-tuning)", "-", "0", f"{area:.3f}", f"{100 * share:.1f}",
                                     f"{acc:.2f}"])
                    model, _ = dense(ctx, 0, "bce", Run(Experiment(cfg).models / "run"))  # at its last epoch's weights
                    area, share, count = existence(ctx, model)
                    acc = evaluate(model, ctx.data.valid, 256, torch.device("cpu"))["overall"]
                    rows.append(["dense fine-tune, seed 0", prior, str(n), f"{area:.3f}", f"{100 * share:.1f}",
                                 f"{acc:.2f}"])
                    print(rows[-1], flush=True)
        finally:
            os.chdir(cwd)
    header = ["model", "model.answer_prior", "epochs", "existence AUC (yes - no margin)", "answered yes %",
              "minival accuracy %"]
    notes = (f"Command: `python -m bench.answer_prior {' '.join(sys.argv[1:])}`. run/configs/embedded.yaml "
             f"(lr, batch, warmup as the study), seed 0; {count} minival questions \"does the picture show a "
             "<shape>?\"; last epoch's weights.")
    if args.no_append:
        print("\n".join(" | ".join(str(c) for c in r) for r in [header] + rows))
        print(notes)
    else:
        append("The answer head's starting point and the stand-in's existence skill", header, rows, notes,
               doc=ROOT / "docs" / "LEARNABILITY.md")


if __name__ == "__main__":
    main()
