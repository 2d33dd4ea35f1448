"""Pruning strategies: exact counts, the right weights, nesting, ties, and compact mask files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lxmert.core.config import ModelConfig
from lxmert.core.errors import InputError
from lxmert.modeling.vqa import build_model
from lxmert.prune.magnitude import MODES, prune
from lxmert.prune.masks import apply_mask, full_mask, load_mask, measure_mask, measure_weights, save_mask
from lxmert.prune.prunable import prunable_tensors

SCOPES = ("global", "layer")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1, x_layers=1,
                      r_layers=1, dropout=0.0)
    model = build_model(cfg, vocab_size=50, feat_dim=16, num_answers=12)
    return model, prunable_tensors(model)


def _weights(model, prunable) -> list[torch.Tensor]:
    return [model.get_parameter(t.name).detach().clone() for t in prunable]


def _pruned_abs(model, prunable, mask) -> tuple[np.ndarray, np.ndarray]:
    """|w| of the pruned and of the kept weights over the whole prunable set."""
    w = np.concatenate([model.get_parameter(t.name).detach().abs().numpy().ravel() for t in prunable])
    keep = np.concatenate([mask[t.name].numpy().ravel() for t in prunable])
    return w[~keep], w[keep]


def test_prunable_set_is_linear_weights_of_the_encoder(tiny):
    model, prunable = tiny
    names = [t.name for t in prunable]
    assert all(n.endswith(".weight") and model.get_parameter(n).ndim == 2 for n in names)
    assert not any("LayerNorm" in n or n.startswith("head.") or "embeddings" in n for n in names)
    assert {t.modality for t in prunable} == {"language", "vision", "cross", "pooler"}
    assert "encoder.encoder.visn_fc.visn_fc.weight" in names and "encoder.pooler.dense.weight" in names
    with_head = prunable_tensors(model, ["encoder.embeddings.word_embeddings.weight", "encoder.encoder.*",
                                         "encoder.pooler.*", "head.*"])
    assert len(with_head) == len(prunable) + 3
    assert with_head[0].name == "encoder.embeddings.word_embeddings.weight" and with_head[0].modality == "language"
    assert {t.modality for t in with_head[-2:]} == {"head"}
    original = prunable_tensors(model, ["encoder.encoder.layer.*", "encoder.encoder.r_layers.*",
                                        "encoder.encoder.x_layers.*", "encoder.encoder.visn_fc.visn_fc.*", "head.*"])
    assert "encoder.encoder.visn_fc.box_fc.weight" not in [t.name for t in original]
    with pytest.raises(InputError, match=r"prunable pattern\(s\) \['encoder.nothing.\*'\] match no Linear"):
        prunable_tensors(model, ["encoder.encoder.*", "encoder.nothing.*"])


EXACT = [m for m in MODES if m != "original_high"]  # original_high prunes what the low-magnitude mask keeps


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", EXACT)
@pytest.mark.parametrize("sparsity", [0.3, 0.77])
def test_exact_counts(tiny, mode, scope, sparsity):
    model, prunable = tiny
    mask = prune(mode, model, prunable, full_mask(model, prunable), sparsity, scope, seed=1)
    assert list(mask) == [t.name for t in prunable]
    pruned = {k: int((~v).sum()) for k, v in mask.items()}
    sizes = {t.name: model.get_parameter(t.name).numel() for t in prunable}
    if scope == "global":
        assert sum(pruned.values()) == round(sparsity * sum(sizes.values()))
    else:
        assert pruned == {k: round(sparsity * n) for k, n in sizes.items()}
    assert all(mask[k].shape == model.get_parameter(k).shape and mask[k].dtype == torch.bool for k in mask)


@pytest.mark.parametrize("scope", SCOPES)
def test_low_and_high_magnitude_pick_the_right_weights(tiny, scope):
    model, prunable = tiny
    low = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.4, scope)
    high = prune("high_magnitude", model, prunable, full_mask(model, prunable), 0.4, scope)
    groups = [prunable] if scope == "global" else [[t] for t in prunable]
    for group in groups:
        pruned, kept = _pruned_abs(model, group, low)
        assert pruned.max() <= kept.min()
        pruned, kept = _pruned_abs(model, group, high)
        assert pruned.min() >= kept.max()
    assert all(not torch.equal(low[k], high[k]) for k in low)


def test_random_has_the_low_magnitude_counts_per_tensor(tiny):
    model, prunable = tiny
    low = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.5, "global")
    rand = prune("random", model, prunable, full_mask(model, prunable), 0.5, "global", seed=3)
    assert {k: int((~v).sum()) for k, v in rand.items()} == {k: int((~v).sum()) for k, v in low.items()}
    pruned, kept = _pruned_abs(model, prunable, rand)
    assert pruned.max() > kept.min(), "random pruning must not be magnitude pruning"
    again = prune("random", model, prunable, full_mask(model, prunable), 0.5, "global", seed=3)
    other = prune("random", model, prunable, full_mask(model, prunable), 0.5, "global", seed=4)
    assert all(torch.equal(rand[k], again[k]) for k in rand)
    assert any(not torch.equal(rand[k], other[k]) for k in rand)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", EXACT)
def test_masks_nest_along_levels(tiny, mode, scope):
    """Each level prunes the previous mask further, even when retraining changed the weights."""
    model, prunable = tiny
    saved = _weights(model, prunable)
    try:
        mask = full_mask(model, prunable)
        previous_zeros = 0
        for level, sparsity in enumerate([0.2, 0.5, 0.8]):
            new = prune(mode, model, prunable, mask, sparsity, scope, seed=level)
            assert all(torch.all(new[k] <= mask[k]) for k in mask), "a pruned weight came back"
            zeros = sum(int((~v).sum()) for v in new.values())
            assert zeros > previous_zeros
            mask, previous_zeros = new, zeros
            with torch.no_grad():
                for t in prunable:
                    model.get_parameter(t.name).normal_()
    finally:
        with torch.no_grad():
            for t, w in zip(prunable, saved):
                model.get_parameter(t.name).copy_(w)


def test_target_below_current_mask_is_refused(tiny):
    model, prunable = tiny
    mask = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.6, "global")
    with pytest.raises(ValueError, match="below the current mask"):
        prune("low_magnitude", model, prunable, mask, 0.3, "global")
    with pytest.raises(ValueError, match="unknown pruning mode 'smallest'"):
        prune("smallest", model, prunable, mask, 0.7)
    none = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.0, "global")
    assert all(v.all() for v in none.values())


@pytest.mark.parametrize("mode", ["low_magnitude", "high_magnitude"])
def test_ties_are_broken_exactly_by_position(tiny, mode):
    model, prunable = tiny
    saved = _weights(model, prunable)
    try:
        with torch.no_grad():
            for t in prunable:
                model.get_parameter(t.name).fill_(0.5)
        total = sum(w.numel() for w in saved)
        mask = prune(mode, model, prunable, full_mask(model, prunable), 0.37, "global")
        keep = np.concatenate([mask[t.name].numpy().ravel() for t in prunable])
        k = round(0.37 * total)
        assert np.flatnonzero(~keep).tolist() == list(range(k)), "ties go to the earliest positions"
        layer = prune(mode, model, prunable, full_mask(model, prunable), 0.37, "layer")
        for t in prunable:
            flat = layer[t.name].numpy().ravel()
            assert np.flatnonzero(~flat).tolist() == list(range(round(0.37 * flat.size)))
        with torch.no_grad():
            for t in prunable:
                w = model.get_parameter(t.name)
                w.copy_(torch.randint(0, 3, w.shape).float())
        mixed = prune(mode, model, prunable, full_mask(model, prunable), 0.5, "global")
        assert sum(int((~v).sum()) for v in mixed.values()) == round(0.5 * total)
    finally:
        with torch.no_grad():
            for t, w in zip(prunable, saved):
                model.get_parameter(t.name).copy_(w)


def test_mask_file_roundtrip_is_exact_and_bit_packed(tiny, tmp_path):
    model, prunable = tiny
    modalities = {t.name: t.modality for t in prunable}
    mask = prune("random", model, prunable, full_mask(model, prunable), 0.55, "global", seed=9)
    path = tmp_path / "mask.safetensors"
    save_mask(path, mask, modalities)
    loaded, mods = load_mask(path)
    assert mods == modalities and list(loaded) == list(mask)
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], mask[k]) for k in mask)
    n = sum(v.numel() for v in mask.values())
    size = path.stat().st_size
    assert n / 8 <= size <= n / 8 + 4096 + 300 * len(mask), f"{size} bytes for {n} weights"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    from lxmert.core.errors import InputError
    from lxmert.core.files import save_tensors

    save_tensors(tmp_path / "weights.safetensors", {"a": torch.zeros(3)})
    with pytest.raises(InputError, match="not a mask file"):
        load_mask(tmp_path / "weights.safetensors")


def test_measured_sparsity_comes_from_the_weights(tiny):
    model, prunable = tiny
    saved = _weights(model, prunable)
    try:
        mask = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.6, "layer")
        apply_mask(model, mask)
        report = measure_weights(model, prunable)
        n = sum(w.numel() for w in saved)
        zeros = sum(int((~v).sum()) for v in mask.values())
        assert report["prunable"] == n and report["zeros"] == zeros
        assert report["overall"] == pytest.approx(100 * zeros / n, abs=1e-4)
        sizes = {t.name: model.get_parameter(t.name).numel() for t in prunable}
        assert report["by_tensor"] == {k: round(100 * round(0.6 * n) / n, 4) for k, n in sizes.items()}
        assert set(report["by_modality"]) == {"language", "vision", "cross", "pooler"}
        assert measure_mask(mask, {t.name: t.modality for t in prunable})["zeros"] == zeros
        first = prunable[0].name
        with torch.no_grad():
            model.get_parameter(first).zero_()
        assert measure_weights(model, prunable)["by_tensor"][first] == 100.0
    finally:
        with torch.no_grad():
            for t, w in zip(prunable, saved):
                model.get_parameter(t.name).copy_(w)


def test_survivor_rounds_follow_the_original_and_overshoot(tiny):
    """Hashemi et al.'s rounds of 10 % of each tensor's survivors: 20 % becomes 1 - 0.9^3 = 27.1 %."""
    from lxmert.prune.magnitude import survivor_counts

    assert survivor_counts([1000], [0], 0.2) == [274]  # 101, 91, 82: round(0.1 x survivors) + 1 a round
    assert survivor_counts([1000, 10], [0, 0], 0.1) == [101, 2]
    model, prunable = tiny
    mask = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.2, "survivors")
    sizes = [model.get_parameter(t.name).numel() for t in prunable]
    expected = survivor_counts(sizes, [0] * len(sizes), 0.2)
    assert [int((~mask[t.name]).sum()) for t in prunable] == expected
    assert abs(sum(expected) / sum(sizes) - 0.271) < 0.01, "three rounds: about 1 - 0.9^3"
    layer = prune("low_magnitude", model, prunable, full_mask(model, prunable), 0.2, "layer")
    assert sum(int((~m).sum()) for m in mask.values()) > sum(int((~m).sum()) for m in layer.values())
    high = prune("high_magnitude", model, prunable, full_mask(model, prunable), 0.2, "survivors")
    assert {k: int((~v).sum()) for k, v in high.items()} == {k: int((~v).sum()) for k, v in mask.items()}


def test_survivor_rounds_equal_the_original_cutoff_rule():
    """The original's round on one tensor (ghazaleh-mahmoodi/lxmert_compression,
    src/tasks/lottery_ticket_hypothesis.py, weight_prune_layer, read here as: sort the magnitudes of the
    survivors, take the one at index np.round(0.1 * survivors) as cutoff, prune every weight <= cutoff),
    repeated until the whole model reaches the level, on base-size tensors (768 x 768 and 768): the
    per-tensor counts equal survivor_counts'."""
    from lxmert.prune.magnitude import survivor_counts

    rng = np.random.default_rng(0)
    weights = [rng.normal(size=768 * 768), rng.normal(size=768)]
    pruned = [np.zeros(w.size, bool) for w in weights]
    total = sum(w.size for w in weights)
    while sum(int(p.sum()) for p in pruned) / total * 100 < 50:
        for w, p in zip(weights, pruned):
            survivors = np.sort(np.abs(w[~p]))
            cutoff = survivors[np.round(0.1 * survivors.size).astype(int)]
            p |= np.abs(w) <= cutoff
    assert survivor_counts([w.size for w in weights], [0, 0], 0.5) == [int(p.sum()) for p in pruned]


@pytest.mark.parametrize("level", [0.2, 0.5, 0.8])
def test_original_high_prunes_as_many_as_low_magnitude_keeps(tiny, level):
    """The original code's "high magnitude" (lottery_ticket_hypothesis.py lines 104-124): per tensor as many
    weights as the low-magnitude mask keeps; below 50 % every low-magnitude-pruned weight plus random others,
    from 50 % on a random subset of the low-magnitude-pruned ones; 'mirrored' starts from the mask at 1 - s."""
    model, prunable = tiny
    full = full_mask(model, prunable)
    for mirrored in (False, True):
        low = prune("low_magnitude", model, prunable, full, 1 - level if mirrored else level, "layer")
        high = prune("original_high", model, prunable, full, level, "layer", seed=5, salt=level, mirrored=mirrored)
        for k in low:
            assert int((~high[k]).sum()) == int(low[k].sum()), k
            if int(low[k].sum()) > int((~low[k]).sum()):
                assert bool((~high[k])[~low[k]].all()), "below 50 %: every low-magnitude-pruned weight goes"
            else:
                assert bool(high[k][low[k]].all()), "from 50 %: only low-magnitude-pruned weights go"
        again = prune("original_high", model, prunable, full, level, "layer", seed=5, salt=level, mirrored=mirrored)
        assert all(torch.equal(high[k], again[k]) for k in high)

