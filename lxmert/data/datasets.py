"""Questions + feature store -> batches.

A split is loaded once: questions are validated, tokenized in one call, their labels turned into
sparse (CSR) soft-score arrays and their images resolved to feature-store rows. A batch is built
in one go from a list of indices (rows read in store order, no per-sample collate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core.config import Config
from ..core.errors import InputError
from ..core.files import read_json
from .answers import AnswerVocab
from .features import FeatureStore
from .tokenizer import load_tokenizer, tokenizer_source

REQUIRED = ("img_id", "sent", "question_id")


@dataclass
class Split:
    """One question file, tokenized and resolved; labels as CSR arrays over the answer vocabulary."""

    name: str
    question_ids: list  # as in the file (integers in VQA; written back as they were)
    question_types: list[str]
    answer_types: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    rows: np.ndarray
    label_ptr: np.ndarray
    label_idx: np.ndarray
    label_score: np.ndarray
    has_labels: bool
    out_of_vocab: int

    def __len__(self) -> int:
        return len(self.question_ids)

    def dense_targets(self, index: np.ndarray, num_answers: int) -> np.ndarray:
        target = np.zeros((len(index), num_answers), np.float32)
        for k, i in enumerate(index):
            a, b = self.label_ptr[i], self.label_ptr[i + 1]
            target[k, self.label_idx[a:b]] = self.label_score[a:b]
        return target


def _validate(questions, path: Path) -> None:
    """Every question of a file, field by field: the first bad one is one error naming it."""
    if not isinstance(questions, list):
        raise InputError(f"{path}: expected a JSON list of questions")
    if not questions:
        raise InputError(f"{path}: the split is empty")
    seen: set = set()
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            raise InputError(f"{path}: question #{i} is not an object")
        for key in REQUIRED:
            if key not in q:
                raise InputError(f"{path}: question #{i} has no field '{key}'")
        where = f"{path}: question #{i}"
        if not isinstance(q["sent"], str):
            raise InputError(f"{where} field 'sent' must be a string, got {q['sent']!r:.60}")
        if not isinstance(q["img_id"], str) or not q["img_id"]:
            raise InputError(f"{where} field 'img_id' must be a non-empty string, got {q['img_id']!r:.60}")
        qid = q["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise InputError(f"{where} field 'question_id' must be an integer or a string, got {qid!r:.60}")
        if qid in seen:
            raise InputError(f"{where} repeats question_id {qid}")
        seen.add(qid)
        for key in ("question_type", "answer_type"):
            if key in q and not isinstance(q[key], str):
                raise InputError(f"{where} field '{key}' must be a string, got {q[key]!r:.60}")
        if "label" in q:
            _validate_label(q["label"], where)
    labelled = ["label" in q for q in questions]
    if any(labelled) and not all(labelled):
        i = labelled.index(False) if labelled[0] else labelled.index(True)
        raise InputError(f"{path}: question #{i} (question_id {questions[i]['question_id']}) "
                         f"{'has no' if labelled[0] else 'has a'} field 'label' unlike question #0: a split is "
                         "labelled for every question (train, valid, a scored test) or for none (a test server split)")


def _validate_label(label, where: str) -> None:
    """A label is {answer: soft score in [0, 1]}; NaN, out-of-range or non-numeric scores are refused."""
    if not isinstance(label, dict):
        raise InputError(f"{where} field 'label' must be an object answer -> score")
    for answer, score in label.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0.0 <= score <= 1.0:
            raise InputError(f"{where} label of answer {answer!r} has score {score!r}; scores are numbers in [0, 1]")


def load_split(path: Path, tokenizer, vocab: AnswerVocab, store: FeatureStore, max_len: int,
               special_tokens: bool = True) -> Split:
    if not path.exists():
        raise InputError(f"question file not found: {path} (a split is a <name>.json of data.root, written by "
                         "python -m lxmert prepare vqa, or prepare carve for a held-out part such as "
                         "nominival_heldout: data/README.md, Commands)")
    questions = read_json(path, "question file")
    _validate(questions, path)
    for i, q in enumerate(questions):
        if q["img_id"] not in store:
            raise InputError(f"{path}: question #{i} (question_id {q['question_id']}) has img_id "
                             f"'{q['img_id']}', which is not in the feature store {store.folder}")
    enc = tokenizer([q["sent"] for q in questions], padding="max_length", truncation=True,
                    max_length=max_len, return_tensors="np", add_special_tokens=special_tokens)
    ptr, idx, score, oov = [0], [], [], 0
    for q in questions:
        label = q.get("label") or {}
        known = [(vocab.ans2label[a], s) for a, s in label.items() if a in vocab.ans2label]
        oov += bool(label) and not known
        idx += [k for k, _ in known]
        score += [s for _, s in known]
        ptr.append(len(idx))
    return Split(
        name=path.stem, question_ids=[q["question_id"] for q in questions],
        question_types=[q.get("question_type", "unknown") for q in questions],
        answer_types=[q.get("answer_type", "unknown") for q in questions],
        input_ids=enc["input_ids"].astype(np.int64), attention_mask=enc["attention_mask"].astype(np.int64),
        rows=np.array([store.row(q["img_id"]) for q in questions], np.int64),
        label_ptr=np.array(ptr, np.int64), label_idx=np.array(idx, np.int64),
        label_score=np.array(score, np.float32), has_labels=all("label" in q for q in questions),
        out_of_vocab=int(oov))


class VQADataset(torch.utils.data.Dataset):
    """Indexing with a list of question positions returns a whole batch as tensors."""

    def __init__(self, split: Split, store: FeatureStore, num_answers: int, qtype_index: dict[str, int],
                 mask_padding: bool = True):
        self.split, self.store, self.num_answers = split, store, num_answers
        self.mask_padding = mask_padding  # false: every position attended, padding included (Si et al.)
        unknown = len(qtype_index)
        self.qtypes = np.array([qtype_index.get(t, unknown) for t in split.question_types], np.int64)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: list[int]) -> dict[str, torch.Tensor]:
        return self.batch(index)

    def batch(self, index: list[int], targets: bool = True) -> dict[str, torch.Tensor]:
        """The model's inputs for these questions, plus (for training) dense targets, question types
        and the indices; prediction asks for the inputs only."""
        index = np.asarray(index)
        sp = self.split
        rows = sp.rows[index]
        feats = np.empty((len(index), self.store.num_boxes, self.store.feat_dim), np.float32)
        boxes = np.empty((len(index), self.store.num_boxes, 4), np.float32)
        # Rows read in store order (sequential on disk), each copied once straight into its slot: a
        # fancy-index gather would build a temporary and copy twice.
        for j in np.argsort(rows, kind="stable"):
            feats[j] = self.store._features[rows[j]]
            boxes[j] = self.store._boxes[rows[j]]
        mask = sp.attention_mask[index]
        length = max(int(mask.sum(1).max()), 1) if self.mask_padding else mask.shape[1]
        if not self.mask_padding:
            mask = np.ones_like(mask)
        out = {"input_ids": torch.from_numpy(sp.input_ids[index, :length]),
               "attention_mask": torch.from_numpy(mask[:, :length]),
               "visual_feats": torch.from_numpy(feats), "visual_pos": torch.from_numpy(boxes)}
        if targets:
            out.update(target=torch.from_numpy(sp.dense_targets(index, self.num_answers)),
                       qtype=torch.from_numpy(self.qtypes[index]), index=torch.from_numpy(index))
        return out


class BatchSampler(torch.utils.data.Sampler):
    """Global batches from a seeded permutation of each epoch; under torchrun each rank takes its
    contiguous slice of every global batch, so N ranks see exactly the batches one process would.

    Every rank yields the same number of batches and none is empty (a rank that ran out early would
    leave the others waiting in a gradient all-reduce forever): slices differ in size by at most one,
    and a global batch smaller than the number of ranks (only ever the last) is dropped by all."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world, self.epoch, self.skip = rank, world, 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def global_batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        batches = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        return [b for b in batches if len(b) >= self.world]

    def __len__(self) -> int:
        return len(self.global_batches()) - self.skip

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.skip:]:
            lo, hi = self.slice(len(batch))
            yield batch[lo:hi].tolist()

    def slice(self, size: int) -> tuple[int, int]:
        """This rank's [lo, hi) of a global batch of `size`: the first size % world ranks get one more."""
        base, extra = divmod(size, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)


@dataclass
class Data:
    """Everything a run reads: vocabulary, store, tokenizer, and the splits it names."""

    vocab: AnswerVocab
    store: FeatureStore
    tokenizer: object
    train: VQADataset
    valid: VQADataset
    tests: dict[str, VQADataset]
    qtype_index: dict[str, int]

    @property
    def num_answers(self) -> int:
        return len(self.vocab)


def _concat(splits: list[Split]) -> Split:
    if len(splits) == 1:
        return splits[0]
    offsets = np.cumsum([0] + [len(s.label_idx) for s in splits[:-1]])
    ptr = np.concatenate([splits[0].label_ptr[:1]] + [s.label_ptr[1:] + o for s, o in zip(splits, offsets)])
    cat = lambda k: np.concatenate([getattr(s, k) for s in splits])  # noqa: E731
    return Split(name="+".join(s.name for s in splits), question_ids=sum((s.question_ids for s in splits), []),
                 question_types=sum((s.question_types for s in splits), []),
                 answer_types=sum((s.answer_types for s in splits), []),
                 input_ids=cat("input_ids"),
                 attention_mask=cat("attention_mask"), rows=cat("rows"), label_ptr=ptr,
                 label_idx=cat("label_idx"), label_score=cat("label_score"),
                 has_labels=all(s.has_labels for s in splits), out_of_vocab=sum(s.out_of_vocab for s in splits))


def load_data(cfg: Config, log=print) -> Data:
    """Load the splits a config names (the embedded benchmark must have been generated: embedded.generator)."""
    d = cfg.data
    root = Path(d.root)
    store_dir = Path(d.features) if Path(d.features).is_absolute() else root / d.features
    store = FeatureStore(store_dir)
    if d.dataset == "embedded":
        _check_store_shape(store, d.embedded.num_regions, d.embedded.feat_dim)
    store.check_boxes()
    _check_finite(store)
    vocab = AnswerVocab.load(root / d.ans2label)
    tokenizer = load_tokenizer(cfg)
    load = lambda name: load_split(root / f"{name}.json", tokenizer, vocab, store, d.max_seq_length,  # noqa: E731
                                   d.special_tokens)
    train = _concat([load(n) for n in d.train])
    _check_tokenizer(train, tokenizer, cfg)
    if not train.has_labels:
        raise InputError(f"training split {d.train} has questions without 'label'")
    qtype_index = {t: i for i, t in enumerate(sorted(set(train.question_types)))}
    wrap = lambda s: VQADataset(s, store, len(vocab), qtype_index, d.mask_padding)  # noqa: E731
    valid = load(d.valid)
    if not valid.has_labels:
        raise InputError(f"{root / d.valid}.json (data.valid): the validation split has no labels; models are "
                         "selected on it, so every question needs its 'label'")
    tests = {n: load(n) for n in d.test}
    for split in [train, valid, *tests.values()]:
        if split.out_of_vocab:
            log(f"{split.name}: {split.out_of_vocab} of {len(split)} questions have no answer in the vocabulary "
                f"{root / d.ans2label} (they count as wrong for every model)")
    return Data(vocab, store, tokenizer, wrap(train), wrap(valid), {n: wrap(s) for n, s in tests.items()},
                qtype_index)


# Stores up to this size are checked whole for NaN/inf when opened; larger ones (real COCO stores, tens of
# GB) were checked value by value when `python -m lxmert prepare` wrote them, and their fingerprint is checked instead.
FINITE_CHECK_BYTES = 1 << 30


def _check_finite(store: FeatureStore) -> None:
    if store._features.nbytes + store._boxes.nbytes > FINITE_CHECK_BYTES:
        return
    for name, arr in (("features.npy", store._features), ("boxes.npy", store._boxes)):
        bad = ~np.isfinite(np.asarray(arr)).reshape(len(arr), -1).all(1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            image = next(k for k, v in store.index.items() if v == row)
            raise InputError(f"{store.folder / name}: image '{image}' (row {row}) has NaN or infinite values "
                             f"({int(bad.sum())} image(s) in all); prepare the store again")


# A tokenizer that maps most words of the training questions to [UNK] makes a question-blind model.
UNK_LIMIT = 0.5


def _check_tokenizer(train: "Split", tokenizer, cfg: Config) -> None:
    ids = train.input_ids[train.attention_mask.astype(bool)]
    words = ~np.isin(ids, [i for i in tokenizer.all_special_ids if i != tokenizer.unk_token_id])
    unknown = float(np.mean(ids[words] == tokenizer.unk_token_id)) if words.any() else 1.0
    if unknown > UNK_LIMIT:
        raise InputError(f"tokenizer '{tokenizer_source(cfg)}' (model.tokenizer) maps {100 * unknown:.0f} % of the training "
                         f"questions' tokens to {tokenizer.unk_token}: it cannot read them (a vocabulary not "
                         f"loaded?); make one with python -m lxmert prepare tokenizer (data/README.md)")


def _check_store_shape(store: FeatureStore, num_boxes: int, feat_dim: int) -> None:
    """A feature store (data.features) made for other embedded parameters than the config's."""
    for key, want, have in [("num_regions", num_boxes, store.num_boxes), ("feat_dim", feat_dim, store.feat_dim)]:
        if want != have:
            raise InputError(f"{store.folder / 'meta.json'}: the feature store has {key} {have}, the config "
                             f"(data.embedded.{key}) says {want}")


def loader(dataset: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, num_workers: int, pin: bool,
           prefetch: int = 2):
    """A DataLoader that yields whole batches built by the dataset (workers share the memory map; with workers,
    `prefetch` batches each are built ahead, and pinned memory lets the copy to the GPU overlap the step).

    It gets a generator of its own: starting an iterator draws a seed from it, and drawing from the
    global RNG would shift dropout after a resume in the middle of an epoch."""
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin, persistent_workers=False, generator=torch.Generator(),
                                       prefetch_factor=prefetch if num_workers else None)


class Inputs(torch.utils.data.Dataset):
    """The model's inputs of a split, batch by batch (what prediction reads: no targets)."""

    def __init__(self, dataset: VQADataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: list[int]) -> dict[str, torch.Tensor]:
        return self.dataset.batch(index, targets=False)


class SliceSampler(torch.utils.data.Sampler):
    """Consecutive batches of the questions [lo, hi) (one rank's slice of a split, in order)."""

    def __init__(self, lo: int, hi: int, batch_size: int):
        self.lo, self.hi, self.batch_size = lo, hi, batch_size

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.lo, self.hi, self.batch_size):
            yield list(range(start, min(self.hi, start + self.batch_size)))
