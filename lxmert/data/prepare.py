"""Raw downloads -> the project's prepared data: question JSON files, answer vocabulary, feature store.

    python -m lxmert prepare vqa       raw VQA v2 / VQA-CP v2 questions + annotations -> question files
    python -m lxmert prepare vqavs     the VQA-VS release (train, val, IID test, nine OOD tests) -> the same
    python -m lxmert prepare features  bottom-up-attention *_obj36.tsv files -> one feature store
    python -m lxmert prepare tokenizer a word-level tokenizer of prepared questions (--overwrite to replace)
    python -m lxmert prepare fingerprint record a feature store's fingerprint again

Question files are LXMERT's format (what lxmert.data.datasets reads); beside each labelled split goes
`<split>_answers.json` with the ten normalised human answers per question, so the official VQA accuracy
can be computed later without the raw files. Everything is read and checked before anything is written,
and every output is written under a temporary name and renamed: an error leaves no half-written file
or store, and its message names the file and the field or line at fault. data/README.md has the commands.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import csv
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..core.cli import Parser, check_output
from ..core.config import EXPERIMENT_NAME
from ..core.errors import InputError, exit_code
from ..core.files import atomic_folder, read_json, refuse_existing, remove_file, remove_temporaries, write_json
from .answers import AnswerVocab, normalize_answer, soft_label, strip_answer
from .features import StoreWriter, coco_id_name, refresh_fingerprint
from .tokenizer import write_vocab_tokenizer

COCO_SPLITS = ("train2014", "val2014", "test2015")
# VQA v2's test-dev questions name their subset, but their images are test2015 images.
_SUBTYPE_IMAGES = {"test-dev2015": "test2015"}
QUESTION_FIELDS = ("image_id", "question", "question_id")
ANNOTATION_FIELDS = ("question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers")
TSV_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
              "boxes", "features")
_TSV_INDEX = {name: i for i, name in enumerate(TSV_FIELDS)}
# VQA-VS's nine OOD test sets (subsets of its IID test): output split name -> the release's tag.
VQAVS_OOD = {"ood_qt": "QT", "ood_kw": "KW", "ood_kwp": "KWP", "ood_qt_kw": "QT+KW", "ood_ko": "KO",
             "ood_kop": "KOP", "ood_qt_ko": "QT+KO", "ood_kw_ko": "KW+KO", "ood_qt_kw_ko": "QT+KW+KO"}

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Questions and annotations
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawSplit:
    """One split's raw files; annotations are None for a test split without answers."""

    questions: Path
    annotations: Optional[Path] = None


@dataclass(frozen=True)
class Carve:
    """Hold out `fraction` of the images of split `source` (with all their questions) as split `name`."""

    source: str
    name: str
    fraction: float
    seed: int


@dataclass
class Entry:
    """One question with its normalised answers (None without annotations)."""

    question_id: int
    image_id: int
    img_id: str
    sent: str
    question_type: Optional[str] = None
    answer_type: Optional[str] = None
    answers: Optional[list[str]] = None      # normalised: what soft labels are counted on
    mc_answer: Optional[str] = None
    raw_answers: Optional[list[str]] = None  # as annotated (stripped): what the official accuracy reads

    def record(self, vocab: AnswerVocab) -> dict:
        """LXMERT's question format; like LXMERT's files the label keeps in-vocabulary answers only."""
        if self.answers is None:
            return {"img_id": self.img_id, "question_id": self.question_id, "sent": self.sent}
        label = {a: s for a, s in soft_label(self.answers).items() if a in vocab.ans2label}
        return {"answer_type": self.answer_type, "img_id": self.img_id, "label": label,
                "question_id": self.question_id, "question_type": self.question_type, "sent": self.sent}


def _zipped(path: Path) -> Optional[tuple[Path, str]]:
    """Where a raw file not extracted yet sits inside a release zip, as published: 'X.json' in 'X.json.zip'
    (VQA-VS Training/Training-Ques.json.zip) or 'Dir/.../X.json' in 'Dir.zip' (Val.zip, IID-Test.zip,
    OOD-Test.zip). Members under __MACOSX/ (the release's macOS leftovers) are never used."""
    import zipfile

    candidates = [(Path(str(path) + ".zip"), path.name)]
    for ancestor in path.parents:
        if ancestor == ancestor.parent:
            break
        candidates.append((ancestor.with_name(ancestor.name + ".zip"), str(path.relative_to(ancestor.parent))))
    for archive, tail in candidates:
        if not archive.is_file():
            continue
        try:
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.namelist() if not m.startswith("__MACOSX/") and
                           (m == tail or m.endswith("/" + tail) or m.endswith("/" + path.name) or m == path.name)]
        except zipfile.BadZipFile:
            raise InputError(f"{archive}: not a zip archive (a Git LFS pointer or a partial download?); "
                             f"download it again") from None
        if members:
            return archive, min(members, key=len)
    return None


def raw_exists(path: Path) -> bool:
    return Path(path).exists() or _zipped(Path(path)) is not None


def read_json_file(path: str | Path, what: str):
    """read_json, where a path that cannot be opened at all (a file given as a folder on the way, a symlink
    loop, no permission) is one error naming it too."""
    try:
        return read_json(path, what)
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None


def read_raw(path: Path, what: str):
    """A raw JSON file, extracted or still inside its release zip."""
    import json
    import zipfile

    path = Path(path)
    if path.exists() or (found := _zipped(path)) is None:
        return read_json_file(path, what)
    archive, member = found
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{archive}::{member}: malformed JSON ({e})") from None


def read_items(path: Path, key: str, what: str) -> tuple[list, dict]:
    """The list of a raw file: VQA v2 wraps it in {"<key>": [...]} with a header, VQA-CP and VQA-VS don't."""
    data = read_raw(path, what)
    header: dict = {}
    if isinstance(data, dict):
        if key not in data:
            raise InputError(f"{path}: expected a JSON list or an object with a '{key}' list")
        header, data = data, data[key]
    if not isinstance(data, list):
        raise InputError(f"{path}: field '{key}' must be a list")
    return data, header


def _check_fields(item: object, i: int, fields: Sequence[str], path: Path, what: str) -> None:
    if not isinstance(item, dict):
        raise InputError(f"{path}: {what} #{i} is not an object")
    for name in fields:
        if name not in item:
            raise InputError(f"{path}: {what} #{i} has no field '{name}'")


def load_questions(path: Path) -> tuple[list[dict], Optional[str]]:
    """Questions and the file's `data_subtype` (VQA v2 names its COCO split there)."""
    questions, header = read_items(path, "questions", "questions file")
    for i, q in enumerate(questions):
        _check_fields(q, i, QUESTION_FIELDS, path, "question")
        if not isinstance(q["question"], str):
            raise InputError(f"{path}: question #{i} field 'question' must be a string, got {q['question']!r:.40}")
        _check_ids(q, i, path, "question")
    return questions, header.get("data_subtype")


def _check_ids(item: dict, i: int, path: Path, what: str) -> None:
    for key in ("image_id", "question_id"):
        if isinstance(item[key], bool) or not isinstance(item[key], int):
            raise InputError(f"{path}: {what} #{i} field '{key}' must be an integer, got {item[key]!r:.40}")


def _raw_answers(ann: dict, i: int, path: Path) -> list[str]:
    answers = ann["answers"]
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{path}: annotation #{i} field 'answers' must be a non-empty list")
    out = []
    for a in answers:
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            raise InputError(f"{path}: annotation #{i} (question_id {ann['question_id']}) field 'answers' "
                             f"holds an item without a string 'answer'")
        out.append(strip_answer(a["answer"]))
    return out


def load_annotations(path: Path) -> dict[int, dict]:
    """Annotations by question id: `raw_answers` as annotated (stripped, as the official evaluation reads
    them), `answers` and `multiple_choice_answer` normalised (what soft labels and the vocabulary count)."""
    annotations, _ = read_items(path, "annotations", "annotations file")
    out: dict[int, dict] = {}
    for i, ann in enumerate(annotations):
        _check_fields(ann, i, ANNOTATION_FIELDS, path, "annotation")
        _check_ids(ann, i, path, "annotation")
        if ann["question_id"] in out:
            raise InputError(f"{path}: annotation #{i} repeats question_id {ann['question_id']}")
        for key in ("multiple_choice_answer", "question_type", "answer_type"):
            if not isinstance(ann[key], str):
                raise InputError(f"{path}: annotation #{i} (question_id {ann['question_id']}) field '{key}' must be "
                                 f"a string, got {ann[key]!r:.40}")
        raw = _raw_answers(ann, i, path)
        out[ann["question_id"]] = {**ann, "raw_answers": raw, "answers": [normalize_answer(a) for a in raw],
                                   "multiple_choice_answer": normalize_answer(ann["multiple_choice_answer"])}
    return out


def coco_img_id(coco_split: str, image_id: int) -> str:
    """LXMERT's image name, the key of the feature store: COCO_val2014_000000000042."""
    return f"COCO_{coco_split}_{int(image_id):012d}"


class ImageNamer:
    """Turns a question's COCO image id into the feature store's image name.

    COCO numbers images across train2014 and val2014, but the store names them by split, and VQA-VS
    mixes both. The split comes from, in order: the question's `coco_split` field (VQA-CP), a
    `--coco-split` option (for one split or all), the feature store (the one split whose name it
    holds), the questions file's `data_subtype` (VQA v2)."""

    def __init__(self, coco_split: Optional[dict[str, str]] = None, store: Optional[Path] = None):
        self.coco_split = dict(coco_split or {})
        for value in self.coco_split.values():
            if value not in COCO_SPLITS:
                raise InputError(f"--coco-split: '{value}' is not one of {', '.join(COCO_SPLITS)}")
        self.store = store
        self.store_ids: Optional[set[str]] = None
        if store is not None:
            ids = read_json_file(Path(store) / "img_ids.json", "feature store image ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise InputError(f"{Path(store) / 'img_ids.json'}: expected a list of image id strings")
            self.store_ids = set(ids)

    def __call__(self, split: str, q: dict, i: int, path: Path, subtype: Optional[str]) -> str:
        where = f"{path}: question #{i} (question_id {q['question_id']})"
        coco = q.get("coco_split") or self.coco_split.get(split) or self.coco_split.get("")
        if coco is None and self.store_ids is not None:
            return self._from_store(q, where)
        coco = coco or _SUBTYPE_IMAGES.get(subtype or "", subtype)
        if coco is None:
            raise InputError(f"{where}: cannot tell the COCO split of image {q['image_id']}: no 'coco_split' "
                             f"field, no --coco-split, no --features store and no 'data_subtype' in the file")
        if coco not in COCO_SPLITS:
            raise InputError(f"{where}: COCO split '{coco}' is not one of {', '.join(COCO_SPLITS)}")
        name = coco_img_id(coco, q["image_id"])
        if self.store_ids is not None and name not in self.store_ids and coco_id_name(q["image_id"]) in self.store_ids:
            return name  # a store of the six-field TSV names the image without its split; FeatureStore finds it
        if self.store_ids is not None and name not in self.store_ids:
            raise InputError(f"{where}: image '{name}' is not in the feature store {self.store}")
        return name

    def _from_store(self, q: dict, where: str) -> str:
        names = [coco_img_id(c, q["image_id"]) for c in COCO_SPLITS] + [coco_id_name(q["image_id"])]
        found = [n for n in names if n in self.store_ids]
        if len(found) != 1:
            raise InputError(f"{where}: image_id {q['image_id']} matches {len(found)} images of the feature "
                             f"store {self.store} (needs exactly one)")
        return found[0]


def load_split(name: str, raw: RawSplit, namer: ImageNamer) -> list[Entry]:
    """One split's questions joined with their annotations (extra annotations are ignored, so an OOD
    subset may point at its superset's annotation file)."""
    questions, subtype = load_questions(raw.questions)
    annotations = load_annotations(raw.annotations) if raw.annotations is not None else None
    entries, seen = [], set()
    for i, q in enumerate(questions):
        qid = q["question_id"]
        if qid in seen:
            raise InputError(f"{raw.questions}: question #{i} repeats question_id {qid}")
        seen.add(qid)
        entry = Entry(question_id=qid, image_id=q["image_id"], img_id=namer(name, q, i, raw.questions, subtype),
                      sent=str(q["question"]))
        if annotations is not None:
            _attach(entry, annotations.get(qid), raw, i)
        entries.append(entry)
    if not entries:
        raise InputError(f"{raw.questions}: split '{name}' has no questions")
    return entries


def _attach(entry: Entry, ann: Optional[dict], raw: RawSplit, i: int) -> None:
    if ann is None:
        raise InputError(f"{raw.annotations}: no annotation for question_id {entry.question_id} "
                         f"(question #{i} of {raw.questions})")
    if ann["image_id"] != entry.image_id:
        raise InputError(f"{raw.annotations}: question_id {entry.question_id} has image_id {ann['image_id']}, "
                         f"the questions file says {entry.image_id}")
    entry.question_type, entry.answer_type = ann["question_type"], ann["answer_type"]
    entry.answers, entry.mc_answer, entry.raw_answers = ann["answers"], ann["multiple_choice_answer"], \
        ann["raw_answers"]


def held_images(img_ids: set[str], fraction: float, seed: int, what: str, option: str = "--carve-val") -> set[str]:
    """The images a carve holds out. They are sorted before the seeded shuffle, so the same input and seed give
    the same split."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"{option}: fraction {fraction} must be in (0, 1)")
    images = sorted(img_ids)
    n_held = round(fraction * len(images))
    if not 0 < n_held < len(images):
        raise InputError(f"{option} {fraction}: {what} has {len(images)} images, too few to hold out that fraction")
    order = np.random.default_rng(seed).permutation(len(images))
    return {images[j] for j in order[:n_held]}


def carve_split(entries: list[Entry], fraction: float, seed: int, what: str) -> tuple[list[Entry], list[Entry]]:
    """Split off a validation set by image: a model must not be selected on images it trained on."""
    held = held_images({e.img_id for e in entries}, fraction, seed, what)
    return [e for e in entries if e.img_id not in held], [e for e in entries if e.img_id in held]


def carve_file(path: str | Path, fraction: float, seed: int, names: Sequence[str], out: str | Path,
               overwrite: bool = False, log: Log = _stderr) -> tuple[Path, Path]:
    """A prepared question file split in two by image (the held-out part gets `fraction` of the images): e.g.
    VQA v2's nominival into a part to train on and a test split never trained on or selected on."""
    path, out = Path(path), Path(out)
    questions = read_json_file(path, "question file")
    if not isinstance(questions, list) or not all(isinstance(q, dict) and isinstance(q.get("img_id"), str)
                                                  for q in questions):
        raise InputError(f"{path}: expected prepared questions (a list of objects with a string 'img_id')")
    if len(names) != 2 or not all(EXPERIMENT_NAME.fullmatch(n) for n in names) or names[0] == names[1]:
        raise InputError(f"--names {' '.join(names)}: give two different split names (letters, digits, _ - .)")
    targets = [out / f"{n}.json" for n in names]
    for target in targets:
        refuse_existing(target, overwrite)
    held = held_images({q["img_id"] for q in questions}, fraction, seed, str(path), "--fraction")
    kept = [q for q in questions if q["img_id"] not in held]
    write_json(targets[1], [q for q in questions if q["img_id"] in held], indent=None)
    try:
        write_json(targets[0], kept, indent=None)
    except BaseException:  # both files or neither: a rerun is not refused for a half-written pair
        remove_file(targets[1])
        raise
    log(f"{path}: {len(kept)} questions -> {targets[0]}, {len(questions) - len(kept)} on {len(held)} held-out "
        f"images -> {targets[1]} (seed {seed})")
    return targets[0], targets[1]


def build_vocab(splits: dict[str, list[Entry]], vocab_from: Sequence[str], min_count: int) -> AnswerVocab:
    """LXMERT's rule: normalised multiple-choice answers seen in at least `min_count` questions of the
    training split(s) (never of a split a model is selected or tested on)."""
    for name in vocab_from:
        if name not in splits:
            raise InputError(f"--vocab-from: no split named '{name}' (splits: {', '.join(splits)})")
        if splits[name][0].answers is None:
            raise InputError(f"--vocab-from: split '{name}' has no annotations")
    vocab = AnswerVocab.from_answers((e.mc_answer for n in vocab_from for e in splits[n]), min_count)
    if not len(vocab):
        raise InputError(f"no answer of split(s) {', '.join(vocab_from)} occurs {min_count} times; lower --min-count")
    return vocab


def _write(out: Path, splits: dict[str, list[Entry]], vocab: AnswerVocab, meta: dict) -> None:
    for name, entries in splits.items():
        write_json(out / f"{name}.json", [e.record(vocab) for e in entries], indent=None)
        if entries[0].answers is not None:  # the human answers as the official evaluation reads them
            write_json(out / f"{name}_answers.json", {str(e.question_id): e.raw_answers for e in entries}, indent=None)
    vocab.save(out)
    write_json(out / "prepare.json", meta)


def prepare_questions(raw: dict[str, RawSplit], out: str | Path, vocab_from: Sequence[str] = ("train",),
                      min_count: int = 9, vocab_path: Optional[Path] = None, carve: Optional[Carve] = None,
                      namer: Optional[ImageNamer] = None, log: Log = _stderr) -> dict:
    """Raw splits (name -> files) -> question files, answer side files and the vocabulary in `out`.

    All splits are loaded and checked first; files are written only when every one is valid."""
    check_output(out, folder=True)
    namer = namer or ImageNamer()
    splits = {name: load_split(name, files, namer) for name, files in raw.items()}
    if carve is not None:
        if carve.source not in splits or carve.name in splits:
            raise InputError(f"--carve-val: needs an existing split '{carve.source}' and a new name '{carve.name}'")
        splits[carve.source], splits[carve.name] = carve_split(splits[carve.source], carve.fraction, carve.seed,
                                                               f"split '{carve.source}'")
    vocab = AnswerVocab.load(vocab_path) if vocab_path is not None else build_vocab(splits, vocab_from, min_count)
    meta = {"splits": {n: {"questions": len(e), "images": len({x.img_id for x in e})} for n, e in splits.items()},
            "sources": {n: {"questions": str(f.questions), "annotations": str(f.annotations)} for n, f in raw.items()},
            "answers": len(vocab), "vocab": str(vocab_path) if vocab_path else
            {"from": list(vocab_from), "min_count": min_count},
            "carve": None if carve is None else asdict(carve)}
    _write(Path(out), splits, vocab, meta)
    for name, info in meta["splits"].items():
        log(f"{name}: {info['questions']} questions on {info['images']} images")
    log(f"answer vocabulary: {len(vocab)} answers -> {Path(out) / 'trainval_ans2label.json'}")
    return meta


VQAVS_SOURCE = ("the VQA-VS release: bash data/download.bash vqa_vs (https://github.com/PhoebusSi/VQA-VS, folder "
                "data/, or its Google Drive folder), extracted as published")


def vqavs_layout(raw: str | Path) -> dict[str, RawSplit]:
    """Where the VQA-VS release's files are once its zips are extracted in `raw`, as published
    (PhoebusSi/VQA-VS data/: Training/Training-{Ques,Ans}.json.zip, Val.zip, IID-Test.zip, OOD-Test.zip; the
    authors' own scorer reads OOD-Test/<T>/OOD-Test-<T>-Ques.json, comput_score.py lines 78-94)."""
    raw = Path(raw)
    layout = {"train": RawSplit(raw / "Training/Training-Ques.json", raw / "Training/Training-Ans.json"),
              "val": RawSplit(raw / "Val/Val-Ques.json", raw / "Val/Val-Ans.json"),
              "test_iid": RawSplit(raw / "IID-Test/IID-Test-Ques.json", raw / "IID-Test/IID-Test-Ans.json")}
    for name, tag in VQAVS_OOD.items():
        folder = raw / "OOD-Test" / tag
        answers = folder / f"OOD-Test-{tag}-Ans.json"
        # the OOD sets are subsets of the IID test: without an answer file of their own, its answers serve
        layout[name] = RawSplit(folder / f"OOD-Test-{tag}-Ques.json",
                                answers if raw_exists(answers) else layout["test_iid"].annotations)
    return layout


def _check_exist(raw: dict[str, RawSplit], hint: str) -> None:
    for name, files in raw.items():
        for path in (files.questions, files.annotations):
            if path is not None and not raw_exists(Path(path)):
                raise InputError(f"split '{name}': file not found: {path} (nor in a release zip beside it); {hint}")


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------

@dataclass
class _Shape:
    num_boxes: int
    feat_dim: int
    count: int = 0
    ids: set = field(default_factory=set)


_BARE_CR = re.compile(rb"\r(?!\n)")


def _count_records(path: Path) -> int:
    """First pass: the number of non-blank lines, read in binary without parsing (store size). Lines end in LF
    or CRLF; a carriage return anywhere else is refused (before the first line is read whole: a file with
    old Mac line endings is one line of 17 GB), as the TSV reader would split a record there."""
    try:
        with open(path, "rb") as fh:
            _check_line_ends(fh.read(1 << 20).rstrip(b"\r"), path, 1)  # a CR at the end may start a CRLF
            fh.seek(0)
            count = 0
            for number, line in enumerate(fh, 1):
                _check_line_ends(line, path, number)
                count += bool(line.strip())
            return count
    except FileNotFoundError:
        raise InputError(f"feature file not found: {path}; LXMERT's *_obj36.tsv files go in "
                         f"data/raw/mscoco_imgfeat/ (see data/README.md)") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder; give the .tsv files themselves") from None
    except OSError as e:
        raise InputError(f"feature file {path} cannot be read ({e.strerror or type(e).__name__})") from None


def _check_line_ends(chunk: bytes, path: Path, first_line: int) -> None:
    """Refuse a carriage return that does not end a CRLF line break in `chunk`, which starts at `first_line`."""
    bare = _BARE_CR.search(chunk) if b"\r" in chunk else None
    if bare is not None:
        line = first_line + chunk.count(b"\n", 0, bare.start())
        raise InputError(f"{path}, line {line}: carriage return (\\r) inside a line (old Mac or mixed line endings, "
                         f"which split the records); lines must end in LF or CRLF")


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line, one line in memory at a time."""
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for row in reader:
                if row:
                    yield reader.line_num, row
        except csv.Error as e:
            raise InputError(f"{path}, line {reader.line_num}: unreadable TSV ({e})") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}, after line {reader.line_num}: not a text TSV (bytes that are not UTF-8); "
                             f"is it the unzipped .tsv?") from None


@dataclass(frozen=True)
class Layout:
    """A bottom-up-attention TSV layout: its fields, and the names of the id, height and width fields."""

    name: str
    fields: tuple[str, ...]
    id_field: str
    h_field: str
    w_field: str

    def index(self, name: str) -> int:
        return self.fields.index(name)


# LXMERT's *_obj36.tsv (airsplay/lxmert src/utils.py FIELDNAMES) and the original bottom-up-attention
# trainval_36 TSV (peteanderson80/bottom-up-attention tools/generate_tsv.py line 34, read by the VQA-CP / VQA-VS
# debiasing code): told apart by their number of fields.
OBJ36 = Layout("LXMERT *_obj36.tsv", TSV_FIELDS, "img_id", "img_h", "img_w")
TRAINVAL36 = Layout("bottom-up-attention trainval_36", ("image_id", "image_w", "image_h", "num_boxes", "boxes",
                                                        "features"), "image_id", "image_h", "image_w")
LAYOUTS = {len(layout.fields): layout for layout in (OBJ36, TRAINVAL36)}


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def obj36_line(img_id: str, h: float, w: float, boxes: np.ndarray, features: np.ndarray,
               objects_id: Optional[np.ndarray] = None, objects_conf: Optional[np.ndarray] = None,
               attrs_id: Optional[np.ndarray] = None, attrs_conf: Optional[np.ndarray] = None) -> str:
    """One line of LXMERT's *_obj36.tsv, what `prepare features` reads (TSV_FIELDS, airsplay/lxmert
    src/utils.py FIELDNAMES): ten tab-separated fields, arrays as base64 of little-endian int64 ids and float32
    values. Ids and confidences not given are written as zeros (prepare reads boxes and features only)."""
    n = len(boxes)
    zeros = np.zeros(n)
    fill = lambda a: zeros if a is None else a  # noqa: E731
    fields = [img_id, str(h), str(w), _b64(fill(objects_id), "i8"), _b64(fill(objects_conf), "f4"),
              _b64(fill(attrs_id), "i8"), _b64(fill(attrs_conf), "f4"), str(n), _b64(boxes, "f4"), _b64(features, "f4")]
    return "\t".join(fields) + "\n"


def random_obj36_line(img_id: str, rng: np.random.Generator, boxes: int = 36, feat_dim: int = 2048,
                      h: float = 480.0, w: float = 640.0) -> str:
    """A random detector output for one image in LXMERT's format (obj36_line): boxes inside the image,
    non-negative features, ids and confidences in the ranges of the released files; for fixtures and rehearsals."""
    x1, y1 = rng.uniform(0, w / 2, boxes), rng.uniform(0, h / 2, boxes)
    xyxy = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, boxes), y1 + rng.uniform(1, h / 2, boxes)], 1)
    feats = np.abs(rng.standard_normal((boxes, feat_dim)))
    return obj36_line(img_id, h, w, xyxy, feats, rng.integers(0, 1600, boxes), rng.uniform(0.2, 1, boxes),
                      rng.integers(0, 400, boxes), rng.uniform(0.1, 1, boxes))


# Boxes may reach this share of the image size beyond its edges (detector boxes are clipped to the image).
BOX_TOLERANCE = 0.01
FLOAT16_MAX = float(np.finfo(np.float16).max)


def _decode(row: list[str], layout: Layout, name: str, dtype: str, where: str) -> np.ndarray:
    try:
        buf = base64.b64decode(row[layout.index(name)], validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}: field '{name}' is not valid base64 ({e}); truncated line?") from None
    if len(buf) % np.dtype(dtype).itemsize:
        raise InputError(f"{where}: field '{name}' has {len(buf)} bytes, not a whole number of {dtype} values")
    return np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=False)  # no copy on LE


def _number(row: list[str], layout: Layout, name: str, kind: type, where: str) -> float:
    raw = row[layout.index(name)]
    try:
        value = kind(raw)
    except ValueError:
        raise InputError(f"{where}: field '{name}' = {raw[:40]!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}: field '{name}' = {raw[:40]} must be a positive finite number")
    return value


def _image_id(row: list[str], layout: Layout, where: str) -> str:
    """The store key: LXMERT's names as they are (COCO_val2014_000000000042); the integer COCO ids of the
    six-field TSV as COCO_000000000042, which FeatureStore finds for COCO_<split>_000000000042 too, so
    one store serves question files of either naming."""
    raw = row[layout.index(layout.id_field)]
    if layout is OBJ36:
        return raw
    if not (raw.isascii() and raw.isdigit()):
        raise InputError(f"{where}: field 'image_id' = {raw[:40]!r} is not an integer COCO image id")
    return coco_id_name(int(raw))


def _check_values(img_id: str, feats: np.ndarray, boxes: np.ndarray, size: tuple[float, float], where: str) -> None:
    for name, arr in (("features", feats), ("boxes", boxes)):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InputError(f"{where}: image '{img_id}' field '{name}' holds {arr[bad][0]} (NaN or infinite values "
                             f"are never stored)")
    h, w = size
    limit = np.array([w, h, w, h], np.float32)
    outside = (boxes < -BOX_TOLERANCE * limit) | (boxes > (1 + BOX_TOLERANCE) * limit)
    if outside.any():
        r, c = np.argwhere(outside)[0]
        raise InputError(f"{where}: image '{img_id}' box {r} coordinate {boxes[r, c]:g} lies outside the "
                         f"{w:g} x {h:g} image (boxes are pixel x1, y1, x2, y2)")


def parse_record(row: list[str], where: str, feat_dim: Optional[int] = None) -> tuple[str, np.ndarray, np.ndarray]:
    """One TSV line of either layout -> (store image id, features [R, D] float32, boxes [R, 4] divided by
    image width/height); refused when a value is not finite or a box lies outside the image."""
    layout = LAYOUTS.get(len(row))
    if layout is None:
        raise InputError(f"{where}: {len(row)} tab-separated fields; expected "
                         + " or ".join(f"{len(x.fields)} ({x.name}: {', '.join(x.fields)})" for x in LAYOUTS.values())
                         + "; truncated line?")
    img_id = _image_id(row, layout, where)
    n = int(_number(row, layout, "num_boxes", int, where))
    img_h, img_w = _number(row, layout, layout.h_field, float, where), _number(row, layout, layout.w_field, float, where)
    boxes = _decode(row, layout, "boxes", "float32", where)
    if boxes.size != n * 4:
        raise InputError(f"{where}: field 'boxes' holds {boxes.size} values, expected num_boxes x 4 = {n * 4}")
    feats = _decode(row, layout, "features", "float32", where)
    dim = feat_dim if feat_dim is not None else feats.size // n
    if feats.size != n * dim or dim == 0:
        raise InputError(f"{where}: field 'features' holds {feats.size} values, expected num_boxes x feat_dim "
                         f"= {n} x {dim}")
    boxes, feats = boxes.reshape(n, 4), feats.reshape(n, dim)
    _check_values(img_id, feats, boxes, (img_h, img_w), where)
    boxes = boxes / np.array([img_w, img_h, img_w, img_h], np.float32)
    return img_id, feats, boxes.astype(np.float32, copy=False)


def _first_shape(paths: Sequence[Path]) -> _Shape:
    for path in paths:
        for line, row in _tsv_rows(path):
            _, feats, _ = parse_record(row, f"{path}, line {line}")
            return _Shape(num_boxes=feats.shape[0], feat_dim=feats.shape[1])
    raise InputError(f"no records in {', '.join(map(str, paths))}")


def _fill(writer: StoreWriter, path: Path, shape: _Shape, log: Log) -> None:
    for line, row in _tsv_rows(path):
        where = f"{path}, line {line}"
        img_id, feats, boxes = parse_record(row, where, shape.feat_dim)
        if writer.dtype == "float16":
            big = np.abs(feats) > FLOAT16_MAX
            if big.any():
                raise InputError(f"{where}: image '{img_id}' has the feature value {feats[big][0]:g}, beyond float16's "
                                 f"range (+-{FLOAT16_MAX:g}); use --dtype float32")
        if feats.shape[0] != shape.num_boxes:
            raise InputError(f"{where}: field 'num_boxes' = {feats.shape[0]}, the store holds {shape.num_boxes} "
                             f"boxes per image (set by the first record)")
        if img_id in shape.ids:
            raise InputError(f"{where}: image '{img_id}' appears twice")
        shape.ids.add(img_id)
        writer.add(img_id, feats, boxes)
        shape.count += 1
        if shape.count % 10000 == 0:
            log(f"{shape.count} images")


def prepare_features(tsv_files: Sequence[str | Path], out: str | Path, dtype: str = "float32",
                     overwrite: bool = False, log: Log = _stderr) -> dict:
    """Stream TSV files into one feature store: a first pass counts the lines, the second parses one
    line at a time into memory maps, so the 17 GB files never sit in RAM."""
    if dtype not in ("float32", "float16"):
        raise InputError(f"--dtype: '{dtype}' is not float32 or float16")
    out = check_output(out, folder=True)
    for stale in remove_temporaries(out.parent, of=out.name):  # a killed or failed earlier run's store
        log(f"removed {stale}, left by an interrupted run")
    refuse_existing(out, overwrite)  # before reading the (17 GB) files, not after
    paths = [Path(p) for p in tsv_files]
    total = sum(_count_records(p) for p in paths)
    shape = _first_shape(paths)
    log(f"{total} images of {shape.num_boxes} boxes x {shape.feat_dim} features in {len(paths)} file(s)")
    with atomic_folder(out, overwrite) as tmp:
        writer = StoreWriter(tmp, total, shape.num_boxes, shape.feat_dim, dtype)
        for path in paths:
            _fill(writer, path, shape, log)
        if shape.count != total:
            raise InputError(f"{', '.join(map(str, paths))}: read {shape.count} records, counted {total} lines")
        writer.close()
    log(f"feature store -> {out}")
    return {"num_images": total, "num_boxes": shape.num_boxes, "feat_dim": shape.feat_dim, "dtype": dtype}


def prepare_tokenizer(question_files: Sequence[str | Path], out: str | Path, overwrite: bool = False,
                      log: Log = _stderr) -> Path:
    """A word-level BERT vocabulary of the questions' words, saved as a transformers BertTokenizer that
    from_pretrained(out) reads back (the embedded benchmark makes its own the same way). In transformers 5,
    BertTokenizerFast(vocab_file=...) silently ignores the file and maps every word to [UNK]. The folder is
    written whole; one that exists and holds anything is replaced only with `overwrite`."""
    out = check_output(out, folder=True)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out}: the folder exists and is not empty; the tokenizer would replace all of it: "
                         f"give a new folder, or pass --overwrite")
    sentences = []
    for path in map(Path, question_files):
        questions = read_json(path, "question file")
        if not isinstance(questions, list) or not all(isinstance(q, dict) and isinstance(q.get("sent"), str)
                                                      for q in questions):
            raise InputError(f"{path}: expected prepared questions (a list of objects with a string 'sent')")
        sentences += [q["sent"] for q in questions]
    with atomic_folder(out, overwrite=True) as tmp:
        write_vocab_tokenizer(tmp, sentences)
    log(f"tokenizer of {len(sentences)} questions -> {out} (model.tokenizer: {out})")
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def _raw_splits(items: Optional[list[list[str]]]) -> dict[str, RawSplit]:
    out = {}
    for item in items or []:
        if len(item) not in (2, 3):
            raise InputError(f"--split {' '.join(item)}: give NAME QUESTIONS [ANNOTATIONS]")
        if item[0] in out:
            raise InputError(f"--split {item[0]}: given twice (the second would replace the first); "
                             f"give each split once")
        out[item[0]] = RawSplit(Path(item[1]), Path(item[2]) if len(item) == 3 else None)
    return out


def _coco_splits(items: Optional[list[str]]) -> dict[str, str]:
    """'[NAME=]SPLIT' items; a bare SPLIT (key '') applies to every split."""
    out = {}
    for item in items or []:
        name, _, value = item.rpartition("=")
        out[name] = value
    return out


def _add_question_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder of the question files and vocabulary")
    p.add_argument("--split", nargs="+", action="append", metavar="ARG",
                   help="NAME QUESTIONS [ANNOTATIONS]: one raw split (repeat; no annotations for a test split)")
    p.add_argument("--coco-split", action="append", metavar="[NAME=]SPLIT",
                   help="COCO split (train2014, val2014, test2015) of split NAME's images, or of all splits; "
                        "not needed where questions carry 'coco_split' (VQA-CP) or the file a 'data_subtype' (VQA v2)")
    p.add_argument("--features", help="feature store: take each image's COCO split from it and check every "
                                      "image is there")
    p.add_argument("--vocab", help="use this trainval_ans2label.json instead of building a vocabulary")
    p.add_argument("--min-count", type=int, default=9,
                   help="keep answers that are the multiple-choice answer of at least this many training "
                        "questions (9, as LXMERT's 3,129)")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m lxmert prepare", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    vqa = sub.add_parser("vqa", help="raw VQA v2 / VQA-CP v2 files -> question files")
    _add_question_options(vqa)
    vqa.add_argument("--vocab-from", action="append", metavar="NAME",
                     help="split(s) the vocabulary is counted on (repeat; default: the first --split)")
    vqa.add_argument("--carve-val", type=float, metavar="FRACTION",
                     help="hold out this fraction of the training split's images as a validation split")
    vqa.add_argument("--carve-from", help="split to carve from (default: the first --vocab-from split)")
    vqa.add_argument("--val-name", default="val", help="name of the carved split (default: val)")
    vqa.add_argument("--seed", type=int, default=0, help="seed of the carve")
    vs = sub.add_parser("vqavs", help="the VQA-VS release -> question files (train, val, test_iid, ood_*)")
    _add_question_options(vs)
    vs.add_argument("--raw", default="data/raw/vqa_vs", help="folder of the unzipped release (data/README.md)")
    feats = sub.add_parser("features", help="bottom-up-attention TSV files -> one feature store")
    feats.add_argument("tsv", nargs="+", help="LXMERT's *_obj36.tsv files (ten fields) or the bottom-up-attention "
                                              "trainval_36 TSV (six fields); told apart by their field count")
    feats.add_argument("--out", required=True, help="feature store folder (created whole at the end)")
    feats.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored feature type")
    feats.add_argument("--overwrite", action="store_true", help="replace an existing store")
    tok = sub.add_parser("tokenizer", help="a word-level BERT tokenizer of the questions of prepared question files")
    tok.add_argument("questions", nargs="+", help="prepared question files (<split>.json)")
    tok.add_argument("--out", required=True, help="tokenizer folder (model.tokenizer)")
    tok.add_argument("--overwrite", action="store_true", help="replace an existing folder that is not empty")
    carve = sub.add_parser("carve", help="a prepared question file split in two by image (e.g. a held-out test "
                                         "split from nominival)")
    carve.add_argument("questions", help="the prepared question file (<split>.json)")
    carve.add_argument("--fraction", type=float, required=True, help="the fraction of its images held out")
    carve.add_argument("--names", nargs=2, required=True, metavar=("KEPT", "HELD"),
                       help="the two split names written to --out (KEPT.json, HELD.json)")
    carve.add_argument("--out", required=True, help="the folder they go to (the prepared data folder)")
    carve.add_argument("--seed", type=int, default=0, help="seed of the carve")
    carve.add_argument("--overwrite", action="store_true", help="replace existing files of those names")
    fp = sub.add_parser("fingerprint", help="record (again) the fingerprint of a feature store")
    fp.add_argument("store", help="feature store folder")
    return parser


def _run_vqa(args: argparse.Namespace) -> None:
    raw = _raw_splits(args.split)
    if not raw:
        raise InputError("vqa: give at least one --split NAME QUESTIONS [ANNOTATIONS]")
    _check_exist(raw, "see data/README.md for the downloads")
    vocab_from = args.vocab_from or [next(iter(raw))]
    twice = next((name for i, name in enumerate(vocab_from) if name in vocab_from[:i]), None)
    if twice is not None:
        raise InputError(f"--vocab-from {twice}: given twice (its answers would be counted twice)")
    carve = None
    if args.carve_val is not None:
        carve = Carve(args.carve_from or vocab_from[0], args.val_name, args.carve_val, args.seed)
    namer = ImageNamer(_coco_splits(args.coco_split), Path(args.features) if args.features else None)
    prepare_questions(raw, args.out, vocab_from, args.min_count, Path(args.vocab) if args.vocab else None,
                      carve, namer)


def _run_vqavs(args: argparse.Namespace) -> None:
    raw = {**vqavs_layout(args.raw), **_raw_splits(args.split)}
    _check_exist(raw, f"get {VQAVS_SOURCE} into {args.raw}, or pass --split NAME QUESTIONS ANNOTATIONS")
    namer = ImageNamer(_coco_splits(args.coco_split), Path(args.features) if args.features else None)
    prepare_questions(raw, args.out, ["train"], args.min_count, Path(args.vocab) if args.vocab else None,
                      None, namer)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    run = {"vqa": lambda: _run_vqa(args), "vqavs": lambda: _run_vqavs(args),
           "features": lambda: prepare_features(args.tsv, args.out, args.dtype, args.overwrite),
           "tokenizer": lambda: prepare_tokenizer(args.questions, args.out, args.overwrite),
           "carve": lambda: carve_file(args.questions, args.fraction, args.seed, args.names, args.out, args.overwrite),
           "fingerprint": lambda: _stderr(f"{args.store}: fingerprint {refresh_fingerprint(args.store)['sample_sha256']}")}
    return exit_code(run[args.command])


if __name__ == "__main__":
    sys.exit(main())
