"""End to end on a real-format dataset the project has never seen: raw VQA v2 question / annotation
files and LXMERT's *_obj36.tsv features, prepared with the commands of data/README.md, then trained
and evaluated by the real VQA v2 config (run/configs/vqa_v2.yaml) changed by overrides only."""
import json
from pathlib import Path

import numpy as np
from conftest import REPO
from transformers import BertTokenizer

from lxmert.core.config import load_config
from lxmert.data import prepare
from lxmert.data.prepare import random_obj36_line
from lxmert.data.answers import official_accuracy
from lxmert.data.features import FeatureStore
from lxmert.studies.dense import run_finetune

BOXES, FEAT_DIM = 36, 16  # the real box count; a small feature dimension (the real one is 2048)

# (question, answer type, question type, the ten raw human answers, raw multiple-choice answer) by kind;
# raw spellings need the official normalisation to meet: "Two" / "two." / "2 " -> "2", "A dog" -> "dog".
KINDS = {
    "yes": ("Is the car red?", "yes/no", "is the", ["Yes", "yes", "yes.", "YES", "yes", "yes", "Yes", "yes", "no",
                                                     "yes"], "Yes"),
    "no": ("Is there a dog?", "yes/no", "is there", ["no", "No", "no.", "no", "nope", "no", "No", "no", "yes", "no"],
           "no"),
    "2": ("How many people are there?", "number", "how many", ["Two", "2", "two.", "2 ", "two", "3", "2", "2", "Two",
                                                                "2"], "two"),
    "3": ("How many cars are in the picture?", "number", "how many", ["3", "three", "Three", "3", "3.", "4", "3",
                                                                       "three", "3", "2"], "3"),
    "dog": ("What animal is this?", "other", "what animal is", ["A dog", "dog", "the dog", "Dog", "dog!", "puppy",
                                                                 "dog", "a Dog", "dog", "cat"], "a dog"),
    "cat": ("What animal is on the bed?", "other", "what animal is", ["cat", "a cat", "Cat", "cat.", "kitten", "cat",
                                                                       "The cat", "cat", "cat", "dog"], "cat"),
}
# A validation question whose answers are all outside the vocabulary (it counts as wrong).
OOV = ("What color is the sky?", "other", "what color is", ["blue", "Blue", "blue.", "light blue", "blue", "blue",
                                                             "grey", "blue", "blue", "blue"], "blue")


def _raw_split(subtype: str, image_ids: list[int], kinds: list[tuple], with_answers: bool = True):
    """VQA v2's two files: {"questions": [...]} and {"annotations": [...]} with their headers."""
    header = {"info": {"description": "test"}, "license": {"name": "test"}, "task_type": "Open-Ended",
              "data_type": "mscoco", "data_subtype": subtype}
    questions, annotations = [], []
    for k, (sent, atype, qtype, answers, mc) in enumerate(kinds):
        image_id = image_ids[k % len(image_ids)]
        qid = image_id * 1000 + k
        questions.append({"image_id": image_id, "question": sent, "question_id": qid})
        annotations.append({"question_type": qtype, "multiple_choice_answer": mc, "answer_type": atype,
                            "image_id": image_id, "question_id": qid,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answers)]})
    return {**header, "questions": questions}, ({**header, "annotations": annotations} if with_answers else None)


def _write_raw(root: Path) -> dict:
    """data/raw/ as data/README.md lays it out: VQA v2 json and the obj36 TSV files of their images."""
    vqa, feats = root / "data/raw/vqa_v2", root / "data/raw/mscoco_imgfeat"
    vqa.mkdir(parents=True)
    feats.mkdir(parents=True)
    train_imgs, val_imgs, test_imgs = list(range(9, 129, 10)), list(range(42, 102, 10)), [1, 3]
    kinds = list(KINDS.values())
    splits = {"train2014": _raw_split("train2014", train_imgs, kinds * 10),               # 60 questions, 12 images
              "val2014": _raw_split("val2014", val_imgs, kinds * 3 + [OOV] * 2),         # 20 questions, 6 images
              "test2015": _raw_split("test-dev2015", test_imgs, kinds, with_answers=False)}
    for name, (questions, annotations) in splits.items():
        (vqa / f"v2_OpenEnded_mscoco_{name}_questions.json").write_text(json.dumps(questions))
        if annotations is not None:
            (vqa / f"v2_mscoco_{name}_annotations.json").write_text(json.dumps(annotations))
    rng = np.random.default_rng(0)
    for name, ids in [("train2014", train_imgs), ("val2014", val_imgs), ("test2015", test_imgs)]:
        (feats / f"{name}_obj36.tsv").write_text("".join(random_obj36_line(f"COCO_{name}_{i:012d}", rng, BOXES, FEAT_DIM) for i in ids))
    return splits


def _write_tokenizer(folder: Path, sentences: list[str]) -> Path:
    """A word-level BERT tokenizer of the questions' words (no hub access in the tests)."""
    words = sorted({w.strip("?").lower() for s in sentences for w in s.split()})
    vocab = folder.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *words]) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(str(folder))
    return folder


def test_raw_vqa_v2_and_obj36_tsv_prepare_train_and_evaluate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = _write_raw(tmp_path)
    raw, img = "data/raw/vqa_v2", "data/raw/mscoco_imgfeat"

    # data/README.md, step 1 (test2015 added as it says) and step 2b (with a test split without answers).
    assert prepare.main(["features", f"{img}/train2014_obj36.tsv", f"{img}/val2014_obj36.tsv",
                         f"{img}/test2015_obj36.tsv", "--out", "data/coco_obj36", "--dtype", "float16"]) == 0
    assert prepare.main(["vqa", "--out", "data/vqa_v2_raw",
                         "--split", "train", f"{raw}/v2_OpenEnded_mscoco_train2014_questions.json",
                         f"{raw}/v2_mscoco_train2014_annotations.json",
                         "--split", "val", f"{raw}/v2_OpenEnded_mscoco_val2014_questions.json",
                         f"{raw}/v2_mscoco_val2014_annotations.json",
                         "--split", "test", f"{raw}/v2_OpenEnded_mscoco_test2015_questions.json",
                         "--vocab-from", "train", "--vocab-from", "val", "--min-count", "9",
                         "--features", "data/coco_obj36"]) == 0
    store = FeatureStore(tmp_path / "data/coco_obj36")
    assert (store.num_boxes, store.feat_dim, len(store.index)) == (BOXES, FEAT_DIM, 20)
    prepared = tmp_path / "data/vqa_v2_raw"
    # The vocabulary holds the normalised multiple-choice answers ("two" -> "2", "a dog" -> "dog"), and the
    # labels the soft scores of the normalised human answers that are in it.
    assert sorted(json.loads((prepared / "trainval_label2ans.json").read_text())) == sorted(KINDS)
    train = json.loads((prepared / "train.json").read_text())
    assert train[2]["label"] == {"2": 1.0, "3": 0.3} and train[4]["label"] == {"dog": 1.0, "cat": 0.3}
    assert train[2]["img_id"] == "COCO_train2014_000000000029" and train[2]["answer_type"] == "number"
    assert json.loads((prepared / "val.json").read_text())[-1]["label"] == {}  # "blue" is not in the vocabulary
    val_questions = splits["val2014"][0]["questions"]
    val_answers = json.loads((prepared / "val_answers.json").read_text())
    assert set(val_answers) == {str(q["question_id"]) for q in val_questions}

    sentences = [q["question"] for qs, _ in splits.values() for q in qs["questions"]]
    tokenizer = _write_tokenizer(tmp_path / "tokenizer", sentences)
    assert "[UNK]" not in BertTokenizer.from_pretrained(str(tokenizer)).tokenize(" ".join(sentences))
    cfg = load_config(REPO / "run/configs/vqa_v2.yaml", [
        "experiment=real_format", "seeds=[0]", "data.root=data/vqa_v2_raw", "data.train=[train]",
        "data.valid=val", "data.test=[test]", "model.pretrained=null", f"model.tokenizer={tokenizer}",
        "model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
        "model.l_layers=1", "model.x_layers=1", "model.r_layers=1", "model.dropout=0.0",
        "train.epochs=1", "train.batch_size=20", "train.lr=0.001", "train.eval_batch_size=64", "blind.epochs=2",
        "device=cpu"])
    assert cfg.data.dataset == "prepared" and cfg.data.features == "../coco_obj36"  # the config's own store path

    result = run_finetune(cfg)

    saved = json.loads((tmp_path / "result/real_format/finetune.json").read_text())
    assert saved == json.loads(json.dumps(result))
    seed = saved["seeds"]["0"]
    for key in ("final", "best"):
        acc = seed[key]
        assert 0.0 <= acc["overall"] <= 100.0 and acc["questions"] == len(val_questions)
        assert {"yes/no", "number", "other"} <= set(acc)
        assert all(0.0 <= acc[t] <= 100.0 for t in ("yes/no", "number", "other"))
    assert 0.0 <= seed["blind"]["val"]["overall"] <= 100.0 and "test" not in seed["blind"]
    assert seed["tests"] == {}  # the test split has no answers: predicted, not scored
    assert saved["mean"]["blind"]["mean"] == seed["blind"]["val"]["overall"]

    preds = json.loads((tmp_path / "result/real_format/predictions/seed_0/dense/val.json").read_text())
    assert [p["question_id"] for p in preds] == [q["question_id"] for q in val_questions]
    assert {p["answer"] for p in preds} <= set(KINDS)
    test_preds = json.loads((tmp_path / "result/real_format/predictions/seed_0/dense/test.json").read_text())
    assert [p["question_id"] for p in test_preds] == [q["question_id"] for q in splits["test2015"][0]["questions"]]

    # The official VQA accuracy from the predictions and the ten kept answers is the reported accuracy
    # (predictions are of the best model; the labels' soft scores are the official leave-one-out rule).
    official = 100 * np.mean([official_accuracy(p["answer"], val_answers[str(p["question_id"])]) for p in preds])
    assert abs(official - seed["best"]["overall"]) < 1e-3
