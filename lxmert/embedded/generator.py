"""The embedded benchmark: a synthetic VQA dataset written in the real on-disk formats.

Scenes hold 3-6 objects (shape, colour, size, position). Each object becomes a detector-like region: a
feature vector built from fixed random prototypes of its attributes (similar colours and shapes have
similar prototypes) plus noise, and a normalised box; background regions fill every image up to the same
number of boxes, like the 36-box detector output. Some objects are partly hidden: their region keeps only
a small part of the object's signal, so what the image says about them is uncertain.

Questions are generated answer-first: the answer is drawn from the split's prior for the question type,
then planted in the scene (earlier questions of the image keep their answers). The question text is drawn
independently of the answer, so a model that does not look at the image cannot do better than the
question type's prior. Ten families in seven VQA-style question types: does the picture show a shape,
is an object (named by its shape) on the left side, is an object (named by its colour) large (yes/no);
counting by shape and by colour (0-5); colour of an object named by its shape and of the leftmost /
rightmost object, shape of an object named by its colour and of the leftmost / rightmost object, size of an
object named by its shape (other). A question is hard when its objects are hidden (about `hard_questions` of them).

Soft labels come from ten simulated annotators (soft score 0.3/0.6/0.9/1.0 for 1/2/3/4+ votes). An
annotator's accuracy depends on the question: high when its objects are visible, low when they are hidden,
with some spread between annotators. A correct annotator sometimes uses a synonym ("ball" for sphere); a
wrong one mostly names a near answer (a similar colour or shape, a count off by one, the neighbouring
size), sometimes another answer of the type, rarely something off-type: any of the benchmark's answers
outside the question's own (and their synonyms) or "not sure" / "unknown" / "nothing", drawn uniformly, so
that no single off-type answer takes a real share of a type's prior.

Splits, on disjoint images:
  pretrain                 captioned images with per-region shape / colour-size labels, for the stand-in
                           LXMERT pretraining (lxmert/embedded/pretrain.py); no study question is asked on them
  train, minival, test     study A: the natural (Zipf-like, seeded) answer prior of every question type
  cp_train, cp_minival,    study B, built like VQA-CP v2 (Agrawal et al. 2018): the (question type, answer)
  cp_test_iid, cp_test     groups of every type are assigned greedily to a training side and a test side,
                           and a group keeps `cp_skew` of its questions on its side and sends the rest to
                           the other, so the per-type answer distributions differ while every answer
                           still occurs in both (not a clean complement). cp_minival (model selection)
                           and cp_test_iid have the training side's priors, cp_test the test side's.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..core.config import Config, EmbeddedConfig
from ..core.errors import InputError
from ..core.files import atomic_folder, remove_temporaries, write_json
from ..core.locks import FileLock
from ..core.settings import setting_changes
from ..data.answers import AnswerVocab, soft_label
from ..data.features import StoreWriter
from ..data.tokenizer import write_vocab_tokenizer

FORMAT_VERSION = 4
SHAPES = ["cube", "sphere", "cylinder", "cone", "torus", "pyramid", "ring", "star"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "white", "black"]
SIZES = ["small", "medium", "large"]
MAX_COUNT = 5
COUNTS = [str(i) for i in range(MAX_COUNT + 1)]
YES_NO = ["yes", "no"]
PLURALS = {s: s + "s" for s in SHAPES} | {"torus": "tori"}
SIDES = ["leftmost", "rightmost"]
# Families of look-alike values: their feature prototypes share a component, and annotators confuse them.
COLOR_FAMILIES = [["red", "orange", "yellow"], ["green", "blue", "purple"], ["white", "black"]]
SHAPE_FAMILIES = [["cube", "cylinder", "pyramid"], ["sphere", "torus", "ring"], ["cone", "star"]]
SYNONYMS = {"sphere": "ball", "cube": "box", "large": "big", "small": "little", "torus": "donut"}
OFF_TYPE = ["not sure", "unknown", "nothing"]
# Every answer the benchmark's annotators can give: an off-type mistake is any of them outside the question's
# own answers (and their synonyms), so no single off-type answer gets a real share of any type's prior.
EVERY_ANSWER = [*SHAPES, *COLORS, *SIZES, *COUNTS, *YES_NO, *SYNONYMS.values(), *OFF_TYPE]
# Split name -> (EmbeddedConfig field with its size, the prior its answers are drawn from).
STUDY_SPLITS = {
    "train": ("train_questions", "natural"), "minival": ("valid_questions", "natural"),
    "test": ("test_questions", "natural"),
    "cp_train": ("cp_train_questions", "cp_train"), "cp_minival": ("cp_valid_questions", "cp_train"),
    "cp_test_iid": ("cp_test_iid_questions", "cp_train"), "cp_test": ("cp_test_questions", "cp_test"),
}
PRETRAIN_SPLIT = "pretrain"
# What a generator of this project writes into its folder (every format version; version 1 had no
# cp_test_iid). A folder holding anything else is never replaced (ensure_embedded).
OWN_ENTRIES = {"meta.json", "trainval_ans2label.json", "trainval_label2ans.json", "features", "tokenizer",
               *(f"{name}.json" for name in [*STUDY_SPLITS, PRETRAIN_SPLIT])}
OWN_FEATURE_FILES = {"features.npy", "boxes.npy", "img_ids.json", "meta.json"}
OWN_TOKENIZER_FILES = {"vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                       "added_tokens.json"}


class Scene:
    """Objects of one image as parallel arrays. x positions are kept at least MIN_GAP apart, so left/right
    relations and the leftmost / rightmost object are well defined. `visibility` scales an object's
    signal in its region feature (1: fully visible)."""

    MIN_GAP = 0.05

    def __init__(self, rng: np.random.Generator, n: int):
        self.shape = rng.integers(0, len(SHAPES), n)
        self.color = rng.integers(0, len(COLORS), n)
        self.size = rng.integers(0, len(SIZES), n)
        self.cx = _spread(rng, n, 0.08, 0.92, self.MIN_GAP)
        self.cy = rng.uniform(0.12, 0.88, n)
        self.visibility = np.ones(n)

    def copy(self) -> "Scene":
        other = object.__new__(Scene)
        for k, v in vars(self).items():
            setattr(other, k, v.copy())
        return other

    def __len__(self) -> int:
        return len(self.shape)


def _spread(rng: np.random.Generator, n: int, lo: float, hi: float, gap: float) -> np.ndarray:
    """n positions in [lo, hi], any two at least `gap` apart, in random order."""
    cuts = np.sort(rng.uniform(0, (hi - lo) - gap * (n - 1), n))
    return rng.permutation(lo + cuts + gap * np.arange(n))


def _other(rng: np.random.Generator, k: int, excluded: int) -> int:
    value = int(rng.integers(k - 1))
    return value + (value >= excluded)


def _unique(*conditions: np.ndarray) -> Optional[int]:
    hits = np.flatnonzero(np.logical_and.reduce(conditions))
    return int(hits[0]) if len(hits) == 1 else None


ATTRIBUTE_SIZES = {"shape": len(SHAPES), "color": len(COLORS), "size": len(SIZES)}


def _make_unique(scene: Scene, rng: np.random.Generator, keep: int, attrs: dict[str, int]) -> None:
    """Change the first of `attrs` on every other object matching all of them, so `keep` is the only one."""
    first = next(iter(attrs))
    match = np.logical_and.reduce([getattr(scene, a) == v for a, v in attrs.items()])
    for j in np.flatnonzero(match):
        if j != keep:
            getattr(scene, first)[j] = _other(rng, ATTRIBUTE_SIZES[first], attrs[first])


class Template:
    """One way of asking: question type, answer type, answers, text of the parameters, the answer in a
    scene, planting an answer (returns the parameters or None) and the objects the answer depends on."""

    def __init__(self, qtype: str, atype: str, answers: list[str], text: Callable, answer: Callable,
                 plant: Callable, focus: Callable):
        self.qtype, self.atype, self.answers = qtype, atype, answers
        self.text, self.answer, self.plant, self.focus = text, answer, plant, focus


def _pick(rng: np.random.Generator, k: int) -> int:
    return int(rng.integers(k))


def _yes_no_templates() -> list[Template]:
    S, C, Z = len(SHAPES), len(COLORS), len(SIZES)

    def shows_plant(sc, ans, rng):
        s = _pick(rng, S)
        if ans == "yes":
            sc.shape[_pick(rng, len(sc))] = s
        else:
            _make_unique(sc, rng, -1, {"shape": s})
        return (s,)

    def shows_focus(sc, p):
        return list(np.flatnonzero(sc.shape == p[0]))

    def left(sc, p):
        i = _unique(sc.shape == p[0])
        return None if i is None else ("yes" if sc.cx[i] < 0.5 else "no")

    def left_plant(sc, ans, rng):
        i, s = _pick(rng, len(sc)), _pick(rng, S)
        sc.shape[i] = s
        _make_unique(sc, rng, i, {"shape": s})
        sc.cx[i] = rng.uniform(0.12, 0.42) if ans == "yes" else rng.uniform(0.58, 0.88)
        return (s,)

    def large(sc, p):
        i = _unique(sc.color == p[0])
        return None if i is None else ("yes" if sc.size[i] == Z - 1 else "no")

    def large_plant(sc, ans, rng):
        i, c = _pick(rng, len(sc)), _pick(rng, C)
        sc.color[i] = c
        sc.size[i] = Z - 1 if ans == "yes" else _pick(rng, Z - 1)
        _make_unique(sc, rng, i, {"color": c})
        return (c,)

    return [
        # Shared with the stand-in pretraining (as LXMERT pretrained on VQA-style yes/no questions): a tiny
        # encoder does not learn existence within a study's fine-tune (docs/LEARNABILITY.md). Format 3 asked
        # about a colour-shape pair instead, which the fine-tuned BCE models answered at the accuracy of
        # always answering "no" (README).
        Template("does the picture", "yes/no", YES_NO, lambda p: f"does the picture show a {SHAPES[p[0]]}?",
                 lambda sc, p: "yes" if shows_focus(sc, p) else "no", shows_plant, shows_focus),
        Template("is the", "yes/no", YES_NO, lambda p: f"is the {SHAPES[p[0]]} on the left side?",
                 left, left_plant, lambda sc, p: [_unique(sc.shape == p[0])]),
        Template("is the", "yes/no", YES_NO, lambda p: f"is the {COLORS[p[0]]} object large?",
                 large, large_plant, lambda sc, p: [_unique(sc.color == p[0])]),
    ]


def _count_templates() -> list[Template]:
    S, C = len(SHAPES), len(COLORS)

    def count_plant(attr: str, k: int):
        def plant(sc, ans, rng):
            n, v = int(ans), _pick(rng, k)
            if n > len(sc):
                return None
            arr = getattr(sc, attr)
            chosen = set(rng.choice(len(sc), n, replace=False).tolist())
            for j in range(len(sc)):
                if j in chosen:
                    arr[j] = v
                elif arr[j] == v:
                    arr[j] = _other(rng, k, v)
            return (v,)
        return plant

    return [
        Template("how many", "number", COUNTS, lambda p: f"how many {PLURALS[SHAPES[p[0]]]} are there?",
                 lambda sc, p: str(int(np.sum(sc.shape == p[0]))), count_plant("shape", S),
                 lambda sc, p: list(np.flatnonzero(sc.shape == p[0]))),
        Template("how many", "number", COUNTS, lambda p: f"how many {COLORS[p[0]]} objects are there?",
                 lambda sc, p: str(int(np.sum(sc.color == p[0]))), count_plant("color", C),
                 lambda sc, p: list(np.flatnonzero(sc.color == p[0]))),
    ]


def _attribute_templates() -> list[Template]:
    def described(attr: str, names: list[str], by: str):
        """The `attr` of the one object with the given value of attribute `by`."""
        def answer(sc, p):
            i = _unique(getattr(sc, by) == p[0])
            return None if i is None else names[getattr(sc, attr)[i]]

        def plant(sc, ans, rng):
            i, v = _pick(rng, len(sc)), _pick(rng, ATTRIBUTE_SIZES[by])
            getattr(sc, by)[i] = v
            getattr(sc, attr)[i] = names.index(ans)
            _make_unique(sc, rng, i, {by: v})
            return (v,)
        return answer, plant, lambda sc, p: [_unique(getattr(sc, by) == p[0])]

    def extreme(attr: str, names: list[str]):
        """The `attr` of the leftmost (p[0] = 0) or rightmost object."""
        def index(sc, p):
            return int(np.argmin(sc.cx)) if p[0] == 0 else int(np.argmax(sc.cx))

        def plant(sc, ans, rng):
            side = _pick(rng, 2)
            getattr(sc, attr)[index(sc, (side,))] = names.index(ans)
            return (side,)
        return lambda sc, p: names[getattr(sc, attr)[index(sc, p)]], plant, lambda sc, p: [index(sc, p)]

    return [
        Template("what color is the", "other", COLORS, lambda p: f"what color is the {SHAPES[p[0]]}?",
                 *described("color", COLORS, "shape")),
        Template("what color is the", "other", COLORS, lambda p: f"what color is the {SIDES[p[0]]} object?",
                 *extreme("color", COLORS)),
        Template("what is the", "other", SHAPES, lambda p: f"what is the {COLORS[p[0]]} object?",
                 *described("shape", SHAPES, "color")),
        Template("what shape is the", "other", SHAPES, lambda p: f"what shape is the {SIDES[p[0]]} object?",
                 *extreme("shape", SHAPES)),
        Template("what size is the", "other", SIZES, lambda p: f"what size is the {SHAPES[p[0]]}?",
                 *described("size", SIZES, "shape")),
    ]


TEMPLATES = _yes_no_templates() + _count_templates() + _attribute_templates()


def _pretrain_templates() -> list[Template]:
    """Question families of the stand-in pretraining. LXMERT pretrained on image QA of other datasets and of
    VQA itself (its train split): here four study templates in the studies' own words (an object named by
    its shape or colour: its colour, shape or size; does the picture show a shape), plus one family of its
    own (how many things it shows), on its own images with uniform answers. The other six study templates
    (position, size of a coloured object, counts of a kind or colour, the leftmost / rightmost object) are
    only learnt in fine-tuning."""
    yes_no, _, attributes = _yes_no_templates(), _count_templates(), _attribute_templates()
    shared = [t for t in attributes if t.text((0,)) in ("what color is the cube?", "what is the red object?",
                                                          "what size is the cube?")]
    shared += [t for t in yes_no if t.qtype == "does the picture"]
    assert len(shared) == 4, "the shared templates are the study's single-attribute lookups and existence"

    total = [str(n) for n in range(1, 7)]
    return shared + [
        Template("how many things", "number", total, lambda p: "how many things are in the picture?",
                 lambda sc, p: str(len(sc)), lambda sc, ans, rng: () if int(ans) == len(sc) else None,
                 lambda sc, p: list(range(len(sc)))),
    ]


PRETRAIN_TEMPLATES = _pretrain_templates()
PRETRAIN_ANSWERS = sorted({a for t in PRETRAIN_TEMPLATES for a in t.answers})
QTYPES = sorted({t.qtype for t in TEMPLATES})
TYPE_ANSWERS = {q: next(t.answers for t in TEMPLATES if t.qtype == q) for q in QTYPES}
assert all(t.answers == TYPE_ANSWERS[t.qtype] for t in TEMPLATES), "a question type has one answer set"
# Counts have a natural order of frequency (VQA: 1 and 2 most often); other types get a seeded order.
COUNT_ORDER = ["1", "2", "0", "3", "4", "5"]


def _seeded(seed: int, *parts: object) -> np.random.Generator:
    key = int(hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).hexdigest()[:12], 16)
    return np.random.default_rng(key)


def _zipf(k: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, k + 1) ** exponent
    return w / w.sum()


def natural_prior(cfg: EmbeddedConfig, qtype: str) -> dict[str, float]:
    """A question type's natural answer prior: Zipf-like over a seeded order of its answers."""
    answers = TYPE_ANSWERS[qtype]
    order = COUNT_ORDER if answers == COUNTS else \
        [answers[i] for i in _seeded(cfg.seed, "order", qtype).permutation(len(answers))]
    return dict(zip(order, _zipf(len(order), cfg.prior_exponent)))


def test_side(cfg: EmbeddedConfig, qtype: str) -> list[str]:
    """The (type, answer) groups of a question type assigned to the test side: groups are visited in a
    seeded order and each joins the test side while the side's natural mass stays within cp_test_share
    (at least one group per side)."""
    return _test_sides(cfg)[qtype]


@functools.lru_cache(maxsize=8)
def _sides_cached(key: str) -> dict[str, list[str]]:
    return _assign_sides(EmbeddedConfig(**json.loads(key)))


def _test_sides(cfg: EmbeddedConfig) -> dict[str, list[str]]:
    return _sides_cached(json.dumps(asdict(cfg), sort_keys=True))


def _assign_sides(cfg: EmbeddedConfig) -> dict[str, list[str]]:
    """Test sides of every question type, types in sorted order. Like VQA-CP's coverage rule, an answer
    joins a type's test side only if some other type with the same answers (seen so far) keeps it on its
    training side, so the test's frequent answers are frequent training answers of another type."""
    sides: dict[str, list[str]] = {}
    for qtype in QTYPES:
        prior = natural_prior(cfg, qtype)
        answers = TYPE_ANSWERS[qtype]
        peers = [sides[q] for q in sides if TYPE_ANSWERS[q] == answers]
        order = [answers[i] for i in _seeded(cfg.seed, "cp", qtype).permutation(len(answers))]
        side, mass = [], 0.0
        for a in order:
            covered = not peers or any(a not in peer for peer in peers)
            if covered and mass + prior[a] <= cfg.cp_test_share + 1e-9 and len(side) < len(answers) - 1:
                side.append(a)
                mass += prior[a]
        if not side:  # no group fits the share: the type's rarest answer that a sibling type still trains on
            covered = [a for a in answers if not peers or any(a not in peer for peer in peers)]
            side = [min(covered or answers, key=lambda a: (prior[a], a))]
        sides[qtype] = side
    return sides


def split_priors(cfg: EmbeddedConfig, qtype: str) -> dict[str, dict[str, float]]:
    """Answer priors of one question type: 'natural' (study A), 'cp_train' and 'cp_test' (study B): a group
    puts cp_skew of its natural mass on its own side and the rest on the other side."""
    natural = natural_prior(cfg, qtype)
    tested = set(test_side(cfg, qtype))

    def side(on_test: bool) -> dict[str, float]:
        w = {a: p * (cfg.cp_skew if (a in tested) == on_test else 1 - cfg.cp_skew) for a, p in natural.items()}
        total = sum(w.values())
        return {a: v / total for a, v in w.items()}
    return {"natural": natural, "cp_train": side(False), "cp_test": side(True)}


def _near(answer: str) -> list[str]:
    """Answers an annotator confuses `answer` with: the same colour or shape family, a count off by one,
    the neighbouring size, the other of yes / no."""
    for family in COLOR_FAMILIES + SHAPE_FAMILIES:
        if answer in family:
            return [a for a in family if a != answer]
    for ordered in (COUNTS, SIZES):
        if answer in ordered:
            i = ordered.index(answer)
            return [ordered[j] for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
    return [a for a in YES_NO if a != answer]


class Generator:
    """Writes every split, the answer vocabulary, the feature store and the tokenizer of a config."""

    def __init__(self, cfg: EmbeddedConfig):
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        d = cfg.feat_dim
        self.p_shape = self._prototypes(rng, SHAPES, SHAPE_FAMILIES, d)
        self.p_color = self._prototypes(rng, COLORS, COLOR_FAMILIES, d)
        direction = rng.normal(0, 1, d)
        self.p_size = np.stack([(z - 1) * direction + 0.5 * rng.normal(0, 1, d) for z in range(len(SIZES))])
        self.p_background = rng.normal(0, 1, d)
        self.priors = {qt: split_priors(cfg, qt) for qt in QTYPES}

    @staticmethod
    def _prototypes(rng: np.random.Generator, names: list[str], families: list[list[str]], d: int) -> np.ndarray:
        """One vector per value; values of a family share a component, so they look alike."""
        family = {n: i for i, f in enumerate(families) for n in f}
        shared = rng.normal(0, 1, (len(families), d))
        own = rng.normal(0, 1, (len(names), d))
        return np.stack([0.6 * shared[family[n]] + 0.8 * own[i] for i, n in enumerate(names)])

    # -- images -------------------------------------------------------------------------------------
    def scene(self, rng: np.random.Generator, pretraining: bool = False) -> Scene:
        cfg = self.cfg
        fewest, most = (cfg.pretrain_min_objects, cfg.pretrain_max_objects) if pretraining else \
            (cfg.min_objects, cfg.max_objects)
        return Scene(rng, int(rng.integers(fewest, most + 1)))

    def hide(self, scene: Scene, objects: list[int], rng: np.random.Generator) -> None:
        v = self.cfg.hidden_visibility
        for i in objects:
            scene.visibility[i] = min(scene.visibility[i], rng.uniform(v / 2, v))

    def regions(self, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features [R, D], normalised boxes [R, 4] and the region -> object index (-1: background),
        objects and background in random order."""
        cfg = self.cfg
        n_bg = cfg.num_regions - len(scene)
        signal = self.p_shape[scene.shape] + self.p_color[scene.color] + self.p_size[scene.size]
        obj = scene.visibility[:, None] * signal
        bg = self.p_background + rng.normal(0, 1, (n_bg, cfg.feat_dim))
        feats = np.concatenate([obj, bg]) + rng.normal(0, cfg.feature_noise, (cfg.num_regions, cfg.feat_dim))
        half = np.array([0.035, 0.055, 0.08])[scene.size] * rng.uniform(0.85, 1.15, len(scene))
        obj_boxes = np.stack([scene.cx - half, scene.cy - half, scene.cx + half, scene.cy + half], 1)
        lo = rng.uniform(0.0, 0.5, (n_bg, 2))
        hi = lo + rng.uniform(0.3, 0.5, (n_bg, 2))
        bg_boxes = np.concatenate([lo, np.minimum(hi, 1.0)], 1)
        boxes = np.clip(np.concatenate([obj_boxes, bg_boxes]), 0.0, 1.0)
        order = rng.permutation(cfg.num_regions)
        owner = np.concatenate([np.arange(len(scene)), -np.ones(n_bg, int)])[order]
        return feats[order].astype(np.float32), boxes[order].astype(np.float32), owner

    # -- questions ----------------------------------------------------------------------------------
    def ask(self, scene: Scene, n: int, dists: list[np.ndarray], rng: np.random.Generator,
            templates: list[Template] = TEMPLATES) -> tuple[Scene, list[tuple[Template, tuple, str]]]:
        """Plant up to n questions in a scene, answer first: each slot draws a template and an answer from
        its prior and tries a few plantings; every planting keeps the answers of the questions before."""
        asked: list[tuple[Template, tuple, str]] = []
        for _ in range(n):
            for _draw in range(10):
                ti = _pick(rng, len(templates))
                t = templates[ti]
                ans = t.answers[int(rng.choice(len(t.answers), p=dists[ti]))]
                trial = self._plant(scene, t, ans, asked, rng)
                if trial is not None:
                    scene, params = trial
                    asked.append((t, params, ans))
                    break
        return scene, asked

    @staticmethod
    def _plant(scene: Scene, t: Template, ans: str, asked: list, rng: np.random.Generator):
        for _attempt in range(8):
            trial = scene.copy()
            params = t.plant(trial, ans, rng)
            if params is None or t.answer(trial, params) != ans:
                continue
            if all(q.answer(trial, qp) == qa for q, qp, qa in asked):
                return trial, params
        return None

    def annotate(self, truth: str, t: Template, visibility: float, rng: np.random.Generator) -> dict[str, float]:
        """Soft label of ten simulated annotators; their accuracy falls with the visibility of the question's
        objects."""
        cfg = self.cfg
        accuracy = cfg.hard_accuracy + (cfg.annotator_accuracy - cfg.hard_accuracy) * visibility
        given = []
        for _ in range(10):
            if rng.random() < np.clip(accuracy + rng.normal(0, 0.03), 0.0, 1.0):
                given.append(SYNONYMS[truth] if truth in SYNONYMS and rng.random() < 0.1 else truth)
            else:
                given.append(self._mistake(truth, t, rng))
        return soft_label(given)

    @staticmethod
    def _mistake(truth: str, t: Template, rng: np.random.Generator) -> str:
        roll = rng.random()
        if roll < 0.1:
            own = set(t.answers) | {SYNONYMS[a] for a in t.answers if a in SYNONYMS}
            off = [a for a in EVERY_ANSWER if a not in own]
            return off[_pick(rng, len(off))]
        if roll < 0.7:
            near = _near(truth)
            return near[_pick(rng, len(near))]
        return t.answers[_other(rng, len(t.answers), t.answers.index(truth))]

    def split(self, name: str, n_questions: int, prior: str, index: int):
        """Questions of one study split plus its images' regions."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, index])
        dists = [np.array([self.priors[t.qtype][prior][a] for a in t.answers]) for t in TEMPLATES]
        dists = [d / d.sum() for d in dists]
        questions, images = [], []
        img_index = 0
        while len(questions) < n_questions:
            img_id = f"SYN_{name}_{img_index:06d}"
            n = min(cfg.questions_per_image, n_questions - len(questions))
            scene, asked = self.ask(self.scene(rng), n, dists, rng)
            focus = [[int(i) for i in t.focus(scene, p) if i is not None] for t, p, _ in asked]
            for objects in focus:
                if objects and rng.random() < cfg.hard_questions:
                    self.hide(scene, objects, rng)
            for (t, params, ans), objects in zip(asked, focus):
                visibility = float(scene.visibility[objects].min()) if objects else 1.0
                questions.append({
                    "answer_type": t.atype, "img_id": img_id, "label": self.annotate(ans, t, visibility, rng),
                    "question_id": index * 10_000_000 + len(questions),
                    "question_type": t.qtype, "sent": t.text(params),
                })
            feats, boxes, _ = self.regions(scene, rng)
            images.append((img_id, feats, boxes))
            img_index += 1
        return questions, images

    def pretrain_split(self, n_images: int, index: int):
        """Images for the stand-in pretraining: a caption listing the objects from left to right (e.g.
        "small red cube , large blue ring , medium green star"), questions of the pretraining families
        (uniform answers, planted like the studies') and per-region labels: obj = shape + 1, attr =
        colour * 3 + size + 1 (0 = background). Objects are hidden about as often as in the studies."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, index])
        dists = [np.full(len(t.answers), 1.0 / len(t.answers)) for t in PRETRAIN_TEMPLATES]
        records, images = [], []
        for i in range(n_images):
            img_id = f"SYN_{PRETRAIN_SPLIT}_{i:06d}"
            scene, asked = self.ask(self.scene(rng, pretraining=True), cfg.pretrain_questions_per_image,
                                    dists, rng, PRETRAIN_TEMPLATES)
            hidden = np.flatnonzero(rng.random(len(scene)) < cfg.hard_questions / cfg.questions_per_image)
            self.hide(scene, list(hidden), rng)
            feats, boxes, owner = self.regions(scene, rng)
            caption = " , ".join(f"{SIZES[scene.size[j]]} {COLORS[scene.color[j]]} {SHAPES[scene.shape[j]]}"
                                 for j in np.argsort(scene.cx))
            obj = [0 if o < 0 else int(scene.shape[o]) + 1 for o in owner]
            attr = [0 if o < 0 else int(scene.color[o]) * len(SIZES) + int(scene.size[o]) + 1 for o in owner]
            records.append({"img_id": img_id, "caption": caption, "obj": obj, "attr": attr,
                            "questions": [{"sent": t.text(p), "answer": a} for t, p, a in asked]})
            images.append((img_id, feats, boxes))
        return records, images

    def write(self, root: Path) -> None:
        cfg = self.cfg
        splits: dict[str, list] = {}
        all_images = []
        for i, (name, (size_field, prior)) in enumerate(STUDY_SPLITS.items()):
            splits[name], images = self.split(name, getattr(cfg, size_field), prior, i + 1)
            all_images += images
        pretrain, images = self.pretrain_split(cfg.pretrain_images, len(STUDY_SPLITS) + 1)
        all_images += images
        for name, questions in splits.items():
            write_json(root / f"{name}.json", questions, indent=None)
        write_json(root / f"{PRETRAIN_SPLIT}.json", pretrain, indent=None)
        AnswerVocab.build(q["label"] for name in ("train", "cp_train") for q in splits[name]).save(root)
        store = StoreWriter(root / "features", len(all_images), cfg.num_regions, cfg.feat_dim)
        for img_id, feats, boxes in all_images:
            store.add(img_id, feats, boxes)
        store.close()
        sentences = [q["sent"] for qs in splits.values() for q in qs] + [r["caption"] for r in pretrain]
        sentences += [q["sent"] for r in pretrain for q in r["questions"]]
        write_vocab_tokenizer(root / "tokenizer", sentences)


PRETRAIN_OBJECTS = len(SHAPES) + 1               # obj labels of pretrain.json (0 = background)
PRETRAIN_ATTRIBUTES = len(COLORS) * len(SIZES) + 1  # attr labels (0 = background)


# -- the folder: generate once, reuse, never delete what is not the generator's own ---------------------

def signature(cfg: EmbeddedConfig) -> dict:
    """What meta.json records: the format version and every generator parameter."""
    return {"format_version": FORMAT_VERSION, **asdict(cfg)}


def ensure_embedded(cfg: EmbeddedConfig, root: str | Path, log: Callable[[str], None] = print) -> Path:
    """Generate the benchmark into `root` unless it is already there with the same parameters.

    A folder holding this format's benchmark with other parameters is refused (a variant goes to its own
    data.root), and so is a folder holding anything the generator did not write. Only an empty folder, or
    one holding nothing but a generator's own files of an older format, is (re)generated. Written to a
    temporary folder and renamed, so an interrupted generation leaves the old folder as it was."""
    root = Path(root)
    if root.exists():
        recorded = _recorded(root)
        if recorded == signature(cfg):
            return root
        _refuse_unless_own(root, recorded, cfg)
        if recorded:
            log(f"{root} holds the embedded benchmark of an older generator (format "
                f"{recorded.get('format_version')}): regenerating it")
    with atomic_folder(root, overwrite=True) as tmp:
        Generator(cfg).write(tmp)
        write_json(tmp / "meta.json", signature(cfg))
    log(f"generated embedded benchmark in {root} (seed {cfg.seed})")
    return root


def _keys(signature: dict) -> dict:
    """A generator signature as config keys (data.embedded.<name>)."""
    return {f"data.embedded.{k}": v for k, v in signature.items()}


def prepare_embedded(cfg: Config, log: Callable[[str], None] = print) -> Path:
    """Generate the embedded benchmark of the config if needed. Under a lock next to its folder, so
    processes started together generate it once; only the lock holder removes an interrupted
    generation's temporaries."""
    root = Path(cfg.data.root)
    if root.exists() and not root.is_dir():  # checked before the lock, which is created beside the folder
        raise InputError(f"data.root {root} is not a folder; set data.root to a new folder for the embedded "
                         "benchmark")
    with FileLock(root.parent / f".{root.name}.lock"):
        for path in remove_temporaries(root.parent, of=root.name):
            log(f"removed {path}, left by an interrupted generation")
        return ensure_embedded(cfg.data.embedded, root, log)


def _recorded(root: Path) -> dict:
    """The parameters in root/meta.json, or {} when there is none or it is not one of ours."""
    try:
        data = json.loads((root / "meta.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) and "format_version" in data else {}


def foreign_entries(root: Path) -> list[str]:
    """Paths under `root` (relative) that a generator of this project does not write."""
    out = []
    for entry in sorted(root.iterdir()):
        if entry.name not in OWN_ENTRIES or entry.is_dir() != (entry.name in ("features", "tokenizer")):
            out.append(entry.name)
        elif entry.is_dir():
            own = OWN_FEATURE_FILES if entry.name == "features" else OWN_TOKENIZER_FILES
            out += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir()) if p.name not in own or p.is_dir()]
    return out


def _refuse_unless_own(root: Path, recorded: dict, cfg: EmbeddedConfig) -> None:
    """Stop (one InputError naming the folder, what differs and the fix) unless `root` is empty or holds
    only an older generator's own files."""
    if not root.is_dir():
        raise InputError(f"data.root {root} is not a folder; set data.root to a new folder for the embedded "
                         "benchmark")
    if recorded.get("format_version") == FORMAT_VERSION:
        changed = setting_changes(_keys(recorded), _keys(signature(cfg)), shown=3)
        raise InputError(f"{root} holds the embedded benchmark made with other parameters ({changed}); it is left "
                         "as it is: generate the variant into its own folder, e.g. "
                         f"data.root={root.parent / (root.name + '_variant')}")
    foreign = foreign_entries(root)
    if foreign or (not recorded and any(root.iterdir())):
        what = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "") if foreign else "no meta.json"
        raise InputError(f"{root} holds files the embedded benchmark generator did not write ({what}); nothing "
                         f"is deleted: remove them yourself or set data.root to a new folder")
