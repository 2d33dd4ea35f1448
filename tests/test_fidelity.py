"""The switches that reproduce the original studies and the baselines beside them: BertAdam, Si et al.'s
classifier and question inputs, the question-only LXMERT, and the question-type prior rules."""
from __future__ import annotations

import json

import numpy as np
import torch
from conftest import tiny_config

from lxmert.data.datasets import VQADataset, load_data
from lxmert.modeling.vqa import build_model
from lxmert.studies.priors import INVERTED, ORACLE, prior_rules
from lxmert.train.optimizers import BertAdam


def test_bertadam_is_adam_without_bias_correction_and_decays_every_parameter():
    """airsplay/lxmert src/lxrt/optimization.py: m, v raw averages, eps 1e-6, decoupled decay on every tensor."""
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    start = [w.detach().clone(), b.detach().clone()]
    opt = BertAdam([w, b], lr=0.1, weight_decay=0.01)
    grads = [(torch.randn(4, 3), torch.randn(3)) for _ in range(3)]
    m = [torch.zeros_like(start[0]), torch.zeros_like(start[1])]
    v = [torch.zeros_like(start[0]), torch.zeros_like(start[1])]
    expected = [start[0].clone(), start[1].clone()]
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        for i, g in enumerate((gw, gb)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            expected[i] = expected[i] - 0.1 * (m[i] / (v[i].sqrt() + 1e-6) + 0.01 * expected[i])
    torch.testing.assert_close(w.detach(), expected[0])
    torch.testing.assert_close(b.detach(), expected[1])  # the bias decays too


def test_si_et_al_classifier_and_question_inputs(embedded_root):
    """model.head simple: weight-normed Linear(h, 2h) with one gain per matrix, ReLU, dropout 0.5, weight-normed
    Linear(2h, answers), zero biases; data.special_tokens false: no [CLS]/[SEP]; data.mask_padding false: every
    position attended, the padding kept."""
    cfg = tiny_config(embedded_root, extra=["model.head=simple", "data.special_tokens=false",
                                             "data.mask_padding=false", "data.max_seq_length=14"])
    data = load_data(cfg, log=lambda _: None)
    model = build_model(cfg.model, len(data.tokenizer), data.store.feat_dim, data.num_answers)
    head = model.head
    assert [type(m).__name__ for m in head] == ["ParametrizedLinear", "ReLU", "Dropout", "ParametrizedLinear"]
    assert head[2].p == 0.5
    for layer in (head[0], head[3]):
        assert layer.parametrizations.weight.original0.numel() == 1  # weight norm over the whole matrix
        assert float(layer.bias.detach().abs().sum()) == 0.0
    assert head[0].in_features == 32 and head[0].out_features == 64 and head[3].out_features == data.num_answers
    tok = data.tokenizer
    ids = data.train.split.input_ids
    assert ids.shape[1] == 14 and not np.isin(ids, [tok.cls_token_id, tok.sep_token_id]).any()
    batch = data.train.batch([0, 1, 2])
    assert batch["input_ids"].shape[1] == 14 and bool(batch["attention_mask"].all())
    assert (batch["input_ids"] == tok.pad_token_id).any(), "the padding is fed, attended"
    plain = load_data(tiny_config(embedded_root), log=lambda _: None)
    assert (plain.train.split.input_ids[:, 0] == tok.cls_token_id).all()


def test_the_question_only_model_does_not_see_the_image(tiny_data, tiny_cfg):
    model = build_model(tiny_cfg.model, len(tiny_data.tokenizer), 16, tiny_data.num_answers).eval()
    batch = tiny_data.valid.batch([0, 1, 2, 3], targets=False)
    other = {**batch, "visual_feats": torch.randn_like(batch["visual_feats"]),
             "visual_pos": torch.rand_like(batch["visual_pos"])}
    with torch.no_grad():
        assert not torch.equal(model(batch)[0], model(other)[0])
        model.sees_image = False
        torch.testing.assert_close(model(batch)[0], model(other)[0], rtol=0, atol=0)


def _split(tiny_data, rows: list[tuple[str, str, str]]) -> VQADataset:
    """A split of (question type, answer type, answer) questions, each answer with soft score 1."""
    from dataclasses import replace

    index = {a: i for i, a in enumerate(tiny_data.vocab.label2ans)}
    base = tiny_data.valid.split
    n = len(rows)
    split = replace(base, question_ids=list(range(n)), question_types=[r[0] for r in rows],
                    answer_types=[r[1] for r in rows], input_ids=base.input_ids[:n],
                    attention_mask=base.attention_mask[:n], rows=base.rows[:n],
                    label_ptr=np.arange(n + 1), label_idx=np.array([index[r[2]] for r in rows]),
                    label_score=np.ones(n, np.float32))
    return VQADataset(split, tiny_data.store, tiny_data.num_answers, tiny_data.qtype_index)


def test_prior_rules_answer_from_the_question_type_alone(tiny_data):
    """Inverted training prior: the training minority of a yes/no type (and the rarest majority answer of a
    type with more); test majority: the test split's own most frequent answer per type."""
    train = _split(tiny_data, [("is the", "yes/no", "yes")] * 3 + [("is the", "yes/no", "no")]
                   + [("what color", "other", "red")] * 2 + [("what color", "other", "blue")])
    test = _split(tiny_data, [("is the", "yes/no", "no")] * 3 + [("is the", "yes/no", "yes")]
                  + [("what color", "other", "red")] + [("what color", "other", "blue")] * 3
                  + [("how many", "number", "2")])
    rules = prior_rules(train, {"shifted": test})
    inverted, oracle = rules[INVERTED]["shifted"], rules[ORACLE]["shifted"]
    assert inverted["yes/no"] == 75.0 and inverted["other"] == 75.0 and inverted["number"] == 0.0
    assert oracle["yes/no"] == 75.0 and oracle["other"] == 75.0 and oracle["number"] == 100.0
    assert inverted["overall"] == round(100 * 6 / 9, 4) and oracle["overall"] == round(100 * 7 / 9, 4)


def test_study_b_reports_the_question_only_lxmert_and_the_prior_rules(tmp_path, embedded_root, monkeypatch):
    from lxmert.studies.debias import run_debias

    grid = ["data.train=[cp_train]", "data.valid=cp_minival", "data.test=[cp_test]", "debias.stage1_losses=[bce]",
            "debias.stage2_losses=[bce]", "debias.sparsities=[0.5]", "debias.stage2_epochs=1", "debias.stage3=false",
            "debias.controls=false", "debias.lottery_baseline=false", "debias.stage_start=best"]
    monkeypatch.chdir(tmp_path)
    result = run_debias(tiny_config(embedded_root, experiment="b", extra=grid))
    [row] = result["question_only"]["bce"]
    assert row["loss"] == "bce" and set(row["final"]) == {"cp_minival", "cp_test"}
    assert set(result["priors"]) == {INVERTED, ORACLE} and "cp_test" in result["priors"][ORACLE]
    table = (tmp_path / "result/b/debias_table.md").read_text()
    for line in ("| question-only LXMERT bce |", f"| prior: {INVERTED} |", f"| prior: {ORACLE} |",
                 "| question-only (bag of words) bce |"):
        assert line in table
    types = (tmp_path / "result/b/debias_answer_types.md").read_text()
    assert f"| prior: {ORACLE} | - | - | {result['priors'][ORACLE]['cp_test']['yes/no']:.2f} |" in types
    settings = json.loads((tmp_path / "models/b/seed_0/bce-bce/s50/settings.json").read_text())
    assert settings["debias.stage_start"] == "best"


def test_study_b_with_si_et_al_classifier_runs_through_stage_3(tmp_path, embedded_root, monkeypatch):
    """model.head simple (weight-normed): stage 2's baked weights keep the head's weight-norm tensors
    (parametrizations.weight.original0/1), so stage 3 and the rows load them; the head is never masked."""
    from lxmert.core.errors import InputError
    from lxmert.core.files import load_tensors
    from lxmert.prune.learned import sparsity_report
    from lxmert.prune.prunable import prunable_tensors
    from lxmert.studies.context import Context
    from lxmert.studies.debias import run_debias
    from lxmert.studies.saved import saved_unit

    grid = ["model.head=simple", "data.train=[cp_train]", "data.valid=cp_minival", "data.test=[cp_test]",
            "debias.stage1_losses=[bce]", "debias.stage2_losses=[bce]", "debias.sparsities=[0.5]",
            "debias.modality_sparsities=[]", "debias.stage2_epochs=1", "debias.stage3_epochs=1",
            "debias.controls=false", "debias.lottery_baseline=false", "blind.lxmert=false",
            "checkpoints.keep=all", "debias.stage_start=best"]
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(embedded_root, experiment="b", extra=grid)
    result = run_debias(cfg)
    stages = {r["stage"]: r for r in result["rows"] if r["sparsity_tag"] == "s50"}
    assert set(stages) == {"stage2", "stage3"}
    heads = load_tensors(tmp_path / "models/b/seed_0/bce-bce/s50/stage2/heads.safetensors")
    for which in ("final", "best"):
        assert {f"{which}.head.{i}.parametrizations.weight.original{j}" for i in (0, 3) for j in (0, 1)} <= set(heads)
    stage2 = tmp_path / "models/b/seed_0/bce-bce/s50/stage2"
    for name in ("pruned.safetensors", "best_pruned.safetensors"):  # plain weights, the mask multiplied in
        baked = load_tensors(stage2 / name)
        assert not any("scores" in k or k.endswith(".parametrizations.weight.original") for k in baked)
        assert "encoder.encoder.layer.0.attention.self.query.weight" in baked
        assert "head.0.parametrizations.weight.original1" in baked
    # stage 3 started from stage 2's best-on-valid weights and mask: evaluate / export read that mask
    saved = saved_unit(Context.load(cfg), "seed_0/bce-bce/s50/stage3", "best")
    assert saved.mask.resolve() == stage2 / "best_mask.safetensors"
    model = build_model(cfg.model, 40, 16, 20)
    with np.testing.assert_raises(InputError):
        prunable_tensors(model, ["encoder.pooler.*", "head.*"])
    with np.testing.assert_raises(InputError):  # the original's all-parameters rule: direction and gain too
        prunable_tensors(model, ["head.*"], all_parameters=True)
    # a sparsity report may still name the head (its modality), as the masks of the whole model
    report = sparsity_report({"head.0.weight": torch.ones(2, 2, dtype=torch.bool)}, model)
    assert set(report["by_modality"]) == {"head"}


def test_the_question_only_probe_leaves_every_random_state_as_it_was(tmp_path, embedded_root, monkeypatch):
    """Context.check_question_only builds a model and runs a forward with dropout: no RNG may move."""
    import random

    from lxmert.studies.context import Context

    monkeypatch.chdir(tmp_path)
    ctx = Context.load(tiny_config(embedded_root, experiment="probe", extra=["model.dropout=0.3"]))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    ctx.check_question_only()
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
