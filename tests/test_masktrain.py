"""Mask training: straight-through gradients, exact per-tensor counts, resets, and baking the mask."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lxmert.core.config import STUDY_B_PRUNABLE, ModelConfig
from lxmert.modeling.losses import BCELoss
from lxmert.modeling.vqa import build_model
from lxmert.prune.learned import LearnedMasks, ScoreMask, sparsity_report, top_k_mask
from lxmert.prune.prunable import prunable_tensors

SPARSITY = {"language": 0.3, "vision": 0.5, "cross": 0.7, "pooler": 0.25}


def _tiny(family: str = "lxmert", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                      l_layers=1, x_layers=1, r_layers=1, num_hidden_layers=1, dropout=0.0)
    return build_model(cfg, vocab_size=30, feat_dim=8, num_answers=5)


def _batch(seed: int = 1, size: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 30, (size, 6), generator=g),
            "attention_mask": torch.ones(size, 6, dtype=torch.long),
            "visual_feats": torch.randn(size, 4, 8, generator=g), "visual_pos": torch.rand(size, 4, 4, generator=g),
            "target": torch.rand(size, 5, generator=g)}


def _numel(model, name: str) -> int:
    """Size of a weight by its plain name, also while it is parametrized."""
    return model.get_submodule(name.rsplit(".", 1)[0]).weight.numel()


WITHOUT_EMBEDDINGS = ["encoder.encoder.*", "encoder.pooler.*"]


def _expected_keep(model, sparsity: dict, patterns=STUDY_B_PRUNABLE) -> dict[str, int]:
    return {t.name: round((1 - sparsity[t.modality]) * _numel(model, t.name))
            for t in prunable_tensors(model, patterns)}


def _train_steps(model, masks: LearnedMasks, steps: int, lr: float = 0.05) -> None:
    opt = torch.optim.AdamW(masks.scores(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        batch = _batch(seed=step)
        logits, pooled = model(batch)
        BCELoss()(logits, batch["target"]).backward()
        opt.step()
        opt.zero_grad()


def test_straight_through_gradient_on_one_linear():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    scores = torch.randn(3, 4) * 0.02
    parametrize.register_parametrization(lin, "weight", ScoreMask(scores.clone()))
    x, r = torch.randn(5, 4), torch.randn(5, 3)
    (lin(x) * r).sum().backward()
    w = lin.parametrizations.weight.original.detach()
    mask = (scores > 0.01).float()
    w_eff = (w * mask).requires_grad_(True)  # independent route: gradient wrt the effective weight
    (nn.functional.linear(x, w_eff, lin.bias.detach()) * r).sum().backward()
    score_grad = lin.parametrizations.weight[0].scores.grad
    torch.testing.assert_close(score_grad, w_eff.grad * w)
    torch.testing.assert_close(lin.weight, w * mask)
    assert 0 < int(mask.sum()) < 12  # some weights pruned, some kept, yet every score gets a gradient
    assert bool((score_grad != 0).all())


def test_top_k_mask_exact_with_ties_to_lowest_index():
    values = torch.tensor([[1.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    assert top_k_mask(values, 3).tolist() == [[True, True, False], [False, False, True]]
    assert top_k_mask(values, 4).tolist() == [[True, True, True], [False, False, True]]
    assert not top_k_mask(values, 0).any() and top_k_mask(values, 6).all()


def test_initial_masks_are_exact_magnitude_top_k():
    model = _tiny()
    masks = LearnedMasks(model, SPARSITY)
    current = masks.current_masks()
    assert current.keys() == _expected_keep(model, SPARSITY).keys()
    for e in masks.entries:
        mask = current[e.name]
        assert int(mask.sum()) == _expected_keep(model, SPARSITY)[e.name], e.name
        w = e.module.parametrizations.weight.original.abs()
        assert w[mask].min() >= w[~mask].max()
        scores = e.parametrization.scores.detach()
        torch.testing.assert_close(scores[mask], torch.full((int(mask.sum()),), 0.02))
        assert bool((scores[~mask] == 0).all())
        assert not e.module.parametrizations.weight.original.requires_grad
    assert "encoder.embeddings.word_embeddings.weight" in current, "study B masks the word embeddings (language)"
    assert masks.entries[0].modality == "language"


def test_training_then_reset_gives_exact_counts_and_keeps_weights_frozen():
    model = _tiny()
    masks = LearnedMasks(model, SPARSITY)
    originals = {e.name: e.module.parametrizations.weight.original.detach().clone() for e in masks.entries}
    initial = masks.current_masks()
    frozen_named = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".original")}
    _train_steps(model, masks, steps=4)
    drifted = masks.current_masks()
    assert any(not torch.equal(drifted[n], initial[n]) for n in initial)
    before = {e.name: e.parametrization.scores.detach().clone() for e in masks.entries}
    masks.reset_thresholds()
    expected = _expected_keep(model, SPARSITY)
    for e in masks.entries:
        mask = masks.current_masks()[e.name]
        assert int(mask.sum()) == expected[e.name], e.name
        old = before[e.name]
        assert old[mask].min() >= old[~mask].max()  # the kept set is the top-k of the scores before reset
        assert torch.equal(e.module.parametrizations.weight.original, originals[e.name])
    for n, p in model.named_parameters():
        if n.endswith(".original"):
            assert torch.equal(p, frozen_named[n]), n


def test_reset_with_tied_scores_is_exact_and_deterministic():
    model = _tiny()
    masks = LearnedMasks(model, 0.5)
    for s in masks.scores():
        with torch.no_grad():
            s.fill_(0.05)
    masks.reset_thresholds()
    for e in masks.entries:
        flat = masks.current_masks()[e.name].reshape(-1)
        keep = round(0.5 * flat.numel())
        assert flat[:keep].all() and not flat[keep:].any()


def test_remove_bakes_zeros_and_leaves_a_plain_model():
    model = _tiny()
    keys_before = set(model.state_dict())
    masks = LearnedMasks(model, SPARSITY)
    _train_steps(model, masks, steps=2)
    masks.reset_thresholds()
    batch = _batch(seed=9)
    with torch.no_grad():
        masked_logits, _ = model(batch)
    originals = {e.name: e.module.parametrizations.weight.original.detach().clone() for e in masks.entries}
    baked = masks.remove()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == keys_before
    assert all(p.requires_grad for p in model.parameters())
    params = dict(model.named_parameters())
    expected = _expected_keep(model, SPARSITY)
    for name, mask in baked.items():
        w = params[name].detach()
        assert int(mask.sum()) == expected[name]
        assert bool((w[~mask] == 0).all())
        assert torch.equal(w[mask], originals[name][mask])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0], masked_logits)
    with pytest.raises(RuntimeError):
        masks.current_masks()


def test_checkpoint_of_masked_model_loads_back():
    model = _tiny()
    masks = LearnedMasks(model, SPARSITY)
    _train_steps(model, masks, steps=1)
    other = _tiny(seed=5)
    other_masks = LearnedMasks(other, SPARSITY)
    other.load_state_dict(model.state_dict())
    mine, theirs = masks.current_masks(), other_masks.current_masks()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_sparsity_report_counts():
    model = _tiny()
    masks = LearnedMasks(model, SPARSITY)
    report = sparsity_report(masks.current_masks(), model)
    keep = _expected_keep(model, SPARSITY)
    for modality in SPARSITY:
        names = [t.name for t in prunable_tensors(model, STUDY_B_PRUNABLE) if t.modality == modality]
        total = sum(_numel(model, n) for n in names)
        zeros = total - sum(keep[n] for n in names)
        assert report["by_modality"][modality] == pytest.approx(100 * zeros / total, abs=1e-4)
    assert report["by_tensor"]["encoder.pooler.dense.weight"] == 25.0  # 64 of 16 x 16 pooler weights
    assert report["prunable"] == sum(_numel(model, n) for n in keep)
    assert report["zeros"] == report["prunable"] - sum(keep.values())


def test_sparsity_forms_and_validation():
    model = _tiny()
    masks = LearnedMasks(model, [0.3, 0.5, 0.7, 0.25])
    assert masks.sparsity == SPARSITY
    with pytest.raises(RuntimeError, match="already parametrized"):
        LearnedMasks(model, 0.5)
    masks.remove()
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        LearnedMasks(_tiny(), {**SPARSITY, "audio": 0.5})
    with pytest.raises(ValueError, match="'cross'"):
        LearnedMasks(_tiny(), {**SPARSITY, "cross": 1.0})
    with pytest.raises(ValueError, match="'vision'"):
        LearnedMasks(_tiny(), {**SPARSITY, "vision": -0.1})
    with pytest.raises(ValueError, match="pooler"):
        LearnedMasks(_tiny(), {"language": 0.3, "vision": 0.5, "cross": 0.7})


VISUALBERT_PRUNABLE = ["encoder.embeddings.visual_projection.*", "encoder.encoder.*", "encoder.pooler.*"]


def test_visualbert_ignores_absent_language_modality():
    model = _tiny("visualbert")
    masks = LearnedMasks(model, SPARSITY, VISUALBERT_PRUNABLE)
    assert set(masks.sparsity) == {"vision", "cross", "pooler"}
    for name, keep in _expected_keep(model, SPARSITY, VISUALBERT_PRUNABLE).items():
        assert int(masks.current_masks()[name].sum()) == keep
