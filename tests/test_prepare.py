"""Raw VQA / VQA-CP / VQA-VS files and bottom-up-attention TSVs -> prepared question files and store."""
import base64
import json
from pathlib import Path

import numpy as np
import pytest

from lxmert.core.errors import InputError
from lxmert.data.features import FeatureStore, StoreWriter
from lxmert.data.prepare import (
    VQAVS_OOD,
    Carve,
    RawSplit,
    main,
    prepare_features,
    prepare_questions,
)

R, D = 36, 8


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def _tsv_fields(img_id: str, h: float, w: float, boxes: np.ndarray, feats: np.ndarray) -> list[str]:
    n = len(boxes)
    return [img_id, str(h), str(w), _b64(np.arange(n, dtype="<i8")), _b64(np.full(n, 0.5, "<f4")),
            _b64(np.zeros(n, "<i8")), _b64(np.full(n, 0.25, "<f4")), str(n), _b64(boxes.astype("<f4")),
            _b64(feats.astype("<f4"))]


def _image(seed: int, h: float = 480.0, w: float = 640.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, w / 2, R), rng.uniform(0, h / 2, R)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, R), y1 + rng.uniform(1, h / 2, R)], 1).astype(np.float32)
    return boxes, rng.standard_normal((R, D)).astype(np.float32)


def _write_tsv(path: Path, lines: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(f) + "\n" for f in lines))
    return path


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------- features

def test_tsv_to_store_exact_features_boxes_ids(tmp_path):
    images = {f"COCO_train2014_{i:012d}": _image(i) for i in (9, 25, 30)}
    images["COCO_val2014_000000000042"] = _image(42, h=300.0, w=500.0)
    sizes = {k: (480.0, 640.0) for k in images} | {"COCO_val2014_000000000042": (300.0, 500.0)}
    rows = [_tsv_fields(k, *sizes[k], *images[k]) for k in images]
    a = _write_tsv(tmp_path / "train2014_obj36.tsv", rows[:3])
    b = _write_tsv(tmp_path / "val2014_obj36.tsv", rows[3:])
    info = prepare_features([a, b], tmp_path / "store", log=lambda m: None)
    assert info == {"num_images": 4, "num_boxes": R, "feat_dim": D, "dtype": "float32"}
    store = FeatureStore(tmp_path / "store")
    assert list(store.index) == list(images)
    for img_id, (boxes, feats) in images.items():
        got_feats, got_boxes = store.get(store.row(img_id))
        h, w = sizes[img_id]
        np.testing.assert_array_equal(got_feats, feats)
        np.testing.assert_allclose(got_boxes, boxes / np.array([w, h, w, h], np.float32), rtol=1e-6)
    store.check_boxes()
    assert _leftovers(tmp_path, {"train2014_obj36.tsv", "val2014_obj36.tsv", "store"}) == []


def test_tsv_float16_store(tmp_path):
    boxes, feats = _image(1)
    tsv = _write_tsv(tmp_path / "a.tsv", [_tsv_fields("img1", 480, 640, boxes, feats)])
    prepare_features([tsv], tmp_path / "store", dtype="float16", log=lambda m: None)
    store = FeatureStore(tmp_path / "store")
    np.testing.assert_array_equal(store.get(0)[0], feats.astype(np.float16).astype(np.float32))


def _six_fields(image_id: int, h: float, w: float, boxes: np.ndarray, feats: np.ndarray) -> list[str]:
    """A line of the bottom-up-attention trainval_36 TSV (peteanderson80/bottom-up-attention tools/generate_tsv.py:
    FIELDNAMES = ['image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features'], float32 base64)."""
    return [str(image_id), str(w), str(h), str(len(boxes)), _b64(boxes.astype("<f4")), _b64(feats.astype("<f4"))]


def test_six_field_trainval_36_tsv_gives_the_same_store(tmp_path):
    """The same images as the ten-field obj36 TSV and the six-field trainval_36 TSV give the same arrays; the
    six-field store names images by COCO id and serves questions that name them with their split."""
    images = {9: _image(9), 42: _image(42, h=300.0, w=500.0)}
    sizes = {9: (480.0, 640.0), 42: (300.0, 500.0)}
    six = _write_tsv(tmp_path / "trainval_36.tsv", [_six_fields(i, *sizes[i], *images[i]) for i in images])
    ten = _write_tsv(tmp_path / "obj36.tsv", [_tsv_fields(f"COCO_val2014_{i:012d}", *sizes[i], *images[i])
                                              for i in images])
    prepare_features([six], tmp_path / "six", log=lambda m: None)
    prepare_features([ten], tmp_path / "ten", log=lambda m: None)
    a, b = FeatureStore(tmp_path / "six"), FeatureStore(tmp_path / "ten")
    assert a.ids == ["COCO_000000000009", "COCO_000000000042"]
    np.testing.assert_array_equal(np.asarray(a._features), np.asarray(b._features))
    np.testing.assert_array_equal(np.asarray(a._boxes), np.asarray(b._boxes))  # width and height not swapped
    assert a.row("COCO_val2014_000000000042") == 1 and "COCO_train2014_000000000009" in a
    assert "COCO_val2014_000000000043" not in a


def _bad_lines() -> dict[str, tuple[list[str], str]]:
    good = _tsv_fields("img2", 480, 640, *_image(2))
    truncated = "\t".join(good)[: -len(good[-1]) // 2]
    short_feats = _tsv_fields("img2", 480, 640, _image(2)[0], _image(2)[1][:, : D - 1])
    nan_feats = _image(2)[1].copy()
    nan_feats[3, 1] = np.nan
    huge_boxes = _image(2)[0] * 9000
    return {"truncated": (truncated, "line 2"), "fields": ("\t".join(good[:7]), "line 2"),
            "features": ("\t".join(short_feats), "field 'features'"),
            "boxes": ("\t".join(good[:8] + [_b64(np.zeros(5, '<f4'))] + good[9:]), "field 'boxes'"),
            "nan feature": ("\t".join(_tsv_fields("img2", 480, 640, _image(2)[0], nan_feats)),
                            "image 'img2' field 'features' holds nan"),
            "nan height": ("\t".join(_tsv_fields("img2", float("nan"), 640, *_image(2))),
                           "field 'img_h' = nan must be a positive finite number"),
            "boxes far outside": ("\t".join(_tsv_fields("img2", 480, 640, huge_boxes, _image(2)[1])),
                                  "lies outside the 640 x 480 image"),
            "six-field id": ("\t".join(["COCO_1"] + _six_fields(1, 480, 640, *_image(2))[1:]),
                             "field 'image_id' = 'COCO_1' is not an integer COCO image id")}


@pytest.mark.parametrize("case", sorted(_bad_lines()))
def test_bad_tsv_is_one_error_and_leaves_nothing(tmp_path, case):
    line, words = _bad_lines()[case]
    first = "\t".join(_tsv_fields("img1", 480, 640, *_image(1)))
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(first + "\n" + line + "\n")
    with pytest.raises(InputError) as err:
        prepare_features([tsv], tmp_path / "store", log=lambda m: None)
    assert str(tsv) in str(err.value) and "line 2" in str(err.value) and words in str(err.value)
    assert _leftovers(tmp_path, {"bad.tsv"}) == []


def test_float16_store_refuses_values_beyond_its_range(tmp_path):
    boxes, feats = _image(1)
    feats[2, 5] = 70000.0
    tsv = _write_tsv(tmp_path / "a.tsv", [_tsv_fields("img1", 480, 640, *_image(0)), _tsv_fields("img1b", 480, 640, boxes, feats)])
    with pytest.raises(InputError, match=r"line 2: image 'img1b' has the feature value 70000, beyond float16's range"):
        prepare_features([tsv], tmp_path / "store", dtype="float16", log=lambda m: None)
    assert _leftovers(tmp_path, {"a.tsv"}) == []
    prepare_features([tsv], tmp_path / "store", dtype="float32", log=lambda m: None)  # float32 holds it


def test_unreadable_tsv_inputs_are_one_error_line(tmp_path, capsys):
    binary = tmp_path / "binary.tsv"
    binary.write_bytes(b"\xff\xfe\x00 not text\n")
    assert main(["features", str(binary), "--out", str(tmp_path / "store")]) == 2
    assert "binary.tsv, after line 0: not a text TSV" in capsys.readouterr().err
    assert main(["features", str(tmp_path), "--out", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path} is a folder; give the .tsv files themselves"


def test_full_disk_while_reserving_the_store_is_exit_4_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno
    import os

    tsv = _write_tsv(tmp_path / "a.tsv", [_tsv_fields("img1", 480, 640, *_image(1))])

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(["features", str(tsv), "--out", str(tmp_path / "store")]) == 4
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert err == [f"error: [Errno 28] no space left on device while writing {tmp_path / 'store'}; store was left "
                   f"as it was"]
    assert _leftovers(tmp_path, {"a.tsv"}) == []


def test_store_fingerprint_refuses_replaced_arrays(tmp_path, capsys):
    tsv = _write_tsv(tmp_path / "a.tsv", [_tsv_fields(f"img{i}", 480, 640, *_image(i)) for i in range(5)])
    prepare_features([tsv], tmp_path / "store", log=lambda m: None)
    meta = json.loads((tmp_path / "store/meta.json").read_text())
    assert set(meta["fingerprint"]) == {"sample_sha256", "sample_rows", "features_sha256", "boxes_sha256"}
    arr = np.load(tmp_path / "store/features.npy", mmap_mode="r+")
    arr[:] = 0.5  # every value replaced
    arr.flush()
    del arr
    with pytest.raises(InputError, match=r"features.npy / boxes.npy differ from the fingerprint written with the store"):
        FeatureStore(tmp_path / "store")
    assert main(["fingerprint", str(tmp_path / "store")]) == 0
    assert FeatureStore(tmp_path / "store").get(0)[0][0, 0] == 0.5


@pytest.mark.parametrize("value", ["abc", -3, None, 2.5])
def test_store_metadata_with_a_bad_box_count_is_one_error(tmp_path, value):
    tsv = _write_tsv(tmp_path / "a.tsv", [_tsv_fields("img1", 480, 640, *_image(1))])
    prepare_features([tsv], tmp_path / "store", log=lambda m: None)
    meta = json.loads((tmp_path / "store/meta.json").read_text())
    (tmp_path / "store/meta.json").write_text(json.dumps({**meta, "num_boxes": value}))
    with pytest.raises(InputError, match=r"meta.json: field 'num_boxes' = .* must be a positive integer"):
        FeatureStore(tmp_path / "store")


def test_existing_store_is_kept_unless_overwrite(tmp_path):
    tsv = _write_tsv(tmp_path / "a.tsv", [_tsv_fields("img1", 480, 640, *_image(1))])
    prepare_features([tsv], tmp_path / "store", log=lambda m: None)
    with pytest.raises(InputError, match="already exists"):
        prepare_features([tsv], tmp_path / "store", log=lambda m: None)
    tsv2 = _write_tsv(tmp_path / "b.tsv", [_tsv_fields("img7", 480, 640, *_image(7))])
    prepare_features([tsv2], tmp_path / "store", overwrite=True, log=lambda m: None)
    assert list(FeatureStore(tmp_path / "store").index) == ["img7"]
    assert _leftovers(tmp_path, {"a.tsv", "b.tsv", "store"}) == []


# ---------------------------------------------------------------------------------------------- questions

def _answers(*words: str) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def _annotation(qid: int, image_id: int, answers: list[str], mc: str, qtype: str = "how many",
                atype: str = "number") -> dict:
    return {"question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": mc, "answers": _answers(*answers)}


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _vqa_v2_files(tmp_path: Path) -> RawSplit:
    questions = {"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": "How many dogs?", "question_id": 9001},
        {"image_id": 9, "question": "What is it?", "question_id": 9002},
        {"image_id": 25, "question": "Is it red?", "question_id": 25001}]}
    annotations = {"annotations": [
        _annotation(9001, 9, ["Two", "2", "two.", "2", "three", "3", "3", "none", "2 ", "Two"], "two"),
        _annotation(9002, 9, ["A dog", "the dog", "dog!", "Dog", "cat", "a Cat", "dont know", "dog", "dog", "dog"],
                    "dog", "what is", "other"),
        _annotation(25001, 25, ["yes"] * 9 + ["No"], "yes", "is it", "yes/no")]}
    return RawSplit(_dump(tmp_path / "q.json", questions), _dump(tmp_path / "a.json", annotations))


def test_vqa_v2_questions_labels_and_answers(tmp_path):
    raw = _vqa_v2_files(tmp_path)
    vocab = _dump(tmp_path / "vocab.json", {a: i for i, a in enumerate(
        ["yes", "no", "0", "2", "3", "dog", "cat", "don't know"])})
    meta = prepare_questions({"train": raw}, tmp_path / "out", vocab_path=vocab, log=lambda m: None)
    out = tmp_path / "out"
    assert json.loads((out / "train.json").read_text()) == [
        {"answer_type": "number", "img_id": "COCO_train2014_000000000009", "label": {"2": 1.0, "3": 0.9, "0": 0.3},
         "question_id": 9001, "question_type": "how many", "sent": "How many dogs?"},
        {"answer_type": "other", "img_id": "COCO_train2014_000000000009",
         "label": {"dog": 1.0, "cat": 0.6, "don't know": 0.3},
         "question_id": 9002, "question_type": "what is", "sent": "What is it?"},
        {"answer_type": "yes/no", "img_id": "COCO_train2014_000000000025", "label": {"yes": 1.0, "no": 0.3},
         "question_id": 25001, "question_type": "is it", "sent": "Is it red?"}]
    side = json.loads((out / "train_answers.json").read_text())  # as annotated (stripped): the official scorer's input
    assert side["9001"] == ["Two", "2", "two.", "2", "three", "3", "3", "none", "2", "Two"]
    assert side["9002"] == ["A dog", "the dog", "dog!", "Dog", "cat", "a Cat", "dont know", "dog", "dog", "dog"]
    assert json.loads((out / "trainval_ans2label.json").read_text()) == json.loads(vocab.read_text())
    assert meta["splits"]["train"] == {"questions": 3, "images": 2}


def test_vocab_counts_multiple_choice_answers_and_labels_keep_vocab_answers(tmp_path):
    raw = _vqa_v2_files(tmp_path)
    prepare_questions({"train": raw}, tmp_path / "out", ["train"], min_count=1, log=lambda m: None)
    out = tmp_path / "out"
    assert json.loads((out / "trainval_label2ans.json").read_text()) == ["2", "dog", "yes"]
    assert json.loads((out / "trainval_ans2label.json").read_text()) == {"2": 0, "dog": 1, "yes": 2}
    labels = [q["label"] for q in json.loads((out / "train.json").read_text())]
    assert labels == [{"2": 1.0}, {"dog": 1.0}, {"yes": 1.0}]
    with pytest.raises(InputError, match="lower --min-count"):
        prepare_questions({"train": raw}, tmp_path / "out2", ["train"], min_count=2, log=lambda m: None)


def test_labels_drop_answers_outside_vocab_and_test_split_has_no_label(tmp_path):
    raw = _vqa_v2_files(tmp_path)
    test_q = _dump(tmp_path / "tq.json", {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 7, "question": "Why?", "question_id": 7001}]})
    prepare_questions({"train": raw, "test": RawSplit(test_q)}, tmp_path / "out", ["train"], min_count=1,
                      log=lambda m: None)
    assert json.loads((tmp_path / "out/test.json").read_text()) == [
        {"img_id": "COCO_test2015_000000000007", "question_id": 7001, "sent": "Why?"}]
    assert not (tmp_path / "out/test_answers.json").exists()
    vocab = tmp_path / "vocab.json"
    _dump(vocab, {"yes": 0, "3": 1})
    prepare_questions({"train": raw}, tmp_path / "out2", vocab_path=vocab, log=lambda m: None)
    labels = [q["label"] for q in json.loads((tmp_path / "out2/train.json").read_text())]
    assert labels == [{"3": 0.9}, {}, {"yes": 1.0}]


def _vqacp_files(tmp_path: Path, n_images: int = 40) -> RawSplit:
    questions, annotations = [], []
    for img in range(1, n_images + 1):
        split = "train2014" if img % 2 else "val2014"
        for k in range(3):
            qid = img * 10 + k
            questions.append({"image_id": img, "question": f"q{qid}?", "question_id": qid, "coco_split": split})
            annotations.append(_annotation(qid, img, ["yes"] * 10, "yes", "is it", "yes/no") | {"coco_split": split})
    return RawSplit(_dump(tmp_path / "cp_q.json", questions), _dump(tmp_path / "cp_a.json", annotations))


def test_vqacp_carve_is_deterministic_and_disjoint_by_image(tmp_path):
    raw = _vqacp_files(tmp_path)
    carve = Carve("cp_train", "cp_val", 0.25, seed=3)
    prepare_questions({"cp_train": raw}, tmp_path / "a", ["cp_train"], 1, carve=carve, log=lambda m: None)
    prepare_questions({"cp_train": raw}, tmp_path / "b", ["cp_train"], 1, carve=carve, log=lambda m: None)
    load = lambda folder, name: json.loads((tmp_path / folder / f"{name}.json").read_text())  # noqa: E731
    train, val = load("a", "cp_train"), load("a", "cp_val")
    assert train == load("b", "cp_train") and val == load("b", "cp_val")
    train_imgs, val_imgs = {q["img_id"] for q in train}, {q["img_id"] for q in val}
    assert not train_imgs & val_imgs
    assert len(val_imgs) == 10 and len(train_imgs) == 30 and len(train) + len(val) == 120
    assert "COCO_val2014_000000000002" in train_imgs | val_imgs  # coco_split field used
    other = Carve("cp_train", "cp_val", 0.25, seed=4)
    prepare_questions({"cp_train": raw}, tmp_path / "c", ["cp_train"], 1, carve=other, log=lambda m: None)
    assert {q["img_id"] for q in load("c", "cp_val")} != val_imgs


FIXTURES = Path(__file__).parent / "fixtures"
VQAVS_TAGS = ["KO", "KOP", "KW", "KWP", "KW+KO", "QT", "QT+KO", "QT+KW", "QT+KW+KO"]


def _zip(path: Path, members: dict[str, object]) -> None:
    """A zip as the release ships them: JSON members plus macOS resource-fork leftovers."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, json.dumps(content))
            head, _, tail = name.rpartition("/")
            zf.writestr(f"__MACOSX/{head + '/' if head else ''}._{tail}", b"\x00\x05\x16\x07 not json")


def _vqavs_release(tmp_path: Path) -> tuple[Path, dict[str, list[int]]]:
    """A VQA-VS release folder laid out exactly as published in PhoebusSi/VQA-VS data/ (Training/Training-Ques.json.zip,
    Training/Training-Ans.json.zip, Val.zip, IID-Test.zip, OOD-Test.zip with OOD-Test/<T>/OOD-Test-<T>-{Ques,Ans}.json),
    unextracted, holding real records of its Val.zip (tests/fixtures/vqa_vs_val_records.json names them)."""
    records = json.loads((FIXTURES / "vqa_vs_val_records.json").read_text())
    qs, anns = records["questions"], records["annotations"]
    raw = tmp_path / "vqa_vs"
    parts = {"train": slice(0, 4), "val": slice(4, 7), "test_iid": slice(7, 12)}
    _zip(raw / "Training/Training-Ques.json.zip", {"Training-Ques.json": qs[parts["train"]]})
    _zip(raw / "Training/Training-Ans.json.zip", {"Training-Ans.json": anns[parts["train"]]})
    _zip(raw / "Val.zip", {"Val/Val-Ques.json": qs[parts["val"]], "Val/Val-Ans.json": anns[parts["val"]]})
    _zip(raw / "IID-Test.zip", {"IID-Test/IID-Test-Ques.json": qs[parts["test_iid"]],
                                "IID-Test/IID-Test-Ans.json": anns[parts["test_iid"]]})
    ood, expected = {}, {n: [q["question_id"] for q in qs[p]] for n, p in parts.items()}
    for k, tag in enumerate(VQAVS_TAGS):  # each OOD set: a subset of the IID test
        pick = [7 + (k + j) % 5 for j in range(2)]
        ood[f"OOD-Test/{tag}/OOD-Test-{tag}-Ques.json"] = [qs[i] for i in pick]
        ood[f"OOD-Test/{tag}/OOD-Test-{tag}-Ans.json"] = [anns[i] for i in pick]
        expected["ood_" + tag.lower().replace("+", "_")] = [qs[i]["question_id"] for i in pick]
    _zip(raw / "OOD-Test.zip", ood)
    return raw, expected


def _store(folder: Path, ids: list[str]) -> Path:
    writer = StoreWriter(folder, len(ids), 2, 4)
    for img_id in ids:
        writer.add(img_id, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32))
    writer.close()
    return folder


def test_vqavs_release_as_published_gives_all_twelve_splits(tmp_path):
    raw, expected = _vqavs_release(tmp_path)
    records = json.loads((FIXTURES / "vqa_vs_val_records.json").read_text())
    # a store made from the six-field trainval_36 TSV names images by their COCO id only
    store = _store(tmp_path / "store", sorted({f"COCO_{q['image_id']:012d}" for q in records["questions"]}))
    assert main(["vqavs", "--raw", str(raw), "--out", str(tmp_path / "out"), "--features", str(store),
                 "--min-count", "1"]) == 0
    assert set(expected) == {"train", "val", "test_iid", *VQAVS_OOD} and len(expected) == 12
    by_id = {a["question_id"]: a for a in records["annotations"]}
    for name, ids in expected.items():
        got = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert [q["question_id"] for q in got] == ids, name
        side = json.loads((tmp_path / "out" / f"{name}_answers.json").read_text())
        assert side == {str(i): [a["answer"] for a in by_id[i]["answers"]] for i in ids}, "raw answers kept"
        assert all(FeatureStore(store).row(q["img_id"]) >= 0 for q in got)
    val = json.loads((tmp_path / "out" / "val.json").read_text())
    assert val[0]["sent"] == records["questions"][4]["question"] and val[0]["question_type"] == \
        records["annotations"][4]["question_type"]


def test_vqavs_missing_part_of_the_release_is_one_error(tmp_path, capsys):
    raw, _ = _vqavs_release(tmp_path)
    (raw / "OOD-Test.zip").unlink()
    assert main(["vqavs", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: split 'ood_qt': file not found: ") and "OOD-Test/QT/OOD-Test-QT-Ques.json" in err
    assert "bash data/download.bash vqa_vs" in err and "\n" not in err
    (raw / "Training/Training-Ans.json.zip").write_text("version https://git-lfs.github.com/spec/v1\n")
    assert main(["vqavs", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 2
    assert "Training-Ans.json.zip: not a zip archive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["malformed", "no_field", "no_annotation", "answers", "null answer", "repeated id",
                                  "text id"])
def test_bad_json_names_file_and_field(tmp_path, case):
    raw = _vqa_v2_files(tmp_path)
    target = raw.annotations if case in ("no_annotation", "answers", "null answer") else raw.questions
    data = json.loads(target.read_text())
    if case == "malformed":
        target.write_text(target.read_text()[:-20])
        words = "malformed JSON"
    elif case == "no_field":
        del data["questions"][1]["question_id"]
        words = "question #1 has no field 'question_id'"
    elif case == "no_annotation":
        del data["annotations"][2]
        words = "no annotation for question_id 25001"
    elif case == "answers":
        data["annotations"][0]["answers"][3] = {"answer_id": 4}
        words = "field 'answers'"
    elif case == "null answer":  # json null; str(None) would have become the answer "0" ("none" -> "0")
        data["annotations"][1]["multiple_choice_answer"] = None
        words = "annotation #1 (question_id 9002) field 'multiple_choice_answer' must be a string, got None"
    elif case == "repeated id":
        data["questions"][2]["question_id"] = 9001
        words = "question #2 repeats question_id 9001"
    else:
        data["questions"][0]["question_id"] = "9001"
        words = "question #0 field 'question_id' must be an integer"
    if case != "malformed":
        _dump(target, data)
    with pytest.raises(InputError) as err:
        prepare_questions({"train": raw}, tmp_path / "out", min_count=1, log=lambda m: None)
    assert str(target) in str(err.value) and words in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_vqa_with_carve_and_coco_split_option(tmp_path):
    questions = [{"image_id": i, "question": "q?", "question_id": i} for i in range(1, 11)]
    annotations = [_annotation(i, i, ["no"] * 10, "no", "is", "yes/no") for i in range(1, 11)]
    q, a = _dump(tmp_path / "q.json", questions), _dump(tmp_path / "a.json", annotations)
    out = tmp_path / "out"
    assert main(["vqa", "--out", str(out), "--split", "cp_train", str(q), str(a), "--coco-split", "val2014",
                 "--carve-val", "0.2", "--val-name", "cp_val", "--seed", "1", "--min-count", "1"]) == 0
    val = json.loads((out / "cp_val.json").read_text())
    assert len(val) == 2 and all(x["img_id"].startswith("COCO_val2014_") for x in val)
    assert json.loads((out / "prepare.json").read_text())["carve"] == {
        "source": "cp_train", "name": "cp_val", "fraction": 0.2, "seed": 1}
    assert main(["vqa", "--out", str(out), "--split", "train", str(q), str(a)]) == 2  # no COCO split known


def _git_repo_with(folder: Path, files: dict[str, Path]) -> Path:
    import shutil
    import subprocess

    for rel, src in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / rel)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "release"]):
        subprocess.run(cmd, cwd=folder, check=True, env=env)
    return folder


def test_download_bash_and_prepare_vqavs_give_all_twelve_splits(tmp_path):
    """bash data/download.bash vqa_vs on a clone of the release (here a local copy laid out as published), then
    the documented prepare command: all twelve splits, nothing renamed by hand."""
    import shutil
    import subprocess
    import sys

    release, expected = _vqavs_release(tmp_path / "release_files")
    parts = ["Training/Training-Ques.json.zip", "Training/Training-Ans.json.zip", "Val.zip", "IID-Test.zip",
             "OOD-Test.zip"]
    repo = _git_repo_with(tmp_path / "VQA-VS", {f"data/{p}": release / p for p in parts})
    data = tmp_path / "clone" / "data"
    data.mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "data" / "download.bash", data / "download.bash")
    env = {"PATH": "/usr/bin:/bin", "VQAVS_REPO": str(repo), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(data / "download.bash"), "vqa_vs"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = json.loads((FIXTURES / "vqa_vs_val_records.json").read_text())
    store = _store(tmp_path / "store", sorted({f"COCO_{q['image_id']:012d}" for q in records["questions"]}))
    assert main(["vqavs", "--raw", str(data / "raw/vqa_vs"), "--out", str(tmp_path / "out"), "--features",
                 str(store), "--min-count", "1"]) == 0
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.json") if not p.stem.endswith(("_answers", "_ans2label",
                  "_label2ans")) and p.stem != "prepare") == sorted(expected)

    (data / "raw/vqa_vs/OOD-Test.zip").write_text("version https://git-lfs.github.com/spec/v1\n")
    failed = subprocess.run(["bash", str(data / "download.bash"), "vqa_vs"], env=env, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "OOD-Test.zip is missing or not a zip archive" in failed.stderr and "drive.google.com" in failed.stderr


def test_carve_holds_out_whole_images_of_a_question_file(tmp_path):
    """prepare carve: a held-out test split by image (vqa_v2.yaml reports on nominival_heldout), deterministic,
    disjoint, nothing lost; existing outputs are kept unless --overwrite."""
    questions = [{"img_id": f"COCO_val2014_{i // 2:012d}", "question_id": i, "sent": "what?", "label": {"no": 1}}
                 for i in range(20)]
    (tmp_path / "nominival.json").write_text(json.dumps(questions))
    args = ["carve", str(tmp_path / "nominival.json"), "--fraction", "0.2", "--names", "rest", "heldout",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    rest, held = (json.loads((tmp_path / "out" / f"{n}.json").read_text()) for n in ("rest", "heldout"))
    assert len({q["img_id"] for q in held}) == 2 and len(held) == 4 and len(rest) == 16
    assert not {q["img_id"] for q in held} & {q["img_id"] for q in rest}
    assert sorted(q["question_id"] for q in rest + held) == list(range(20))
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "heldout.json").read_text()) == held
