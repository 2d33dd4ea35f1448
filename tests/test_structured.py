"""Structured tickets (prune/structure.py): heads, neurons and N:M masks from one override of study A, Michel et
al.'s gradient importance, and the compact export that removes what the mask pruned and scores the same."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import LOTTERY_EXTRA, tiny_config, tiny_yaml

from lxmert.core.errors import ConfigError, InputError
from lxmert.prune import structure as st
from lxmert.prune.masks import apply_mask, full_mask, load_mask, measure_weights
from lxmert.prune.prunable import prunable_tensors

HEADS = ["lottery.granularity=heads", "lottery.modes=[low_magnitude,random]"]


def _model(seed: int = 0):
    from lxmert.modeling.vqa import build_model

    cfg = tiny_config("unused", extra=["model.pretrained=null"])
    torch.manual_seed(seed)
    return build_model(cfg.model, 60, 16, 12).eval()


def _batch(n: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 60, (n, 7), generator=g), "attention_mask": torch.ones(n, 7, dtype=torch.long),
            "visual_feats": torch.randn(n, 5, 16, generator=g), "visual_pos": torch.rand(n, 5, 4, generator=g),
            "target": torch.rand(n, 12, generator=g)}


def _dead_heads(mask: dict, groups: list) -> list[np.ndarray]:
    return [~st.alive_units(g, mask) for g in groups]


@pytest.fixture(scope="module")
def heads_run(lottery_run, tmp_path_factory):
    """The tiny study A again with lottery.granularity=heads (the dense fine-tune of lottery_run reused), and a
    one-mode N:M run: (working directory, heads config, heads result, N:M result)."""
    import os

    from lxmert.studies.lottery import run_lottery

    workdir, cfg, _ = lottery_run
    work = tmp_path_factory.mktemp("structured") / "work"
    shutil.copytree(workdir, work)
    root = cfg.data.root
    heads = tiny_config(root, extra=LOTTERY_EXTRA + HEADS)
    n_m = tiny_config(root, extra=LOTTERY_EXTRA + ["lottery.granularity=n_m", "lottery.modes=[low_magnitude]",
                                                   "lottery.levels=[0.25,0.5]"])
    old = os.getcwd()
    os.chdir(work)
    try:
        return work, heads, run_lottery(heads), run_lottery(n_m)
    finally:
        os.chdir(old)


def test_a_heads_study_from_one_override(heads_run):
    work, cfg, result, _ = heads_run
    out = work / "result" / "tiny"
    assert (out / "lottery.json").exists(), "the unstructured study's result stays"
    for name in ("lottery_heads.json", "lottery_heads_table.md", "lottery_heads_test_table.md",
                 "lottery_heads_answer_types.md", "lottery_heads_all.png", "lottery_heads_random.png"):
        assert (out / name).exists(), name
    table = (out / "lottery_heads_table.md").read_text()
    assert "| heads removed % | measured % | low magnitude | random |" in table and "heads by magnitude" in table
    model = _model()
    prunable = prunable_tensors(model)
    groups = st.structure_groups(model, "heads", prunable)
    total = sum(g.count for g in groups)
    assert total == 10  # 1 language + 1 vision + 3 cross-modality attention modules, 2 heads each
    per_head = 4 * 16 * 32  # query, key, value rows and output columns of one 16-wide head in a 32-wide model
    prunable_size = sum(model.get_parameter(t.name).numel() for t in prunable)
    previous = None
    for row in sorted(result["rows"], key=lambda r: (r["mode"], r["target_sparsity"])):
        folder = work / "models/tiny/seed_0/iterative_global_heads" / row["mode"] / f"level_{round(100 * row['target_sparsity'])}"
        mask = load_mask(folder / "mask.safetensors")[0]
        dead = _dead_heads(mask, groups)
        assert sum(int(d.sum()) for d in dead) == round(row["target_sparsity"] * total)
        # sparsity measured from the retrained weights: exactly the pruned heads' weights are zero
        assert row["measured_sparsity"] == pytest.approx(sum(int(d.sum()) for d in dead) * per_head / prunable_size,
                                                         abs=1e-6)
        if previous is not None and previous[0] == row["mode"]:
            assert all(np.all(b[a]) for a, b in zip(previous[1], dead)), "a pruned head stays pruned"
        previous = (row["mode"], dead)


def test_n_m_masks_prune_the_same_count_in_every_group(heads_run):
    work, _, _, result = heads_run
    assert (work / "result/tiny/lottery_nm4_table.md").exists()
    for row in result["rows"]:
        folder = work / "models/tiny/seed_0/iterative_global_nm4/low_magnitude" / f"level_{round(100 * row['target_sparsity'])}"
        mask = load_mask(folder / "mask.safetensors")[0]
        k = round(4 * row["target_sparsity"])
        for name, m in mask.items():
            assert set((~m).reshape(-1, 4).sum(1).tolist()) == {k}, name
        assert row["measured_sparsity"] == pytest.approx(row["target_sparsity"], abs=1e-6)


def test_compact_export_scores_as_the_masked_unit(heads_run, tmp_path, capsys, monkeypatch):
    from lxmert.__main__ import main

    work, cfg, result, _ = heads_run
    monkeypatch.chdir(work)
    config = tiny_yaml(tmp_path / "heads.yaml", cfg.data.root, extra=LOTTERY_EXTRA + HEADS)
    unit = "seed_0/iterative_global_heads/low_magnitude/level_60"
    out = tmp_path / "compact"
    assert main(["export", "--config", str(config), "--unit", unit, "--out", str(out), "--compact"]) == 0
    card = json.loads((out / "export.json").read_text())
    assert card["compact"]["heads"]["kept"] == 4 and card["compact"]["heads"]["of"] == 10
    # a head is 4 x 16 x 32 weights and 3 x 16 biases; a module that loses both heads keeps one, silenced
    removed = sum(2 - max(1, len(kept)) for kept in card["compact"]["heads"]["modules"].values())
    assert card["compact"]["parameters"]["after"] == card["compact"]["parameters"]["before"] - removed * (4 * 16 * 32 + 3 * 16)
    capsys.readouterr()
    assert main(["evaluate", "--config", str(config), "--unit", unit]) == 0
    out_text = capsys.readouterr().out
    masked = json.loads(out_text[out_text.index("\n{") + 1:])
    assert main(["evaluate", "--config", str(config), "--exported", str(out)]) == 0
    out_text = capsys.readouterr().out
    compact = json.loads(out_text[out_text.index("\n{") + 1:])
    assert compact == masked and set(compact) == {"minival", "test"}
    assert main(["evaluate", "--config", str(config), "--exported", str(tmp_path)]) == 2
    assert "no compact.safetensors" in capsys.readouterr().err


def test_compact_model_equals_masked_model_with_whole_modules_removed():
    model = _model()
    prunable = prunable_tensors(model)
    mask = full_mask(model, prunable)
    mask = st.prune_structured("low_magnitude", model, prunable, mask, 0.9, "heads", "global", 0, 0.9)
    mask = st.prune_structured("high_magnitude", model, prunable, mask, 0.5, "neurons", "layer", 0, 0.5)
    apply_mask(model, mask)
    batch = _batch()
    with torch.no_grad():
        reference = model(batch)[0]
    structure = st.compact_structure(model, prunable)
    assert sum(len(v) == 0 for v in structure["heads"].values()) >= 3, "some modules lose every head"
    st.shrink(model, structure)
    with torch.no_grad():
        assert torch.allclose(model(batch)[0], reference, atol=1e-6)
    assert all(len(v) == 32 for v in structure["neurons"].values())


def test_modes_rank_units_as_the_unstructured_modes_rank_weights():
    model = _model()
    prunable = prunable_tensors(model)
    groups = st.structure_groups(model, "neurons", prunable)
    importance = st.magnitude_importance(model, groups)
    full = full_mask(model, prunable)
    low = _dead_heads(st.prune_structured("low_magnitude", model, prunable, full, 0.25, "neurons", "global", 0, 0.25),
                      groups)
    high = _dead_heads(st.prune_structured("high_magnitude", model, prunable, full, 0.25, "neurons", "global", 0, 0.25),
                       groups)
    rand = _dead_heads(st.prune_structured("random", model, prunable, full, 0.25, "neurons", "global", 0, 0.25), groups)
    scores = np.concatenate(importance)
    low_all, high_all = np.concatenate(low), np.concatenate(high)
    assert low_all.sum() == high_all.sum() == round(0.25 * len(scores))
    assert scores[low_all].max() <= scores[~low_all].min() and scores[high_all].min() >= scores[~high_all].max()
    assert [int(r.sum()) for r in rand] == [int(x.sum()) for x in low], "random: low magnitude's per-module counts"
    assert not all(np.array_equal(a, b) for a, b in zip(rand, low))
    # a neuron's magnitude is the RMS of its row and column
    g = groups[0]
    row = model.get_parameter(g.rows[0])[5].detach()
    col = model.get_parameter(g.cols[0])[:, 5].detach()
    assert importance[0][5] == pytest.approx(float(torch.cat([row, col]).pow(2).mean().sqrt()), rel=1e-5)


def test_gradient_importance_is_michel_et_al_s_token_sum():
    """Their code's score (classifier_eval.py lines 236-252): sum over tokens and examples of
    |A_h(x)^T dL/dA_h(x)|, A_h the head's part of the attention output, normalised per module; computed here
    independently from the heads' concatenation and its gradient, for the cross attention used in both
    directions."""
    model = _model().double()
    prunable = prunable_tensors(model)
    groups = st.structure_groups(model, "heads", prunable)
    batches = [{k: (v.double() if v.is_floating_point() else v) for k, v in _batch(2, seed=s).items()}
               for s in range(2)]

    def loss_of(b):
        return torch.nn.functional.binary_cross_entropy_with_logits(model(b)[0], b["target"], reduction="sum")

    importance = st.gradient_importance(model, groups, batches, loss_of)
    index = [g.module for g in groups].index("encoder.encoder.x_layers.0.visual_attention.att")
    g = groups[index]
    dense = model.get_submodule(g.cols[0].rpartition(".")[0])
    expected = torch.zeros(g.count, dtype=torch.float64)
    for b in batches:
        seen = []
        handle = dense.register_forward_pre_hook(lambda _m, args: seen.append(args[0]) or None)
        loss = loss_of(b)
        handle.remove()
        grads = torch.autograd.grad(loss, seen, allow_unused=True)
        for x, grad in zip(seen, grads):
            if grad is None:  # the last layer's vision -> language direction: unused by the pooled output
                continue
            dot = (x * grad).reshape(*x.shape[:-1], g.count, g.size).sum(-1)  # A_h . dL/dA_h per token
            expected += dot.detach().abs().reshape(-1, g.count).sum(0)
    expected = (expected / expected.norm()).detach().numpy()
    assert len(seen) == 2, "the cross attention runs twice (language -> vision, vision -> language)"
    assert np.allclose(importance[index], expected, rtol=1e-8)
    norms = [float(np.linalg.norm(i)) for i in importance]
    # the last cross-modality layer's vision self-attention never reaches the pooled (language CLS) output
    silent = [g.module for g in groups].index("encoder.encoder.x_layers.0.visn_self_att.self")
    assert norms[silent] == 0.0 and all(n == pytest.approx(1.0) for i, n in enumerate(norms) if i != silent), norms


def test_structured_settings_that_do_not_exist_are_refused():
    cases = {("lottery.granularity=heads", "lottery.modes=[original_high]", "lottery.schedule=oneshot"): "original_high",
             ("lottery.granularity=neurons", "lottery.scope=survivors"): "lottery.scope",
             ("lottery.granularity=n_m", "lottery.importance=gradient", "lottery.levels=[0.5]"): "lottery.importance",
             ("lottery.granularity=n_m", "lottery.levels=[0.3]"): "multiples of 1/4",
             ("lottery.granularity=rows",): "lottery.granularity"}
    for overrides, text in cases.items():
        with pytest.raises(ConfigError, match=text):
            tiny_config("unused", extra=list(overrides))


def test_n_m_mask_keeps_what_was_pruned_and_refuses_odd_widths():
    model = _model()
    prunable = prunable_tensors(model)
    first = st.prune_n_m("high_magnitude", model, prunable, full_mask(model, prunable), 0.25, 4, 0, 0.25)
    second = st.prune_n_m("low_magnitude", model, prunable, first, 0.5, 4, 0, 0.5)
    for name in first:
        assert not (second[name] & ~first[name]).any()
        w = model.get_parameter(name).detach().abs().reshape(-1, 4)
        largest = w.argmax(1)
        assert not first[name].reshape(-1, 4)[torch.arange(len(w)), largest].any(), "high magnitude: the largest"
    apply_mask(model, second)
    assert measure_weights(model, prunable)["overall"] == pytest.approx(50.0)
    with pytest.raises(InputError, match=r"visn_fc.weight has 16 inputs, not a multiple of lottery.group \(3\)"):
        st.prune_n_m("low_magnitude", model, prunable, full_mask(model, prunable), 1 / 3, 3, 0, 1 / 3)
    with pytest.raises(InputError, match=r"0.5 is not a multiple of 1/3"):
        st.prune_n_m("low_magnitude", model, prunable, full_mask(model, prunable), 0.5, 3, 0, 0.5)
