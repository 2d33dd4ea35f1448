"""bench/inference.py at a small size: the CSR layer computes what the masked Linear does, the uniform and the
embedded-derived structures keep the right unit counts, every compact model equals its masked model, and the
docs section is replaced rather than appended twice."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bench import inference as inf
from bench.training import Size
from lxmert.core.config import ModelConfig
from lxmert.core.files import write_json
from lxmert.prune import structure as st
from lxmert.prune.masks import full_mask, save_mask
from lxmert.prune.prunable import prunable_tensors

SMALL = Size("small", ModelConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, l_layers=2,
                                  x_layers=1, r_layers=1), vocab=50, regions=6, feat_dim=32, tokens=10, answers=12,
             cpu_batch=4, gpu_batch=4, cpu_steps=1, gpu_steps=1)


@pytest.fixture(scope="module")
def bench():
    return inf.Bench(SMALL)


def test_csr_linear_computes_the_masked_linear():
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.8)
    x = torch.randn(3, 5, 48)
    csr = inf.CSRLinear(linear)
    assert torch.allclose(csr(x), linear(x), atol=1e-5)
    assert csr(x).is_contiguous() and csr(x).shape == (3, 5, 40)
    model = nn.Sequential(csr)
    nonzero = int((linear.weight != 0).sum())
    values, nbytes = inf.stored(model)
    assert values == nonzero + 40  # the kept weights and the bias
    assert nbytes == 4 * (nonzero + 40) + 8 * (nonzero + 41)  # float values, int64 column indices and row pointers


def test_uniform_structures_keep_the_same_units_in_every_module(bench):
    heads, neurons = bench.uniform("heads", 0.5), bench.uniform("neurons", 0.9)
    assert heads.removed == (2,) * len(bench.groups["heads"])  # 2 of 4 heads
    assert neurons.removed == (115,) * len(bench.groups["neurons"])  # round(0.9 * 128)
    compact = bench.build(heads)  # raises when its logits differ from the masked model's
    for g in bench.groups["heads"]:
        assert compact.get_submodule(g.module).query.out_features == 2 * 16
    compact = bench.build(neurons)
    for g in bench.groups["neurons"]:
        assert compact.get_submodule(g.module).out_features == 13
    assert inf.stored(compact)[0] < inf.stored(bench.dense)[0]
    assert bench.label(heads) == "heads compact, 2/4 kept per module (50 % removed)"


def test_csr_model_equals_the_masked_model_and_stores_only_kept_weights(bench):
    model = bench.build(inf.Variant("csr", 0.7))
    assert sum(isinstance(m, inf.CSRLinear) for m in model.modules()) == len(bench.prunable)
    masked = bench.build(inf.Variant("masked", 0.7))
    assert inf.stored(model)[0] < inf.stored(masked)[0] == inf.stored(bench.dense)[0]
    with torch.no_grad():
        assert torch.allclose(model(bench.check)[0], masked(bench.check)[0], atol=1e-4)


def test_embedded_masks_map_to_base_roles(bench, tmp_path):
    """A ticket of a 1-layer model keeping half the language heads and a quarter of the cross attention's: the
    fractions read from its mask, applied to every module of the same role in the 2-layer model."""
    settings = {"model.family": "lxmert", "model.hidden_size": 32, "model.num_attention_heads": 4,
                "model.intermediate_size": 64, "model.l_layers": 1, "model.x_layers": 1, "model.r_layers": 1}
    model = inf.embedded_model(settings, {"encoder.encoder.visn_fc.visn_fc.weight": torch.ones(32, 16)})
    prunable = prunable_tensors(model)
    groups = st.structure_groups(model, "heads", prunable)
    pruned = [np.array([True, True, False, False]) if ".layer.0." in g.module
              else np.array([True, True, True, False]) if "visual_attention" in g.module
              else np.zeros(4, bool) for g in groups]
    mask = st.unit_mask(groups, pruned, full_mask(model, prunable))
    folder = tmp_path / "seed_0" / "chain" / "level_50"
    save_mask(folder / "mask.safetensors", mask, {t.name: t.modality for t in prunable})
    write_json(tmp_path / "seed_0" / "chain" / "settings.json", settings)
    kept = inf.kept_fractions([folder], tmp_path, "heads")
    assert kept["encoder.encoder.layer.*.attention.self"] == 0.5
    assert kept["encoder.encoder.x_layers.*.visual_attention.att"] == 0.25
    variant = bench.from_fractions("heads", kept)
    expected = [2 if ".layer." in g.module else 3 if "visual_attention" in g.module else 0
                for g in bench.groups["heads"]]
    assert list(variant.removed) == expected
    assert inf.structure_text(bench.groups["heads"], variant.removed).startswith("L 2/4, X 1/4")
    bench.build(variant)  # the compact model equals its masked model


def test_docs_section_is_replaced_not_repeated(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nolder sections\n")
    inf.replace_section(doc, "first table\n")
    inf.replace_section(doc, "second table\n")
    text = doc.read_text()
    assert text.count(inf.BEGIN) == 1 and text.count(inf.END) == 1
    assert "second table" in text and "first table" not in text and text.startswith("# Performance\n\nolder sections")
