"""How fast the embedded benchmark's model learns its question families from random initialisation.

    python -m bench.learnability [--runs mixed,lookup,existence] [--questions 20000] [--steps 2000]
                                 [--every 500] [--lr 1e-3] [--threads 2] [--no-append]

The studies fine-tune for 376 steps (3,000 questions, 4 epochs of batch 32) from the stand-in encoder; this
script asks what the same model learns without any pretraining when given far more steps, on fresh
questions of the benchmark's own generator (default settings of data.embedded). Answers are drawn
uniformly, but a draw that cannot be planted in the scene is redrawn (a count of 5 needs 5 matching
objects among 2-5), so some families are skewed: the baseline reported beside each family is the share of
its most frequent answer among the held-out questions (what a constant answer scores). Runs:
  mixed      the ten study families together (the studies' mixture, without their priors);
  lookup     "what color is the <shape>?" alone (one attribute of an object named by another);
  existence  "does the picture show a <shape>?" alone (any region of the shape; benchmark format 4: until
             format 3 it was "is there a <colour> <shape>?", a conjunction; docs/LEARNABILITY.md).
Model: LXMERT at the sizes of run/configs/embedded.yaml (no pretrained weights) with the project's answer
head (its model.answer_prior shift of the output biases changes nothing under this softmax loss);
cross-entropy on the true answer, the project's fused AdamW (lr constant after a 5 % warmup, weight decay 0.01), clipping 5.0, batch 32. Held-out accuracy per family (2,000 questions per run, generated
with another seed) every `every` steps. Prints the table and appends it, with the machine and date, to
docs/LEARNABILITY.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import append
from lxmert.core.config import EmbeddedConfig, load_config
from lxmert.embedded import generator as B
from lxmert.modeling.vqa import build_model
from lxmert.train.optimizers import adamw

DOC = "LEARNABILITY.md"
RUNS = {"mixed": lambda t: True,
        "lookup": lambda t: t.text((0, 0)) == "what color is the cube?",
        "existence": lambda t: t.qtype == "does the picture"}


def short(t: B.Template) -> str:
    """A family's name: its text with the first value of each parameter."""
    return t.text((0, 0))


def make_questions(gen: B.Generator, templates: list, n: int, seed: int):
    """n questions (answers drawn uniformly per template, planted as the studies plant theirs, a quarter of the
    questions with hidden objects) with their regions; returns texts, features, boxes, template and answer."""
    rng = np.random.default_rng([seed, 99])
    dists = [np.full(len(t.answers), 1 / len(t.answers)) for t in templates]
    texts, feats, boxes, fams, answers = [], [], [], [], []
    while len(texts) < n:
        scene, asked = gen.ask(gen.scene(rng), 3, dists, rng, templates)
        for t, p, _ in asked:
            objects = [int(i) for i in t.focus(scene, p) if i is not None]
            if objects and rng.random() < gen.cfg.hard_questions:
                gen.hide(scene, objects, rng)
        f, b, _ = gen.regions(scene, rng)
        for t, p, a in asked:
            texts.append(t.text(p))
            feats.append(f)
            boxes.append(b)
            fams.append(templates.index(t))
            answers.append(a)
    return texts[:n], np.stack(feats[:n]), np.stack(boxes[:n]), np.array(fams[:n]), answers[:n]


def run(name: str, args, tokenizer_dir: str) -> tuple[list[list], float]:
    """Train one run; rows of (run, family, held-out questions, majority-answer share, accuracy at each
    checkpoint)."""
    from transformers import BertTokenizer

    gen = B.Generator(EmbeddedConfig())
    templates = [t for t in B.TEMPLATES if RUNS[name](t)]
    vocab = sorted({a for t in templates for a in t.answers})
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)

    def tensors(n: int, seed: int):
        texts, feats, boxes, fams, answers = make_questions(gen, templates, n, seed)
        enc = tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "visual_feats": torch.from_numpy(feats), "visual_pos": torch.from_numpy(boxes),
                "answer": torch.tensor([vocab.index(a) for a in answers]), "family": torch.from_numpy(fams)}

    train, held = tensors(args.questions, 1), tensors(2000, 2)
    majority = [100 * float(torch.bincount(held["answer"][held["family"] == i]).max()) /
                max(1, int((held["family"] == i).sum())) for i in range(len(templates))]
    cfg = load_config(str(Path(__file__).resolve().parent.parent / "run" / "configs" / "embedded.yaml"),
                      ["model.pretrained=null"])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(tokenizer), gen.cfg.feat_dim, len(vocab))
    optimizer = adamw(model.parameters(), args.lr, torch.device("cpu"))
    warmup = max(1, int(0.05 * args.steps))
    rng = np.random.default_rng(0)
    curves: list[list[float]] = []
    started = time.time()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / warmup)
        index = torch.from_numpy(rng.integers(0, args.questions, 32))
        logits, _ = model({k: v[index] for k, v in train.items()})
        loss = F.cross_entropy(logits, train["answer"][index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step % args.every == 0:
            model.eval()
            with torch.no_grad():
                hit = (model(held)[0].argmax(1) == held["answer"]).float()
            model.train()
            curves.append([100 * float(hit[held["family"] == i].mean()) for i in range(len(templates))])
            print(f"{name} step {step}: " + ", ".join(f"{short(t)} {c:.1f}" for t, c in zip(templates, curves[-1])),
                  flush=True)
    rows = [[name, short(t), int((held["family"] == i).sum()), f"{majority[i]:.1f}", *(f"{c[i]:.1f}" for c in curves)]
            for i, t in enumerate(templates)]
    return rows, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="mixed,lookup,existence", help=f"comma-separated: {', '.join(RUNS)}")
    parser.add_argument("--questions", type=int, default=20000, help="training questions per run")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of batch 32 per run")
    parser.add_argument("--every", type=int, default=500, help="held-out evaluation every this many steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-append", action="store_true", help=f"print only, do not append to docs/{DOC}")
    args = parser.parse_args()
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown or not 0 < args.every <= args.steps or args.questions < 32:
        parser.error(f"unknown run(s) {unknown} (known: {', '.join(RUNS)})" if unknown else
                     "need 0 < --every <= --steps and --questions >= 32")
    torch.set_num_threads(args.threads)
    rows, seconds = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        B.write_vocab_tokenizer(Path(tmp), [t.text(p) for t in B.TEMPLATES for p in
                                      [(a, b) for a in range(len(B.COLORS)) for b in range(len(B.SHAPES))]
                                      if _valid(t, p)])
        for name in args.runs.split(","):
            run_rows, seconds[name] = run(name, args, tmp)
            rows += run_rows
    checkpoints = list(range(args.every, args.steps + 1, args.every))
    header = ["run", "family (first values)", "held-out questions", "majority answer %",
              *(f"step {s}" for s in checkpoints)]
    notes = (f"Command: `python -m bench.learnability {' '.join(sys.argv[1:])}`. Held-out accuracy (%) of the "
             f"true answer, {args.questions} training questions per run, answers drawn uniformly (the majority "
             "column is what a constant answer scores), model and optimizer as in the module docstring; seconds "
             "per run: "
             + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".")
    if args.no_append:
        print("\n".join(" | ".join(str(c) for c in r) for r in [header] + rows))
        print(notes)
    else:
        append("Learning from random initialisation (embedded model)", header, rows, notes,
               doc=Path(__file__).resolve().parent.parent / "docs" / DOC)


def _valid(t: B.Template, params: tuple) -> bool:
    """Whether a parameter tuple is in range for a template's text (words for the tokenizer)."""
    try:
        t.text(params)
        return True
    except IndexError:
        return False


if __name__ == "__main__":
    main()
