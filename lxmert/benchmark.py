"""The embedded benchmark: a synthetic VQA dataset written in the real on-disk formats.

Scenes hold a few objects (shape, colour, size, position). Each object becomes a detector-like region:
a feature vector that mixes fixed random prototypes of its attributes with noise, and a normalised box.
Background regions fill every image up to the same number of boxes, like the 36-box detector output.

Questions are generated answer-first: the answer is drawn from the split's distribution for the
question type, then planted in the scene (and earlier questions of the image are checked to keep
their answers). The question text's parameters are drawn independently of the answer, so a model
that does not look at the image cannot do better than the question-type prior.

Two families of splits:
  IID: train, minival, test, all drawing answers from the same distribution, and pretrain (its own
  images) on which the embedded stand-in for a pretrained encoder is trained;
  changing priors: cp_train and cp_minival draw most answers of each question type from one half of
  its answers, cp_test from the other half (like VQA-CP v2).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .answers import AnswerVocab, soft_label
from .config import EmbeddedConfig
from .features import StoreWriter
from .io import atomic_folder, write_json

FORMAT_VERSION = 1
SHAPES = ["cube", "sphere", "cylinder", "cone", "torus", "pyramid"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SIZES = ["small", "large"]
PLURALS = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders", "cone": "cones", "torus": "tori",
           "pyramid": "pyramids"}
MAX_COUNT = 3
IID_SPLITS = {"train": "train_questions", "minival": "valid_questions", "test": "test_questions"}
CP_SPLITS = {"cp_train": "cp_train_questions", "cp_minival": "cp_valid_questions", "cp_test": "cp_test_questions"}
PRETRAIN_SPLIT = ("pretrain", "pretrain_questions")  # last, so that adding it left the other splits unchanged


class Scene:
    """Objects of one image as parallel integer/float arrays."""

    def __init__(self, rng: np.random.Generator, n: int):
        self.shape = rng.integers(0, len(SHAPES), n)
        self.color = rng.integers(0, len(COLORS), n)
        self.size = rng.integers(0, len(SIZES), n)
        self.cx = rng.uniform(0.12, 0.88, n)
        self.cy = rng.uniform(0.12, 0.88, n)

    def copy(self) -> "Scene":
        other = object.__new__(Scene)
        for k, v in vars(self).items():
            setattr(other, k, v.copy())
        return other

    def __len__(self) -> int:
        return len(self.shape)


def _others(rng: np.random.Generator, k: int, excluded: int) -> int:
    return int(rng.choice([i for i in range(k) if i != excluded]))


def _make_unique(scene: Scene, rng: np.random.Generator, keep: int, attr: str, value: int, k: int) -> None:
    """Change `attr` of every other object that shares `value` so that object `keep` is the only one."""
    arr = getattr(scene, attr)
    for j in np.flatnonzero(arr == value):
        if j != keep:
            arr[j] = _others(rng, k, value)


class Template:
    """One way of asking: question text, question/answer type, answer from a scene, and planting."""

    def __init__(self, qtype: str, atype: str, answers: list[str], text: Callable, answer: Callable,
                 plant: Callable):
        self.qtype, self.atype, self.answers = qtype, atype, answers
        self.text, self.answer, self.plant = text, answer, plant


def _unique(arr: np.ndarray, value: int) -> Optional[int]:
    hits = np.flatnonzero(arr == value)
    return int(hits[0]) if len(hits) == 1 else None


def _templates() -> list[Template]:
    S, C = len(SHAPES), len(COLORS)
    yes_no = ["yes", "no"]
    counts = [str(i) for i in range(MAX_COUNT + 1)]

    def there_answer(sc, p):
        return "yes" if np.any(sc.shape == p[0]) else "no"

    def there_plant(sc, ans, rng):
        s = int(rng.integers(S))
        if ans == "yes":
            sc.shape[int(rng.integers(len(sc)))] = s
        else:
            _make_unique(sc, rng, -1, "shape", s, S)
        return (s,)

    def left_answer(sc, p):
        i = _unique(sc.shape, p[0])
        return None if i is None else ("yes" if sc.cx[i] < 0.5 else "no")

    def left_plant(sc, ans, rng):
        i, s = int(rng.integers(len(sc))), int(rng.integers(S))
        sc.shape[i] = s
        _make_unique(sc, rng, i, "shape", s, S)
        sc.cx[i] = rng.uniform(0.12, 0.42) if ans == "yes" else rng.uniform(0.58, 0.88)
        return (s,)

    def color_answer(sc, p):
        i = _unique(sc.shape, p[0])
        return None if i is None else COLORS[sc.color[i]]

    def color_plant(sc, ans, rng):
        i, s = int(rng.integers(len(sc))), int(rng.integers(S))
        sc.shape[i], sc.color[i] = s, COLORS.index(ans)
        _make_unique(sc, rng, i, "shape", s, S)
        return (s,)

    def shape_answer(sc, p):
        i = _unique(sc.color, p[0])
        return None if i is None else SHAPES[sc.shape[i]]

    def shape_plant(sc, ans, rng):
        i, c = int(rng.integers(len(sc))), int(rng.integers(C))
        sc.color[i], sc.shape[i] = c, SHAPES.index(ans)
        _make_unique(sc, rng, i, "color", c, C)
        return (c,)

    def size_answer(sc, p):
        i = _unique(sc.shape, p[0])
        return None if i is None else SIZES[sc.size[i]]

    def size_plant(sc, ans, rng):
        i, s = int(rng.integers(len(sc))), int(rng.integers(S))
        sc.shape[i], sc.size[i] = s, SIZES.index(ans)
        _make_unique(sc, rng, i, "shape", s, S)
        return (s,)

    def large_answer(sc, p):
        i = _unique(sc.color, p[0])
        return None if i is None else ("yes" if sc.size[i] == 1 else "no")

    def large_plant(sc, ans, rng):
        i, c = int(rng.integers(len(sc))), int(rng.integers(C))
        sc.color[i], sc.size[i] = c, 1 if ans == "yes" else 0
        _make_unique(sc, rng, i, "color", c, C)
        return (c,)

    def count_plant(attr: str, k: int):
        def plant(sc, ans, rng):
            n, v = int(ans), int(rng.integers(k))
            if n > len(sc):
                return None
            arr = getattr(sc, attr)
            chosen = rng.choice(len(sc), n, replace=False)
            for j in range(len(sc)):
                if j in chosen:
                    arr[j] = v
                elif arr[j] == v:
                    arr[j] = _others(rng, k, v)
            return (v,)
        return plant

    return [
        Template("is there a", "yes/no", yes_no, lambda p: f"is there a {SHAPES[p[0]]}?",
                 there_answer, there_plant),
        Template("is the", "yes/no", yes_no, lambda p: f"is the {SHAPES[p[0]]} on the left side?",
                 left_answer, left_plant),
        Template("what color is the", "other", COLORS, lambda p: f"what color is the {SHAPES[p[0]]}?",
                 color_answer, color_plant),
        Template("what is the", "other", SHAPES, lambda p: f"what is the {COLORS[p[0]]} object?",
                 shape_answer, shape_plant),
        Template("what size is the", "other", SIZES, lambda p: f"what size is the {SHAPES[p[0]]}?",
                 size_answer, size_plant),
        Template("is the", "yes/no", yes_no, lambda p: f"is the {COLORS[p[0]]} object large?",
                 large_answer, large_plant),
        Template("how many", "number", counts, lambda p: f"how many {PLURALS[SHAPES[p[0]]]} are there?",
                 lambda sc, p: str(int(np.sum(sc.shape == p[0]))), count_plant("shape", S)),
    ]


TEMPLATES = _templates()
COUNT_PRIOR = np.array([0.2, 0.4, 0.25, 0.15])


def answer_distribution(t: Template, family: str, shifted: bool, skew: float, rng_seed: int) -> np.ndarray:
    """Answer probabilities of a template in a split.

    IID: uniform (counts follow a natural decreasing prior). Changing priors: the answers of the
    question type are split in two halves by a fixed seeded permutation; training splits put `skew` of
    the mass on the first half, the shifted test split on the second.
    """
    base = COUNT_PRIOR.copy() if t.atype == "number" else np.full(len(t.answers), 1.0 / len(t.answers))
    if family == "iid":
        return base
    key = int(hashlib.sha256(f"{rng_seed}:{t.qtype}".encode()).hexdigest()[:8], 16)
    order = np.random.default_rng(key).permutation(len(t.answers))
    first = np.zeros(len(t.answers), bool)
    first[order[: (len(t.answers) + 1) // 2]] = True
    if shifted:
        first = ~first
    weights = np.where(first, skew / first.sum(), (1 - skew) / (~first).sum()) * base / base.mean()
    return weights / weights.sum()


class Generator:
    """Writes every split, the answer vocabulary, the feature store and the tokenizer of a config."""

    def __init__(self, cfg: EmbeddedConfig):
        self.cfg = cfg
        proto_rng = np.random.default_rng([cfg.seed, 0])
        d = cfg.feat_dim
        self.p_shape = proto_rng.normal(0, 1, (len(SHAPES), d)).astype(np.float32)
        self.p_color = proto_rng.normal(0, 1, (len(COLORS), d)).astype(np.float32)
        self.p_size = proto_rng.normal(0, 1, (len(SIZES), d)).astype(np.float32)
        self.p_background = proto_rng.normal(0, 1, d).astype(np.float32)

    def regions(self, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Features [R, D] and normalised boxes [R, 4] of a scene, objects and background shuffled."""
        cfg = self.cfg
        n_bg = cfg.num_regions - len(scene)
        obj = self.p_shape[scene.shape] + self.p_color[scene.color] + self.p_size[scene.size]
        bg = np.tile(self.p_background, (n_bg, 1)) + rng.normal(0, 1, (n_bg, cfg.feat_dim))
        feats = np.concatenate([obj, bg]) + rng.normal(0, cfg.feature_noise, (cfg.num_regions, cfg.feat_dim))
        half = np.where(scene.size == 1, rng.uniform(0.09, 0.12, len(scene)), rng.uniform(0.04, 0.06, len(scene)))
        obj_boxes = np.stack([scene.cx - half, scene.cy - half, scene.cx + half, scene.cy + half], 1)
        lo = rng.uniform(0.0, 0.5, (n_bg, 2))
        hi = lo + rng.uniform(0.3, 0.5, (n_bg, 2))
        bg_boxes = np.concatenate([lo, np.minimum(hi, 1.0)], 1)
        boxes = np.clip(np.concatenate([obj_boxes, bg_boxes]), 0.0, 1.0)
        order = rng.permutation(cfg.num_regions)
        return feats[order].astype(np.float32), boxes[order].astype(np.float32)

    def annotate(self, truth: str, t: Template, rng: np.random.Generator) -> dict[str, float]:
        """Soft label from ten simulated annotators; a wrong one picks another answer of the type."""
        p = float(np.clip(rng.normal(self.cfg.annotator_accuracy, 0.05), 0.6, 1.0))
        given = [truth if rng.random() < p else t.answers[_others(rng, len(t.answers), t.answers.index(truth))]
                 for _ in range(10)]
        return soft_label(given)

    def split(self, name: str, n_questions: int, family: str, shifted: bool, split_index: int):
        """Questions of one split plus the scenes' regions, image by image."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, split_index])
        dists = [answer_distribution(t, family, shifted, cfg.cp_skew, cfg.seed) for t in TEMPLATES]
        questions, images = [], []
        img_index = 0
        while len(questions) < n_questions:
            img_id = f"SYN_{name}_{img_index:06d}"
            scene = Scene(rng, int(rng.integers(cfg.min_objects, cfg.max_objects + 1)))
            asked: list[tuple[Template, tuple, str]] = []
            for _ in range(min(cfg.questions_per_image, n_questions - len(questions))):
                for _attempt in range(20):
                    ti = int(rng.integers(len(TEMPLATES)))
                    t = TEMPLATES[ti]
                    ans = t.answers[int(rng.choice(len(t.answers), p=dists[ti]))]
                    trial = scene.copy()
                    params = t.plant(trial, ans, rng)
                    if params is None or t.answer(trial, params) != ans:
                        continue
                    if all(q.answer(trial, qp) == qa for q, qp, qa in asked):
                        scene = trial
                        asked.append((t, params, ans))
                        break
            for t, params, ans in asked:
                questions.append({
                    "answer_type": t.atype, "img_id": img_id, "label": self.annotate(ans, t, rng),
                    "question_id": split_index * 10_000_000 + len(questions),
                    "question_type": t.qtype, "sent": t.text(params),
                })
            images.append((img_id, *self.regions(scene, rng)))
            img_index += 1
        return questions, images

    def write(self, root: Path) -> None:
        cfg = self.cfg
        splits: dict[str, list] = {}
        all_images = []
        specs = [(n, getattr(cfg, a), "iid", False) for n, a in IID_SPLITS.items()]
        specs += [(n, getattr(cfg, a), "cp", n == "cp_test") for n, a in CP_SPLITS.items()]
        specs.append((PRETRAIN_SPLIT[0], getattr(cfg, PRETRAIN_SPLIT[1]), "iid", False))
        for i, (name, n, family, shifted) in enumerate(specs):
            splits[name], images = self.split(name, n, family, shifted, i + 1)
            all_images += images
        for name, questions in splits.items():
            write_json(root / f"{name}.json", questions, indent=None)
        AnswerVocab.build(q["label"] for name in ("train", "cp_train") for q in splits[name]).save(root)
        store = StoreWriter(root / "features", len(all_images), cfg.num_regions, cfg.feat_dim)
        for img_id, feats, boxes in all_images:
            store.add(img_id, feats, boxes)
        store.close()
        write_vocab_tokenizer(root / "tokenizer", (q["sent"] for qs in splits.values() for q in qs))


def write_vocab_tokenizer(folder: Path, sentences) -> None:
    """A word-level BERT vocabulary of the questions, saved as a transformers BertTokenizer."""
    from transformers import BertTokenizer

    words: set[str] = set()
    backend = BertTokenizer(vocab={"[PAD]": 0, "[UNK]": 1}).backend_tokenizer
    for s in sentences:
        words.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(s)))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(str(folder))


def _signature(cfg: EmbeddedConfig) -> dict:
    return {"format_version": FORMAT_VERSION, **asdict(cfg)}


def ensure_embedded(cfg: EmbeddedConfig, root: str | Path, log: Callable[[str], None] = print) -> Path:
    """Generate the benchmark into `root` unless it is already there with the same parameters.

    Written to a temporary folder and renamed, so an interrupted generation leaves nothing behind."""
    root = Path(root)
    meta_path = root / "meta.json"
    if meta_path.exists():
        try:
            if json.loads(meta_path.read_text()) == _signature(cfg):
                return root
        except json.JSONDecodeError:
            pass
        log(f"embedded benchmark in {root} was made with other parameters: regenerating")
    with atomic_folder(root, overwrite=True) as tmp:
        Generator(cfg).write(tmp)
        write_json(tmp / "meta.json", _signature(cfg))
    log(f"generated embedded benchmark in {root} (seed {cfg.seed})")
    return root
