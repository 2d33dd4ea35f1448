"""run/configs/vqa_v2_original.yaml with every switch at the original's value reproduces the original study's
prunable set and low-magnitude masks on a converted checkpoint, as its code computes them
(ghazaleh-mahmoodi/lxmert_compression b93d9d2, lxmert/src/tasks/lottery_ticket_hypothesis.py), written here
loop by loop from that description, independent of the project's pruning code."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LxmertConfig, LxmertForPreTraining

from lxmert.core.config import load_config
from lxmert.modeling.convert import convert
from lxmert.modeling.vqa import build_model
from lxmert.prune.magnitude import prune
from lxmert.prune.masks import full_mask
from lxmert.prune.prunable import prunable_tensors

REPO = Path(__file__).resolve().parents[1]
ANSWERS = ["yes", "no", "2", "red", "dog"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny release checkpoint (the release's key names and order, trained-like random values: no ties)
    converted as data/README.md says, and the order of its keys in the original's fine-tuned model."""
    torch.manual_seed(0)
    config = LxmertConfig(vocab_size=120, hidden_size=24, num_attention_heads=2, intermediate_size=48, l_layers=2,
                          x_layers=1, r_layers=1, visual_feat_dim=32, num_qa_labels=len(ANSWERS))
    model = LxmertForPreTraining(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    state = {("bert." + k.removeprefix("lxmert.")) if k.startswith("lxmert.") else k: v.clone()
             for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("original")
    torch.save(state, folder / "model_LXRT.pth")
    (folder / "all_ans.json").write_text(json.dumps([{"ans": a} for a in ANSWERS]))
    (folder / "ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    convert(folder / "model_LXRT.pth", folder / "ans2label.json", folder / "converted",
            pretrained_answers=folder / "all_ans.json", num_attention_heads=2, log=lambda m: None)
    # their VQA model: the encoder's keys in the release's order, then the QA head (logit_fc)
    keys = [k for k in state if k.startswith("bert.")] + [k for k in state if k.startswith("answer_head.logit_fc.")]
    return folder / "converted", keys


def _preset(converted_folder: Path):
    cfg = load_config(REPO / "run/configs/vqa_v2_original.yaml",
                      [f"model.pretrained={converted_folder}", "model.hidden_size=24", "model.num_attention_heads=2",
                       "model.intermediate_size=48", "model.l_layers=2", "model.x_layers=1", "model.r_layers=1"])
    model = build_model(cfg.model, 120, 32, len(ANSWERS), answers=ANSWERS)
    with torch.no_grad():  # retrained-like weights: no two equal magnitudes at a round's cutoff
        for p in model.parameters():
            p.normal_(std=0.5)
    return cfg, model


def _ours(name: str) -> str:
    return "encoder." + name.removeprefix("bert.") if name.startswith("bert.") else \
        "head." + name.removeprefix("answer_head.logit_fc.")


def test_the_preset_sets_every_switch_to_the_original(converted):
    cfg, _ = _preset(converted[0])
    lc, t = cfg.lottery, cfg.train
    assert (lc.schedule, lc.scope, lc.prune_from, lc.rewind_steps) == ("oneshot", "survivors", "best", 0)
    assert not lc.enforce_masks and lc.prune_all_parameters and lc.original_high_level == "mirrored"
    assert lc.modes == ["low_magnitude", "random", "original_high"]
    assert (t.optimizer, t.weight_decay, t.dense_seed, t.lr, t.batch_size, t.epochs, t.warmup, t.clip) == \
        ("bertadam", 0.01, 9595, 5e-5, 32, 4, 0.1, 5.0)


def test_the_preset_prunes_the_original_set(converted):
    """Their rule over their model's state dict: every key but indices 0-4 and 6-12 and the last one
    (lottery_ticket_hypothesis.py line 56 and lines 12, 62, 70)."""
    folder, keys = converted
    cfg, model = _preset(folder)
    theirs = [_ours(k) for i, k in enumerate(keys) if i not in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12)
              and i != len(keys) - 1]
    ours = prunable_tensors(model, cfg.lottery.prunable, cfg.lottery.prune_all_parameters)
    assert sorted(t.name for t in ours) == sorted(theirs)
    assert sum(model.get_parameter(t.name).numel() for t in ours) == \
        sum(model.get_parameter(n).numel() for n in theirs)
    assert "encoder.encoder.visn_fc.visn_fc.weight" in theirs and "head.3.bias" not in theirs


def _their_low_magnitude(weights: dict[str, np.ndarray], sparsity: int) -> dict[str, np.ndarray]:
    """weight_prune_layer(w, 0.1, mask) on every tensor per round (|w| of the unpruned sorted, cutoff at index
    round(0.1 x unpruned), |w| <= cutoff pruned) until 100 x pruned / total >= sparsity (lines 20-95); mask
    1 = pruned."""
    masks = {k: np.zeros(w.shape) for k, w in weights.items()}
    total = sum(w.size for w in weights.values())
    while True:
        for k, w in weights.items():
            alive = np.abs(w[masks[k] == 0])
            if alive.size:
                cutoff = np.sort(alive)[int(np.round(0.1 * alive.size))] if alive.size > 1 else alive[0]
                masks[k][(np.abs(w) <= cutoff) & (masks[k] == 0)] = 1
        if sum(int(m.sum()) for m in masks.values()) / total * 100 >= sparsity:
            return masks


@pytest.mark.parametrize("level", [0.2, 0.5, 0.9])
def test_the_preset_gives_the_original_low_magnitude_masks(converted, level):
    cfg, model = _preset(converted[0])
    prunable = prunable_tensors(model, cfg.lottery.prunable, cfg.lottery.prune_all_parameters)
    ours = prune("low_magnitude", model, prunable, full_mask(model, prunable), level, cfg.lottery.scope)
    theirs = _their_low_magnitude({t.name: model.get_parameter(t.name).detach().numpy() for t in prunable},
                                  int(round(100 * level)))
    for t in prunable:
        assert np.array_equal(~ours[t.name].numpy(), theirs[t.name] == 1), t.name
