"""Questions + feature store -> batches -> model, and clear errors for bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from lxmert.core.config import ModelConfig
from lxmert.core.errors import InputError
from lxmert.data.datasets import BatchSampler, load_data, load_split
from lxmert.data.features import FeatureStore, StoreWriter
from lxmert.modeling.vqa import build_model


def test_batch_keys_shapes_and_targets(tiny_data, embedded_root):
    ds = tiny_data.train
    questions = json.loads((embedded_root / "train.json").read_text())
    index = [5, 0, 399, 17]
    batch = ds[index]
    assert set(batch) == {"input_ids", "attention_mask", "visual_feats", "visual_pos", "target", "qtype", "index"}
    b, length = batch["input_ids"].shape
    a = tiny_data.num_answers
    assert b == 4 and length <= 20 and batch["attention_mask"].shape == (4, length)
    assert batch["attention_mask"].sum(1).max() == length, "padding is trimmed to the longest question"
    assert batch["visual_feats"].shape == (4, 8, 16) and batch["visual_feats"].dtype == torch.float32
    assert batch["visual_pos"].shape == (4, 8, 4) and batch["target"].shape == (4, a)
    for row, i in enumerate(index):
        q = questions[i]
        expected = torch.zeros(a)
        for ans, score in q["label"].items():
            expected[tiny_data.vocab.ans2label[ans]] = score
        assert torch.equal(batch["target"][row], expected)
        feats, boxes = tiny_data.store.get(tiny_data.store.row(q["img_id"]))
        assert np.array_equal(batch["visual_feats"][row].numpy(), feats)
        assert np.array_equal(batch["visual_pos"][row].numpy(), boxes)
    assert batch["index"].tolist() == index
    assert len(tiny_data.valid) == 150 and list(tiny_data.tests) == ["test"] and len(tiny_data.tests["test"]) == 150


def test_model_forward_gives_one_logit_per_answer(tiny_data, tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, len(tiny_data.tokenizer), tiny_data.store.feat_dim, tiny_data.num_answers)
    logits, pooled = model(tiny_data.valid[list(range(6))])
    assert logits.shape == (6, tiny_data.num_answers) and pooled.shape == (6, 32)
    assert torch.isfinite(logits).all()


def test_several_training_files_are_concatenated(embedded_root):
    cfg = tiny_config(embedded_root, extra=["data.train=[train,cp_train]"])
    data = load_data(cfg, log=lambda _: None)
    cp = json.loads((embedded_root / "cp_train.json").read_text())
    assert len(data.train) == 550
    target = data.train[[400, 549]]["target"]
    for row, q in zip(target, [cp[0], cp[149]]):
        assert {data.vocab.label2ans[i]: round(float(row[i]), 4) for i in torch.nonzero(row).ravel()} == q["label"]
    assert data.train.split.question_ids[400] == cp[0]["question_id"]


@pytest.mark.parametrize("n, batch_size", [(400, 40), (103, 10), (7, 4)])
def test_rank_slices_reassemble_the_single_process_batches(n, batch_size):
    single = BatchSampler(n, batch_size, seed=3, shuffle=True)
    ranks = [BatchSampler(n, batch_size, seed=3, shuffle=True, rank=r, world=2) for r in range(2)]
    for epoch, skip in [(0, 0), (1, 0), (2, 1)]:
        for s in [single, *ranks]:
            s.set_epoch(epoch, skip)
        whole = list(single)
        parts = [list(r) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == len(whole) == len(ranks[0])
        assert [a + b for a, b in zip(*parts)] == whole
        assert all(abs(len(a) - len(b)) <= 1 for a, b in zip(*parts))
    single.set_epoch(0)
    flat = [i for b in single for i in b]
    assert sorted(flat) == list(range(n)) and flat != list(range(n))
    single.set_epoch(1)
    assert [i for b in single for i in b] != flat


@pytest.mark.parametrize("n, batch_size, world", [(45, 10, 4), (29, 7, 3), (22, 5, 4), (13, 13, 8)])
def test_uneven_batches_give_every_rank_the_same_number_of_non_empty_slices(n, batch_size, world):
    """A rank with one batch fewer, or an empty one, would leave the others waiting in an all-reduce."""
    single = BatchSampler(n, batch_size, seed=5, shuffle=True)
    ranks = [BatchSampler(n, batch_size, seed=5, shuffle=True, rank=r, world=world) for r in range(world)]
    parts = [list(r) for r in ranks]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(ranks[0])
    assert all(len(b) > 0 for p in parts for b in p)
    whole = [sum(slices, []) for slices in zip(*parts)]
    assert whole == [b for b in single if len(b) >= world]
    assert all(max(map(len, s)) - min(map(len, s)) <= 1 for s in zip(*parts))


def test_batches_depend_on_seed_and_epoch_only():
    a, b = BatchSampler(50, 8, seed=1, shuffle=True), BatchSampler(50, 8, seed=1, shuffle=True)
    assert list(a) == list(b)
    assert list(BatchSampler(50, 8, seed=2, shuffle=True)) != list(a)
    assert [i for batch in BatchSampler(50, 8, seed=1, shuffle=False) for i in batch] == list(range(50))


# -- bad inputs -------------------------------------------------------------------------------------

def _load(tiny_data, path: Path):
    return load_split(path, tiny_data.tokenizer, tiny_data.vocab, tiny_data.store, 20)


def _write(path: Path, questions) -> Path:
    path.write_text(json.dumps(questions))
    return path


def test_truncated_question_file_is_named(tiny_data, embedded_root, tmp_path):
    text = (embedded_root / "train.json").read_text()
    path = tmp_path / "train.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="malformed JSON") as info:
        _load(tiny_data, path)
    assert str(path) in str(info.value)


def test_missing_field_and_unknown_image_are_named(tiny_data, embedded_root, tmp_path):
    questions = json.loads((embedded_root / "minival.json").read_text())[:5]
    del questions[3]["sent"]
    path = _write(tmp_path / "q.json", questions)
    with pytest.raises(InputError, match=r"question #3 has no field 'sent'") as info:
        _load(tiny_data, path)
    assert str(path) in str(info.value)
    questions[3]["sent"] = "what is the red object?"
    questions[2]["img_id"] = "COCO_nowhere_1"
    with pytest.raises(InputError, match="'COCO_nowhere_1', which is not in the feature store"):
        _load(tiny_data, _write(tmp_path / "q.json", questions))
    questions[2]["img_id"] = questions[1]["img_id"]
    questions[0]["label"] = ["yes"]
    with pytest.raises(InputError, match="question #0 field 'label'"):
        _load(tiny_data, _write(tmp_path / "q.json", questions))


def test_empty_or_non_list_split_is_refused(tiny_data, tmp_path):
    with pytest.raises(InputError, match="empty") as info:
        _load(tiny_data, _write(tmp_path / "empty.json", []))
    assert "empty.json" in str(info.value)
    with pytest.raises(InputError, match="JSON list"):
        _load(tiny_data, _write(tmp_path / "obj.json", {"questions": []}))
    with pytest.raises(InputError, match="not found"):
        _load(tiny_data, tmp_path / "absent.json")


def _copy_store(src: FeatureStore, folder: Path, scale_boxes: float) -> None:
    writer = StoreWriter(folder, len(src), src.num_boxes, src.feat_dim)
    for img_id, row in src.index.items():
        feats, boxes = src.get(row)
        writer.add(img_id, feats, boxes * scale_boxes)
    writer.close()


def test_unnormalised_boxes_are_refused(tiny_data, embedded_root, tmp_path):
    pixels = tmp_path / "pixel_store"
    _copy_store(tiny_data.store, pixels, scale_boxes=640.0)
    cfg = tiny_config(embedded_root, extra=[f"data.features={pixels}"])
    with pytest.raises(InputError, match="not normalised") as info:
        load_data(cfg, log=lambda _: None)
    assert str(pixels / "boxes.npy") in str(info.value)
    same = tmp_path / "normal_store"
    _copy_store(tiny_data.store, same, scale_boxes=1.0)
    data = load_data(tiny_config(embedded_root, extra=[f"data.features={same}"]), log=lambda _: None)
    assert torch.equal(data.train[[0, 1]]["visual_pos"], tiny_data.train[[0, 1]]["visual_pos"])


def test_store_files_that_disagree_are_named(tiny_data, tmp_path):
    folder = tmp_path / "store"
    _copy_store(tiny_data.store, folder, 1.0)
    ids = json.loads((folder / "img_ids.json").read_text())
    (folder / "img_ids.json").write_text(json.dumps(ids[:-1]))
    with pytest.raises(InputError, match=f"meta.json: num_images is {len(ids)}, img_ids.json lists {len(ids) - 1} images"):
        FeatureStore(folder)
    writer = StoreWriter(tmp_path / "w", 2, 8, 16)
    with pytest.raises(InputError, match="'x': features have shape"):
        writer.add("x", np.zeros((8, 12), np.float32), np.zeros((8, 4), np.float32))
    with pytest.raises(InputError, match="wrote 0 images, expected 2"):
        writer.close()


def test_pretrained_feature_dimension_mismatch_is_named(tmp_path):
    from transformers import LxmertConfig, LxmertModel

    folder = tmp_path / "pretrained"
    LxmertModel(LxmertConfig(vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                             l_layers=1, x_layers=1, r_layers=1, visual_feat_dim=24)).save_pretrained(folder)
    cfg = ModelConfig(pretrained=str(folder))
    with pytest.raises(InputError, match="expects 24-d region features, the feature store has 16") as info:
        build_model(cfg, vocab_size=40, feat_dim=16, num_answers=5)
    assert str(folder) in str(info.value)
    assert build_model(cfg, vocab_size=40, feat_dim=24, num_answers=5).head[3].out_features == 5
