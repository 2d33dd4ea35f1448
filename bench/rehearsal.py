"""Base-size rehearsal on the CPU: both studies' real configs, at LXMERT base size, on a few dozen questions.

    python -m bench.rehearsal [--keep-dir DIR] [--no-append] [--keep minimal|all] [--threads N] [--studies A,B]

`python -m lxmert plan` predicts the disk every unit of a study keeps and needs while it runs from formulas
(lxmert/studies/plan.py). No real-data run has been made, so this checks the formulas against files the
studies really write at the real size: 768 wide, 9/5/5 layers, 36 x 2048-d regions, a 30,522-entry BERT
vocabulary and 3,129 answers. In a temporary folder it writes real-format data (LXMERT's *_obj36.tsv features
prepared into a store with `python -m lxmert prepare features`; LXMERT's question files for VQA v2, nominival
split by `python -m lxmert prepare carve`; raw VQA-CP v2 questions and annotations prepared with `python -m
lxmert prepare vqa`), then runs run/configs/vqa_v2.yaml (study A, `python -m lxmert lottery`) and
run/configs/vqa_cp_v2.yaml (study B, `python -m lxmert debias`) as subprocesses, overriding only what a CPU
rehearsal must change (COMMON and STUDIES below: one seed, one level of each mode, one study-B setting, one
epoch of two steps, a local stand-in for the pretrained encoder, the local tokenizer, device=cpu).

Measured: what each unit folder under models/<experiment>/ holds at the end (what it keeps), the largest size
each reached and the largest size of the whole models/<experiment>/ (sampled every 0.2 s from a thread), and
the peak resident memory of the study process (sampled, and getrusage). Compared with plan() of the same
config and overrides: Cost.keeps per unit, Plan.shared, Plan.end(), Cost.running and Plan.peak(1).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import append  # noqa: E402
from lxmert.data.prepare import random_obj36_line  # noqa: E402

BOXES, FEAT_DIM, VOCAB, ANSWERS = 36, 2048, 30_522, 3_129  # LXMERT base on VQA v2
MB = 1e6
# (question, question type, answer type, answer, second answer): soft labels 1.0 and 0.3, as LXMERT's files.
QUESTIONS = [
    ("Is the car red?", "is the", "yes/no", "yes", "no"),
    ("Is there a dog in the picture?", "is there a", "yes/no", "no", "yes"),
    ("How many people are there?", "how many", "number", "2", "3"),
    ("How many cars are on the street?", "how many", "number", "3", "2"),
    ("What animal is this?", "what animal is", "other", "dog", "cat"),
    ("What animal is on the bed?", "what animal is", "other", "cat", "dog"),
    ("What color is the bus?", "what color is the", "other", "red", "blue"),
    ("What is the man holding?", "what is the man", "other", "umbrella", "bat"),
]
REAL_ANSWERS = sorted({a for q in QUESTIONS for a in q[3:]})
# What the rehearsal changes in the real configs (besides model.pretrained and model.tokenizer, the folders it
# writes): one seed, one epoch of 2 steps (16 training questions at batch 8), the CPU; checkpoints after every
# step, so that a one-epoch run writes one as the real runs do at every epoch's end.
COMMON = ["seeds=[0]", "device=cpu", "train.epochs=1", "train.batch_size=8",
          "train.eval_batch_size=16", "train.save_every_steps=1", "blind.epochs=1"]
STUDIES = {
    "lottery": ("run/configs/vqa_v2.yaml", ["lottery.levels=[0.5]"]),
    "debias": ("run/configs/vqa_cp_v2.yaml", [
        "debias.stage1_losses=[bce]", "debias.stage2_losses=[bce]", "debias.sparsities=[0.5]",
        "debias.modality_sparsities=[]", "debias.stage2_epochs=1", "debias.stage3_epochs=1",
        "debias.stage2_batch_size=8", "debias.stage3_batch_size=8"]),
}


# -- real-format data -------------------------------------------------------------------------------------

def _coco(split: str, image: int) -> str:
    return f"COCO_{split}_{image:012d}"


def write_features(root: Path, images: dict[str, list[int]]) -> None:
    """The obj36 TSV files of the images, prepared into the store every config reads (data/coco_obj36)."""
    from lxmert.__main__ import main

    raw = root / "data/raw/mscoco_imgfeat"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, ids in images.items():
        lines = (random_obj36_line(_coco(split, i), rng, BOXES, FEAT_DIM) for i in ids)
        (raw / f"{split}_obj36.tsv").write_text("".join(lines))
    tsv = [str(raw / f"{split}_obj36.tsv") for split in images]
    _check(main(["prepare", "features", *tsv, "--out", str(root / "data/coco_obj36"), "--dtype", "float16"]),
           "prepare features")


def write_vocabulary(folder: Path) -> Path:
    """LXMERT's answer vocabulary size: the answers the questions use, then filler answers up to 3,129."""
    answers = REAL_ANSWERS + [f"filler answer {i}" for i in range(ANSWERS - len(REAL_ANSWERS))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainval_ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(answers)}))
    (folder / "trainval_label2ans.json").write_text(json.dumps(answers))
    return folder / "trainval_ans2label.json"


def _lxmert_question(qid: int, img_id: str, k: int) -> dict:
    sent, qtype, atype, answer, other = QUESTIONS[k % len(QUESTIONS)]
    return {"answer_type": atype, "img_id": img_id, "label": {answer: 1.0, other: 0.3}, "question_id": qid,
            "question_type": qtype, "sent": sent}


def write_vqa_v2(root: Path) -> None:
    """Study A's files in LXMERT's question format (used as they are, data/README.md step 2a): train (8
    questions on train2014 images) and nominival (12), minival (8). nominival is then split by image with
    `python -m lxmert prepare carve`, as the config expects: nominival_train (8, trained on) and
    nominival_heldout (4, the test split); a third of its 6 images, where the real carve holds out a tenth."""
    from lxmert.__main__ import main

    folder = root / "data/vqa_v2"
    write_vocabulary(folder)
    layout = {"train": ("train2014", range(1, 5)), "nominival": ("val2014", range(101, 107)),
              "minival": ("val2014", range(107, 111))}
    for name, (split, images) in layout.items():
        questions = [_lxmert_question(i * 100 + j, _coco(split, i), i + j) for i in images for j in range(2)]
        (folder / f"{name}.json").write_text(json.dumps(questions))
    _check(main(["prepare", "carve", str(folder / "nominival.json"), "--fraction", "0.34", "--names",
                 "nominival_train", "nominival_heldout", "--out", str(folder), "--seed", "0"]), "prepare carve")


def _raw_cp(images: list[tuple[str, int]], first_k: int) -> tuple[list, list]:
    """VQA-CP v2's raw files: a list of questions and a list of annotations, each with its coco_split."""
    questions, annotations = [], []
    for n, (split, image) in enumerate(images):
        for j in range(2):
            k, qid = first_k + 2 * n + j, image * 1000 + j
            sent, qtype, atype, answer, other = QUESTIONS[k % len(QUESTIONS)]
            humans = [answer] * 8 + [other] * 2
            questions.append({"image_id": image, "question": sent, "question_id": qid, "coco_split": split})
            annotations.append({"question_id": qid, "image_id": image, "question_type": qtype, "answer_type": atype,
                                "multiple_choice_answer": answer, "coco_split": split,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i, a in enumerate(humans)]})
    return questions, annotations


def write_vqa_cp_v2(root: Path, vocab: Path) -> None:
    """Study B's raw VQA-CP v2 files, prepared as data/README.md step 3 says (cp_val carved by image from
    cp_train), with LXMERT's vocabulary size (--vocab) instead of one counted on a few questions."""
    from lxmert.__main__ import main

    raw = root / "data/raw/vqa_cp_v2"
    raw.mkdir(parents=True)
    train = [("train2014", i) for i in range(7, 13)] + [("val2014", i) for i in range(107, 111)]
    test = [("train2014", 13), ("train2014", 14), ("val2014", 111), ("val2014", 112)]
    args = []
    for name, images, k in (("train", train, 0), ("test", test, 3)):
        questions, annotations = _raw_cp(images, k)
        (raw / f"vqacp_v2_{name}_questions.json").write_text(json.dumps(questions))
        (raw / f"vqacp_v2_{name}_annotations.json").write_text(json.dumps(annotations))
        args += ["--split", f"cp_{name}", str(raw / f"vqacp_v2_{name}_questions.json"),
                 str(raw / f"vqacp_v2_{name}_annotations.json")]
    _check(main(["prepare", "vqa", "--out", str(root / "data/vqa_cp_v2"), *args, "--carve-val", "0.2",
                 "--val-name", "cp_val", "--seed", "0", "--vocab", str(vocab),
                 "--features", str(root / "data/coco_obj36")]), "prepare vqa")


def write_tokenizer(folder: Path) -> Path:
    """A BERT word-piece tokenizer with bert-base-uncased's 30,522 entries (so the word embeddings have base
    size): the questions' words, then [unused<i>] fillers. BertTokenizer(vocab=...).save_pretrained, as
    lxmert.data.tokenizer does (BertTokenizerFast(vocab_file=...) ignores the file in transformers 5)."""
    from transformers import BertTokenizer

    backend = BertTokenizer(vocab={"[PAD]": 0, "[UNK]": 1}).backend_tokenizer
    words = set()
    for sent, *_ in QUESTIONS:
        words.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(sent)))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(str(folder))
    if len(BertTokenizer.from_pretrained(str(folder))) != VOCAB:
        raise RuntimeError(f"{folder}: the tokenizer does not have {VOCAB} entries")
    return folder


def write_encoder(folder: Path) -> Path:
    """A stand-in for the released LXMERT encoder (nothing can be downloaded): transformers' LxmertModel at base
    size, randomly initialised, its biases then drawn from N(0, 0.02) as trained biases are non-zero. With
    transformers' zero biases (model.pretrained=null) the study refuses to start (Context.check_question_only):
    the question-only LXMERT unit, whose region features and boxes are all zero, would get non-finite gradients
    in its first step at base size (the vision layers' LayerNorms see exactly constant vectors, and their
    gradients, amplified by 1/sqrt(eps) in each of them, overflow)."""
    import torch
    from transformers import LxmertConfig, LxmertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = LxmertModel(LxmertConfig(vocab_size=VOCAB, hidden_size=768, num_attention_heads=12,
                                     intermediate_size=3072, l_layers=9, x_layers=5, r_layers=5,
                                     visual_feat_dim=FEAT_DIM, visual_pos_dim=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(str(folder))
    return folder


def write_data(root: Path) -> tuple[Path, Path]:
    """Everything both configs read, under root/data (their own data.root values); returns the tokenizer and
    the stand-in encoder folders."""
    write_features(root, {"train2014": list(range(1, 15)), "val2014": list(range(101, 113))})
    write_vqa_v2(root)
    write_vqa_cp_v2(root, root / "data/vqa_v2/trainval_ans2label.json")
    return write_tokenizer(root / "data/tokenizer"), write_encoder(root / "data/encoder")


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} failed with exit code {code}")


# -- measuring --------------------------------------------------------------------------------------------

def _tree_bytes(folder: Path) -> dict[Path, int]:
    """Apparent size of every file under folder (files removed while walking are skipped)."""
    out = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = Path(parent) / name
            with contextlib.suppress(OSError):
                out[path] = path.stat().st_size
    return out


def _descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc/<p>/stat's parent field."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        out += frontier
    return out


def _pss_bytes(pids: list[int]) -> int:
    """Proportional set size of the processes together: pages a forked DataLoader worker shares with its
    parent are counted once (a sum of RSS would count them in every worker)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


@dataclass
class Watch:
    """Samples, from a thread, the bytes under models/<experiment>/ (whole and per unit folder; a file belongs
    to the deepest unit folder above it, other files are the seed-level ones) and the resident memory of the
    study's process tree. Sampling can miss a short-lived state; files of base size take seconds to write.
    `marks` names, per unit, a subfolder whose presence starts a later phase (study B's stage3/): the unit's
    largest size in that phase is kept apart, since stage 3 runs beside what stage 2 left."""

    models: Path
    units: list[str]
    marks: dict[str, str] = field(default_factory=dict)
    every: float = 0.2
    pid: int = 0
    peak_total: int = 0
    peak_unit: dict[str, int] = field(default_factory=dict)
    peak_marked: dict[str, int] = field(default_factory=dict)
    peak_pss: int = 0

    def owner(self, path: Path) -> str:
        rel = path.relative_to(self.models).as_posix()
        inside = [u for u in self.units if rel.startswith(u + "/")]
        return max(inside, key=len) if inside else "shared"

    def sizes(self) -> dict[str, int]:
        out = {u: 0 for u in [*self.units, "shared"]}
        for path, size in _tree_bytes(self.models).items():
            out[self.owner(path)] += size
        return out

    def sample(self) -> None:
        sizes = self.sizes()
        self.peak_total = max(self.peak_total, sum(sizes.values()))
        for unit, size in sizes.items():
            self.peak_unit[unit] = max(self.peak_unit.get(unit, 0), size)
        for unit, mark in self.marks.items():
            if (self.models / unit / mark).is_dir():
                self.peak_marked[unit] = max(self.peak_marked.get(unit, 0), sizes[unit])
        if self.pid:
            self.peak_pss = max(self.peak_pss, _pss_bytes(_descendants(self.pid)))

    def __enter__(self):
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while self.running:
            self.sample()
            time.sleep(self.every)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.sample()


# -- one study ------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    study: str
    cfg: object
    plan: object
    kept: dict[str, int]
    watch: Watch
    maxrss_children: int  # the largest resident set of any one child process so far (getrusage)
    seconds: float
    unit_seconds: dict[str, float]


def overrides(study: str, folders: tuple[Path, Path], keep: str) -> list[str]:
    """The rehearsal's overrides of a study's real config; folders: the tokenizer and the stand-in encoder."""
    extra = [] if keep == "minimal" else [f"checkpoints.keep={keep}"]
    return [*COMMON, f"model.tokenizer={folders[0]}", f"model.pretrained={folders[1]}", *STUDIES[study][1], *extra]


def plan_of(root: Path, study: str, items: list[str]):
    """The config with the rehearsal's overrides and its plan(), read from root (data.root is relative)."""
    from lxmert.core.config import load_config
    from lxmert.studies.plan import plan

    with contextlib.chdir(root):
        cfg = load_config(REPO / STUDIES[study][0], items)
        return cfg, plan(cfg, study, STUDIES[study][0])


def _unit_seconds(folder: Path) -> float:
    """The seconds a unit's result rows record (study B's stage 2 and 3 are two rows of one unit)."""
    rows = [folder / "result.json", folder / "stage2/result.json", folder / "stage3/result.json"]
    return sum(json.loads(p.read_text()).get("seconds", 0.0) for p in rows if p.exists())


def run_study(root: Path, study: str, folders: tuple[Path, Path], keep: str, threads: int) -> Outcome:
    """`python -m lxmert <study> --config <real config> <overrides>` in root, one worker process, watched."""
    items = overrides(study, folders, keep)
    cfg, planned = plan_of(root, study, items)
    models = root / "models" / cfg.experiment
    marks = {u.unit: "stage3" for u in planned.units if u.kind == "stage 2 + 3"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "LXMERT_WORKERS": "1", "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lxmert", study, "--config", str(REPO / STUDIES[study][0]), *items]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    with open(root / f"{study}.out", "w") as out, Watch(models, [u.unit for u in planned.units], marks) as watch:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch.pid = proc.pid
        code = proc.wait()
    seconds = time.time() - started
    if code != 0:
        tail = (root / f"{study}.out").read_text()[-4000:]
        raise RuntimeError(f"{study} failed with exit code {code}:\n{tail}")
    return Outcome(study, cfg, planned, watch.sizes(), watch,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, seconds,
                   {u.unit: _unit_seconds(models / u.unit) for u in planned.units})


# -- the table --------------------------------------------------------------------------------------------

def agrees(measured: int, planned: int) -> bool:
    """Within 10 %, or within 1 MB where the plan counts nothing (result, settings and summary JSON files,
    a few kB each, are not in its formulas)."""
    return abs(measured - planned) <= max(0.1 * planned, MB)


def _mb(n: int) -> str:
    return f"{n / MB:,.1f}"


def _ratio(measured: int, planned: int) -> str:
    return f"{measured / planned:.3f}" if planned else "-"


def rows_of(o: Outcome) -> list[list]:
    """One row per unit (kept at the end; largest while it ran), then the seed files, the end and the peak."""
    p, rows = o.plan, []
    label = {"lottery": "A", "debias": "B"}[o.study]
    for u in p.units:
        kept, peak = o.kept[u.unit], o.watch.peak_unit[u.unit]
        rows.append([label, f"`{u.unit}`", u.kind, _mb(kept), _mb(u.keeps), _ratio(kept, u.keeps),
                     "ok" if agrees(kept, u.keeps) else "DIFFERS", _mb(peak), _mb(u.keeps + u.running),
                     _ratio(peak, u.keeps + u.running), f"{o.unit_seconds[u.unit]:.0f}"])
    end = sum(o.kept.values())
    rows.append([label, "seed files (`init.safetensors`, ...)", "shared", _mb(o.kept["shared"]), _mb(p.shared),
                 _ratio(o.kept["shared"], p.shared), "ok" if agrees(o.kept["shared"], p.shared) else "DIFFERS",
                 "", "", "", ""])
    rows.append([label, f"**end: all of `models/{o.cfg.experiment}/`**", "total", _mb(end), _mb(p.end()),
                 _ratio(end, p.end()), "ok" if agrees(end, p.end()) else "DIFFERS", _mb(o.watch.peak_total),
                 _mb(p.peak(1)), _ratio(o.watch.peak_total, p.peak(1)), f"{o.seconds:.0f}"])
    return rows


HEADER = ["study", "unit", "kind", "kept, measured (MB)", "kept, plan (MB)", "ratio", "within 10 %",
          "largest while running, measured (MB)", "plan: keeps + running; total: peak(1) (MB)", "ratio", "seconds"]


def _study_note(o: Outcome, keep: str) -> str:
    """What one study ran (its command, the tokenizer folder elided), its time and memory, and the units whose
    stage 3 ran beside stage 2's files."""
    name = "A" if o.study == "lottery" else "B"
    items = " ".join(overrides(o.study, (Path("TOKENIZER"), Path("ENCODER")), keep))
    text = (f"Study {name}: `python -m lxmert {o.study} --config {STUDIES[o.study][0]} {items}`, {o.seconds:.0f} s, "
            f"peak memory of the study process and its {o.cfg.data.num_workers} DataLoader workers (data.num_workers "
            f"of the config) {o.watch.peak_pss / 2**30:.2f} GiB (PSS, sampled every 0.2 s)")
    for unit, size in o.watch.peak_marked.items():
        text += (f"; `{unit}` held up to {_mb(size)} MB while its stage 3 ran (stage 2's run and baked weights "
                 "stay until the unit ends)")
    return text


def notes(outcomes: list[Outcome], keep: str, threads: int, wall: float, loads: tuple[float, float],
          argv: list[str]) -> str:
    cmd = " ".join(["python -m bench.rehearsal", *argv]).strip()
    maxrss = max(o.maxrss_children for o in outcomes) / 2**30
    sizes = outcomes[0].plan.sizes
    return (f"Command: `{cmd}`; wall time {wall / 60:.1f} min in all (data writing and preparation included). "
            f"The real configs at base size ({sizes.params:,} parameters; {VOCAB:,} word pieces, {ANSWERS:,} "
            f"answers, {BOXES} x {FEAT_DIM}-d regions) on real-format data (LXMERT's question files and obj36 "
            f"TSV, raw VQA-CP v2 files, prepared by `python -m lxmert prepare`): 16 training questions per study, "
            f"one epoch of 2 steps per run, checkpoints.keep={keep}; ENCODER: random base-size LXMERT weights with "
            f"non-zero biases (`write_encoder`: with transformers' zero biases the question-only LXMERT cannot "
            f"train at base size, and the study refuses to start); LXMERT_WORKERS=1 (units one "
            f"after another, so the peak compares with plan's peak(1)) with OMP_NUM_THREADS={threads}. "
            f"{'. '.join(_study_note(o, keep) for o in outcomes)}. Largest resident set of any one process "
            f"(getrusage of the children): {maxrss:.2f} GiB. Kept = bytes of the files in the unit's folder when "
            f"the study is done (seed files: those of `seed_<s>/` outside unit folders, and `data.json`); largest "
            f"while running = the largest the folder was in any sample (every 0.2 s); plan = "
            f"`lxmert.studies.plan.plan()` of the same config and overrides (MB = 10^6 bytes). 'Within 10 %' "
            f"allows 1 MB where the plan counts nothing (JSON results, settings, summaries). The plan's running "
            f"figures and peak are upper bounds by design (two checkpoints, best and final weights at once); "
            f"`train.save_every_steps=1` makes each one-epoch run write one checkpoint (after step 1), as real "
            f"runs do at every epoch's end. Load average (1 min) at start {loads[0]:.2f}, at end {loads[1]:.2f}"
            f"{': the machine was shared with other jobs, so the times are pessimistic.' if max(loads) > 0.5 else '.'}")


def _table(rows: list[list]) -> str:
    return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows)


# -- main -----------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-dir", help="work in this folder (new or empty) and keep it, instead of a "
                                           "temporary folder removed at the end")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to docs/PERFORMANCE.md")
    parser.add_argument("--keep", default="minimal", choices=("minimal", "all"),
                        help="checkpoints.keep of both studies (default: the configs' own, minimal)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="OMP_NUM_THREADS of the one study process (default: the CPU cores)")
    parser.add_argument("--studies", default="lottery,debias", help="comma-separated: lottery (A), debias (B)")
    args = parser.parse_args()
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if not set(studies) <= set(STUDIES):
        parser.error(f"--studies: choose from {', '.join(STUDIES)}")
    root = Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="rehearsal-"))
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        parser.error(f"--keep-dir {root}: not empty")
    root = root.resolve()
    started, load_start = time.time(), os.getloadavg()[0]
    try:
        folders = write_data(root)
        outcomes = []
        for study in studies:
            outcomes.append(run_study(root, study, folders, args.keep, args.threads))
            print(_table(rows_of(outcomes[-1])), flush=True)  # kept in the log if a later study fails
    finally:
        if not args.keep_dir:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.time() - started
    rows = [r for o in outcomes for r in rows_of(o)]
    text = notes(outcomes, args.keep, args.threads, wall, (load_start, os.getloadavg()[0]), sys.argv[1:])
    title = f"Base-size rehearsal: disk per unit and peak RAM (checkpoints.keep={args.keep})"
    if args.no_append:
        print(_table([HEADER] + rows))
        print("\n" + text)
    else:
        append(title, HEADER, rows, text)


if __name__ == "__main__":
    main()
