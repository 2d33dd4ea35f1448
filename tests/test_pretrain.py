"""The stand-in pretraining: its export is what a study loads, with the QA head built as the original
fine-tuning builds it, and a study refuses an export made with other settings."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from lxmert.core.errors import InputError
from lxmert.core.files import load_tensors, read_json
from lxmert.data.answers import AnswerVocab
from lxmert.embedded import pretrain
from lxmert.embedded.generator import PRETRAIN_ANSWERS
from lxmert.modeling.vqa import HEAD_FILE


def _config(root, export, **extra):
    over = [f"pretrain.export={export}", f"model.pretrained={export}", "pretrain.epochs=2",
            "pretrain.batch_size=16", *(f"{k}={v}" for k, v in extra.items())]
    return tiny_config(root, extra=over)


@pytest.fixture(scope="module")
def standin(embedded_root, tmp_path_factory):
    export = tmp_path_factory.mktemp("standin") / "encoder"
    cfg = _config(embedded_root, export)
    pretrain.ensure_pretrained(cfg)
    return cfg, export


def test_export_holds_encoder_tokenizer_head_and_record(standin):
    cfg, export = standin
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", HEAD_FILE, pretrain.RECORD} <= names
    record = read_json(export / pretrain.RECORD)
    assert record["settings"] == pretrain.settings(cfg)
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert {"masked_lm", "masked_object", "matching", "qa"} <= set(record["history"][-1])
    assert record["images"]["train"] + record["images"]["held_out"] == 60
    assert not list(export.parent.glob(".*tmp*")), "no temporary is left beside the export"


def test_qa_head_copies_rows_by_answer_and_zeroes_the_rest(standin):
    """load_lxmert_qa's rule: a study answer the pretraining head knows gets that row and bias, any other
    answer a zero row and zero bias (airsplay/lxmert src/tasks/vqa_model.py)."""
    cfg, export = standin
    head = load_tensors(export / HEAD_FILE)
    vocab = AnswerVocab.load(Path(cfg.data.root) / cfg.data.ans2label)
    record = read_json(export / pretrain.RECORD)
    copied = set(record["qa_head_answers_copied"])
    assert copied == set(vocab.label2ans) & set(PRETRAIN_ANSWERS) and copied
    missing = [i for i, a in enumerate(vocab.label2ans) if a not in copied]
    assert missing, "the studies ask answers the pretraining never gave"
    assert torch.all(head["head.3.weight"][missing] == 0) and torch.all(head["head.3.bias"][missing] == 0)
    kept = [i for i, a in enumerate(vocab.label2ans) if a in copied]
    assert torch.all(head["head.3.weight"][kept].abs().sum(1) > 0)
    assert head["head.3.weight"].shape[0] == len(vocab)


def test_study_loads_the_export_and_refuses_other_settings(standin, embedded_root, monkeypatch):
    from lxmert.data.datasets import load_data
    from lxmert.modeling.vqa import build_model

    cfg, export = standin
    data = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(data.tokenizer), data.store.feat_dim, len(data.vocab))
    head = load_tensors(export / HEAD_FILE)
    assert torch.equal(model.head.state_dict()["3.weight"], head["head.3.weight"])
    pretrain.ensure_pretrained(cfg)  # same settings: reused, nothing made again
    other = _config(embedded_root, export, **{"pretrain.lr": 0.002})
    with pytest.raises(InputError, match=r"pretrain\.lr"):
        pretrain.ensure_pretrained(other)
    # a stand-in made by another version of the benchmark generator is refused too (same config)
    monkeypatch.setattr(pretrain, "FORMAT_VERSION", pretrain.FORMAT_VERSION + 1)
    with pytest.raises(InputError, match=r"data\.embedded\.format_version"):
        pretrain.ensure_pretrained(cfg)


def test_standin_does_not_depend_on_the_callers_thread_count(standin, embedded_root, tmp_path):
    """The pretraining pins one intra-op thread, so the `pretrain` command (all cores) and a study (cores
    divided among workers) make the same encoder; the caller's thread count is restored afterwards."""
    cfg, export = standin
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        other = tmp_path / "encoder"
        pretrain.ensure_pretrained(_config(embedded_root, other))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    ours, theirs = load_tensors(export / "model.safetensors"), load_tensors(other / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
