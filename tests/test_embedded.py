"""The embedded benchmark: deterministic files, VQA-like labels, IID vs changing-priors splits."""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from lxmert.core.config import EmbeddedConfig
from lxmert.data.features import FeatureStore
from lxmert.data.tokenizer import load_tokenizer
from lxmert.embedded import generator
from lxmert.embedded.generator import ensure_embedded

SMALL = dict(train_questions=60, valid_questions=20, test_questions=20, cp_train_questions=30,
             cp_valid_questions=20, cp_test_iid_questions=20, cp_test_questions=20, pretrain_images=20,
             num_regions=6, feat_dim=8, max_objects=4)
SPLITS = ["train", "minival", "test", "cp_train", "cp_minival", "cp_test_iid", "cp_test"]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _questions(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text())


def _answer_counts(questions: list[dict]) -> dict[str, Counter]:
    """Per question type, how often each answer is the question's top-scoring answer."""
    out: dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        out[q["question_type"]][max(q["label"], key=q["label"].get)] += 1
    return out


def _tvd(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = ensure_embedded(EmbeddedConfig(seed=7, **SMALL), tmp_path / "a", log=lambda _: None)
    second = ensure_embedded(EmbeddedConfig(seed=7, **SMALL), tmp_path / "b", log=lambda _: None)
    h1, h2 = _hashes(first), _hashes(second)
    assert {"features/features.npy", "features/boxes.npy", "train.json", "cp_test.json", "meta.json",
            "trainval_ans2label.json", "tokenizer/vocab.txt"} <= set(h1)
    assert h1 == h2
    other = ensure_embedded(EmbeddedConfig(seed=8, **SMALL), tmp_path / "c", log=lambda _: None)
    h3 = _hashes(other)
    assert h3["features/features.npy"] != h1["features/features.npy"]
    assert h3["train.json"] != h1["train.json"]


def test_split_sizes_and_unique_ids(embedded_root):
    sizes = {s: len(_questions(embedded_root, s)) for s in SPLITS}
    assert sizes == {"train": 400, "minival": 150, "test": 150, "cp_train": 150, "cp_minival": 150,
                     "cp_test_iid": 150, "cp_test": 150}
    ids = [q["question_id"] for s in SPLITS for q in _questions(embedded_root, s)]
    assert len(ids) == len(set(ids))
    store = FeatureStore(embedded_root / "features")
    assert all(q["img_id"] in store for s in SPLITS for q in _questions(embedded_root, s))
    assert (store.num_boxes, store.feat_dim) == (8, 16)


def test_soft_labels_question_and_answer_types(embedded_root):
    questions = [q for s in SPLITS for q in _questions(embedded_root, s)]
    scores = Counter(v for q in questions for v in q["label"].values())
    assert set(scores) <= {0.3, 0.6, 0.9, 1.0} and {0.3, 1.0} <= set(scores)
    assert all(q["label"] and max(q["label"].values()) >= 0.6 for q in questions)
    assert {q["answer_type"] for q in questions} == {"yes/no", "number", "other"}
    assert len({q["question_type"] for q in questions}) >= 5
    assert all(set(q) == {"answer_type", "img_id", "label", "question_id", "question_type", "sent"}
               for q in questions)


def test_answer_vocab_covers_every_training_answer(embedded_root):
    ans2label = json.loads((embedded_root / "trainval_ans2label.json").read_text())
    label2ans = json.loads((embedded_root / "trainval_label2ans.json").read_text())
    assert sorted(ans2label.values()) == list(range(len(ans2label)))
    assert all(label2ans[i] == a for a, i in ans2label.items())
    train_answers = {a for s in ("train", "cp_train") for q in _questions(embedded_root, s) for a in q["label"]}
    assert train_answers == set(ans2label)


def test_iid_splits_share_priors_and_cp_test_shifts_them(embedded_root):
    train = _answer_counts(_questions(embedded_root, "train"))
    held_out = _answer_counts(_questions(embedded_root, "minival") + _questions(embedded_root, "test"))
    assert max(_tvd(train[t], held_out[t]) for t in train) < 0.35
    cp_train = _answer_counts(_questions(embedded_root, "cp_train"))
    cp_iid = _answer_counts(_questions(embedded_root, "cp_minival") + _questions(embedded_root, "cp_test_iid"))
    cp_test = _answer_counts(_questions(embedded_root, "cp_test"))
    shifted = [_tvd(cp_train[t], cp_test[t]) for t in cp_train]
    assert min(shifted) > 0.15 and np.mean(shifted) > 0.3, shifted
    assert np.mean([_tvd(cp_train[t], cp_iid[t]) for t in cp_train]) < np.mean(shifted) / 2


def test_changing_priors_regroup_answers_as_vqa_cp():
    """VQA-CP v2 (Agrawal et al. 2018) regroups each question type's (type, answer) groups into a train and a
    test side: the sides split the type's natural mass (test side about cp_test_share), most answers occur on
    both sides at different frequencies (no clean swap), and an answer frequent at test under one type is a
    training answer of another type with the same answers (so a model cannot win by avoiding it)."""
    cfg = EmbeddedConfig()
    many = [q for q in generator.QTYPES if len(generator.TYPE_ANSWERS[q]) > 2]
    assert len(many) >= 4 and len(many) > len(generator.QTYPES) / 2
    for qtype in generator.QTYPES:
        priors = generator.split_priors(cfg, qtype)
        side = set(generator.test_side(cfg, qtype))
        answers = generator.TYPE_ANSWERS[qtype]
        assert 0 < len(side) < len(answers)
        natural_mass = sum(priors["natural"][a] for a in side)
        assert natural_mass <= cfg.cp_test_share + 1e-9 or len(side) == 1
        for split in ("cp_train", "cp_test"):
            assert sum(priors[split].values()) == pytest.approx(1.0)
            assert all(priors[split][a] > 0 for a in answers), "every answer occurs on both sides"
        assert sum(priors["cp_test"][a] for a in side) > sum(priors["cp_train"][a] for a in side) + 0.3
    by_answers = defaultdict(list)
    for qtype in generator.QTYPES:
        by_answers[tuple(generator.TYPE_ANSWERS[qtype])].append(set(generator.test_side(cfg, qtype)))
    for sides in by_answers.values():
        if len(sides) > 1:
            assert not set.intersection(*sides), "a test answer stays a training answer of a sibling type"


def test_pretraining_images_and_questions_are_their_own(embedded_root):
    """The stand-in pretraining has its own images (no study question is asked about them); it shares the
    wording of only the three single-attribute lookups and of existence with the studies (LXMERT too
    pretrained on VQA-style QA), so the other six study templates are learnt in fine-tuning alone."""
    pretrain = json.loads((embedded_root / "pretrain.json").read_text())
    study_images = {q["img_id"] for s in SPLITS for q in _questions(embedded_root, s)}
    assert pretrain and not {r["img_id"] for r in pretrain} & study_images
    shared = generator.PRETRAIN_TEMPLATES[:4]
    studied_texts = {t.text((0,)) for t in generator.TEMPLATES}
    assert {t.text((0,)) for t in shared} <= studied_texts
    assert not {t.text((0,)) for t in generator.PRETRAIN_TEMPLATES[4:]} & studied_texts
    shared_texts = set()
    for t in shared:
        for i in range(max(len(generator.SHAPES), len(generator.COLORS))):
            try:
                shared_texts.add(t.text((i,)))
            except IndexError:
                pass
    asked = {q["sent"] for r in pretrain for q in r["questions"]}
    studied = {q["sent"] for s in SPLITS for q in _questions(embedded_root, s)}
    assert asked & studied and asked & studied <= shared_texts
    own = [q for s in SPLITS for q in _questions(embedded_root, s) if q["sent"] not in shared_texts]
    assert len(own) > 0.5 * sum(len(_questions(embedded_root, s)) for s in SPLITS)
    assert all(set(r) == {"img_id", "caption", "obj", "attr", "questions"} for r in pretrain)


def test_boxes_are_normalised(embedded_root):
    boxes = np.load(embedded_root / "features" / "boxes.npy")
    assert boxes.shape == (len(FeatureStore(embedded_root / "features")), 8, 4)
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert np.all(boxes[..., 2] > boxes[..., 0]) and np.all(boxes[..., 3] > boxes[..., 1])


def test_tokenizer_vocabulary_and_no_unknown_words(embedded_root):
    tok = load_tokenizer(tiny_config(embedded_root))
    lines = (embedded_root / "tokenizer" / "vocab.txt").read_text().splitlines()
    assert len(tok) == len(lines) > 20
    sentences = [q["sent"] for s in SPLITS for q in _questions(embedded_root, s)]
    ids = tok(sentences)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert tok.convert_ids_to_tokens(ids[0])[0] == "[CLS]" and "?" in tok.tokenize(sentences[0])


def test_existing_benchmark_is_reused_and_a_variant_is_refused(tmp_path):
    """The same parameters reuse the folder; other parameters never overwrite it (it may hold what other
    experiments were computed on, or files that are not the generator's): one error naming the variant
    folder to use instead. An empty folder is generated into."""
    from lxmert.core.errors import InputError

    messages: list[str] = []
    root = ensure_embedded(EmbeddedConfig(**SMALL), tmp_path / "e", log=messages.append)
    stamp = (root / "features" / "features.npy").stat().st_mtime_ns
    ensure_embedded(EmbeddedConfig(**SMALL), root, log=messages.append)
    assert (root / "features" / "features.npy").stat().st_mtime_ns == stamp and len(messages) == 1
    before = _hashes(root)
    with pytest.raises(InputError, match=r"data.embedded.seed 1234 -> 99.*data.root="):
        ensure_embedded(EmbeddedConfig(seed=99, **SMALL), root, log=messages.append)
    assert _hashes(root) == before
    foreign = tmp_path / "mine"
    (foreign / "pretrained").mkdir(parents=True)
    (foreign / "pretrained" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="did not write .pretrained.; nothing is deleted"):
        ensure_embedded(EmbeddedConfig(**SMALL), foreign, log=messages.append)
    assert (foreign / "pretrained" / "config.json").read_text() == "{}"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_embedded(EmbeddedConfig(**SMALL), empty, log=messages.append) / "train.json").exists()


def test_interrupted_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    original = generator.Generator.write

    def write_then_fail(self, root):
        original(self, root)
        assert (root / "features" / "features.npy").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(generator.Generator, "write", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded(EmbeddedConfig(**SMALL), tmp_path / "e", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_regeneration_keeps_the_old_benchmark(tmp_path, monkeypatch):
    """Regenerating an older generator's benchmark (the only case that replaces a folder) is all or nothing."""
    root = ensure_embedded(EmbeddedConfig(**SMALL), tmp_path / "e", log=lambda _: None)
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "format_version": meta["format_version"] - 1}))
    before = _hashes(root)

    def fail(self, folder):
        (folder / "train.json").write_text("[")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(generator.Generator, "write", fail)
    with pytest.raises(RuntimeError):
        ensure_embedded(EmbeddedConfig(**SMALL), root, log=lambda _: None)
    assert _hashes(root) == before and [p.name for p in tmp_path.iterdir()] == ["e"]


def _best_threshold_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the best rule 'x >= t' or 'x < t' (one threshold fitted on the same questions)."""
    return max(max(float(((x >= t) == y).mean()), float(((x < t) == y).mean())) for t in np.unique(x))


def test_yes_no_answers_are_in_the_region_features(tmp_path):
    """The yes/no questions can be answered from the inputs: one threshold on a projection of the regions
    onto the generator's own prototypes beats the majority answer by a wide margin for every template (the
    README cites this when it says the tiny encoder's fine-tune leaves them at their prior)."""
    cfg = EmbeddedConfig(train_questions=900, valid_questions=30, test_questions=30, cp_train_questions=30,
                         cp_valid_questions=30, cp_test_iid_questions=30, cp_test_questions=30, pretrain_images=30)
    root = ensure_embedded(cfg, tmp_path / "embedded", log=lambda _: None)
    gen = generator.Generator(cfg)
    store = FeatureStore(root / "features")
    unit = {name: p / np.linalg.norm(p) for name, p in (*zip(generator.SHAPES, gen.p_shape),
                                                         *zip(generator.COLORS, gen.p_color))}
    cues = defaultdict(list)
    for q in _questions(root, "train"):
        answer = max(q["label"], key=q["label"].get)
        if answer not in ("yes", "no"):
            continue
        words, (f, b) = q["sent"].rstrip("?").split(), store.get(store.row(q["img_id"]))
        if q["sent"].startswith("does the picture show a"):  # the region most like the shape
            cues["shows"].append((float((f @ unit[words[5]]).max()), answer == "yes"))
        elif "left side" in q["sent"]:  # x-centre of the region most like the shape
            r = int(np.argmax(f @ unit[words[2]]))
            cues["left"].append((-(b[r, 0] + b[r, 2]) / 2, answer == "yes"))
        else:  # "is the <colour> object large?": width of the region most like the colour
            r = int(np.argmax(f @ unit[words[2]]))
            cues["large"].append((b[r, 2] - b[r, 0], answer == "yes"))
    assert set(cues) == {"shows", "left", "large"}
    for name, pairs in cues.items():
        x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        majority = max(y.mean(), 1 - y.mean())
        assert len(pairs) > 50 and _best_threshold_accuracy(x, y) > majority + 0.15, name


def test_off_type_mistakes_are_a_thin_long_tail():
    """An annotator's off-type mistake is any answer outside the question's own (and their synonyms), drawn
    uniformly: concentrated on three strings, each of them took a prior of about 0.02 in every question
    type (a mid-frequency answer of every type, which LMH's learned mixin then ranked above the real
    answers at test time)."""
    rng = np.random.default_rng(0)
    for t in generator.TEMPLATES:
        own = set(t.answers) | {generator.SYNONYMS[a] for a in t.answers if a in generator.SYNONYMS}
        truth = t.answers[0]
        given = Counter(generator.Generator._mistake(truth, t, rng) for _ in range(20_000))
        off = {a: n for a, n in given.items() if a not in own}
        assert set(off) == set(generator.EVERY_ANSWER) - own, t.qtype  # every other answer, nothing else
        assert 0.08 < sum(off.values()) / 20_000 < 0.12, t.qtype  # a tenth of the mistakes
        assert max(off.values()) / 20_000 < 0.01, (t.qtype, off)  # none of them more than 1 % of mistakes
