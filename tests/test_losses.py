"""Losses against hand-computed values, the question-type prior, and trainability of the LMH parts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lxmert.core.config import DebiasConfig
from lxmert.modeling.losses import BCELoss, LMHLoss, LPFLoss, SparseTargets, make_loss, question_type_prior


def _entropy2(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- prior -------------------------------------------------------------------------------------------

def _csr_example() -> tuple[np.ndarray, SparseTargets]:
    # q0 (type 0): {a0: 1.0, a1: 0.3}; q1 (type 0): no in-vocab answer; q2 (type 1): {a2: 0.6};
    # q3 (type 0): {a0: 0.3}. Type 2 has no question.
    qtype = np.array([0, 0, 1, 0])
    targets = SparseTargets(ptr=np.array([0, 2, 2, 3, 4]), idx=np.array([0, 1, 2, 0]),
                            score=np.array([1.0, 0.3, 0.6, 0.3], np.float32))
    return qtype, targets


def test_prior_counts_empty_questions_in_denominator():
    qtype, targets = _csr_example()
    prior = question_type_prior(qtype, targets, num_types=3, num_answers=3)
    expected = torch.tensor([[1.3 / 3, 0.3 / 3, 0.0], [0.0, 0.0, 0.6], [0.0, 0.0, 0.0]])
    assert prior.dtype == torch.float32 and prior.shape == (3, 3)
    torch.testing.assert_close(prior, expected)


def test_prior_accepts_torch_tensors():
    qtype, t = _csr_example()
    prior = question_type_prior(torch.from_numpy(qtype), tuple(torch.from_numpy(x) for x in t), 3, 3)
    torch.testing.assert_close(prior[0, 0], torch.tensor(1.3 / 3))


@pytest.mark.parametrize("bad", ["ptr", "answer", "type"])
def test_prior_rejects_inconsistent_input(bad):
    qtype, t = _csr_example()
    if bad == "ptr":
        t = SparseTargets(np.array([0, 2, 2, 3]), t.idx, t.score)
    elif bad == "answer":
        t = SparseTargets(t.ptr, np.array([0, 1, 5, 0]), t.score)
    else:
        qtype = np.array([0, 0, 3, 0])
    with pytest.raises(ValueError):
        question_type_prior(qtype, t, 3, 3)


# --- BCE ---------------------------------------------------------------------------------------------

def test_bce_sums_answers_and_averages_batch():
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    # row 0: -log(1/2) - log(1 - 3/4) = ln2 + ln4; row 1: ln2 + ln2 (any target at z = 0 costs ln2)
    expected = ((math.log(2) + math.log(4)) + 2 * math.log(2)) / 2
    assert BCELoss()(logits, target, None, None).item() == pytest.approx(expected, rel=1e-6)


# --- LMH ---------------------------------------------------------------------------------------------

def _lmh_with(prior: torch.Tensor, hidden: int, w: list[float], c: float, a: float, entropy: float) -> LMHLoss:
    loss = LMHLoss(prior, hidden, entropy_weight=entropy)
    with torch.no_grad():
        loss.gate.weight.copy_(torch.tensor([w]))
        loss.gate.bias.fill_(c)
        loss.smooth_logit.fill_(a)
    return loss


def test_lmh_simple_numbers():
    # gate g = softplus(log(e - 1)) = 1, smoothing s = sigmoid(0) = 1/2.
    loss = _lmh_with(torch.tensor([[0.5, 0.25]]), 2, [0.0, 0.0], math.log(math.e - 1), 0.0, 0.36)
    logits = torch.tensor([[math.log(3), 0.0]])
    target = torch.tensor([[0.6, 1.0]])
    # answer 0: b = .5 -> bias pair (log 1, log 1) = (0, 0): p1 = sigmoid(ln 3) = .75; bias entropy ln2.
    # answer 1: b = .25 -> bias (log .75, log 1.25); model (log .5, log .5); p1 = .375/(.375+.625) = .375.
    bce = -(0.6 * math.log(0.75) + 0.4 * math.log(0.25)) - math.log(0.375)
    ent = (math.log(2) + _entropy2(0.375)) / 2  # mean over batch x answers (1 x 2), as Clark et al.
    got = loss(logits, target, torch.zeros(1, 2), torch.tensor([0]))
    assert got.item() == pytest.approx(bce + 0.36 * ent, rel=1e-6)


def test_lmh_batch_with_gate_and_default_smoothing():
    prior = torch.tensor([[0.1, 0.7, 0.0], [0.4, 0.0, 1.0]])
    w, c = [0.5, -0.25], 0.3
    loss = LMHLoss(prior, 2, entropy_weight=0.36)
    with torch.no_grad():
        loss.gate.weight.copy_(torch.tensor([w]))
        loss.gate.bias.fill_(c)
    assert loss.smooth_logit.item() == -1.0
    pooled = [[1.0, 2.0], [-1.0, 0.5]]
    logits = [[0.2, -1.0, 2.0], [1.5, 0.0, -0.5]]
    target = [[0.0, 1.0, 0.3], [0.6, 0.0, 0.9]]
    qtype = [1, 0]
    s = _sigmoid(-1.0)
    total_bce = total_ent = 0.0
    for i in range(2):
        g = math.log1p(math.exp(w[0] * pooled[i][0] + w[1] * pooled[i][1] + c))
        for a in range(3):
            b, z, y = prior[qtype[i]][a].item(), logits[i][a], target[i][a]
            u1, u0 = _sigmoid(z) * (b + s) ** g, (1 - _sigmoid(z)) * (1 - b + s) ** g
            p1 = u1 / (u1 + u0)
            total_bce -= y * math.log(p1) + (1 - y) * math.log(1 - p1)
            total_ent += _entropy2((b + s) ** g / ((b + s) ** g + (1 - b + s) ** g))
    expected = total_bce / 2 + 0.36 * total_ent / (2 * 3)  # BCE: mean over batch; entropy: over batch x answers
    got = loss(torch.tensor(logits), torch.tensor(target), torch.tensor(pooled), torch.tensor(qtype))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_lmh_gate_and_smoothing_train_with_adamw():
    torch.manual_seed(0)
    loss = LMHLoss(torch.rand(3, 5), hidden=4)
    before = {n: p.detach().clone() for n, p in loss.named_parameters()}
    assert set(before) == {"gate.weight", "gate.bias", "smooth_logit"}
    opt = torch.optim.AdamW(loss.parameters(), lr=0.01)
    logits = torch.randn(6, 5, requires_grad=True)
    value = loss(logits, torch.rand(6, 5), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    value.backward()
    opt.step()
    for name, p in loss.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_lmh_gate_stays_fp32_under_autocast():
    torch.manual_seed(0)
    loss = LMHLoss(torch.rand(3, 5), hidden=4)
    args = (torch.randn(6, 5), torch.rand(6, 5), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(*args)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(loss(*args).item(), rel=1e-6)


def test_lmh_prior_not_in_state_dict_and_follows_device():
    loss = LMHLoss(torch.rand(2, 3), hidden=4)
    assert "prior" not in loss.state_dict()
    assert loss.prior in list(loss.buffers())


# --- LPF ---------------------------------------------------------------------------------------------

def test_lpf_hand_value_excludes_empty_rows():
    prior = torch.tensor([[0.5, 0.1, 0.0], [0.2, 0.2, 0.2]])
    logits = torch.tensor([[0.0, math.log(2), 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.5]], requires_grad=True)
    target = torch.tensor([[0.3, 1.0, 0.0], [0.6, 0.0, 0.0], [0.0, 0.0, 0.0]])
    qtype = torch.tensor([0, 1, 0])
    # q0: a* = 1, b = .1, weight .9^2, p = 2/4; q1: a* = 0, b = .2, weight .8^2, p = 1/3; q2: excluded.
    expected = (0.81 * math.log(2) + 0.64 * math.log(3)) / 2
    value = LPFLoss(prior, gamma=2.0)(logits, target, None, qtype)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    # d/dz of weight * -log softmax(z)[a*] / 2 = weight * (softmax - onehot) / 2; no gradient through weight.
    torch.testing.assert_close(logits.grad[0], 0.81 * torch.tensor([0.25, -0.5, 0.25]) / 2)
    torch.testing.assert_close(logits.grad[2], torch.zeros(3))


def test_lpf_all_zero_targets_are_deterministic_and_finite():
    loss = LPFLoss(torch.rand(2, 4), gamma=5.0)
    logits = torch.randn(3, 4, requires_grad=True)
    zeros = torch.zeros(3, 4)
    values = [loss(logits, zeros, None, torch.tensor([0, 1, 0])) for _ in range(2)]
    assert values[0].item() == 0.0 and values[1].item() == 0.0
    values[0].backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))


def test_lpf_tie_takes_lowest_answer_index():
    prior = torch.tensor([[0.5, 0.0]])
    logits = torch.tensor([[0.0, 0.0]])
    value = LPFLoss(prior, gamma=1.0)(logits, torch.tensor([[0.6, 0.6]]), None, torch.tensor([0]))
    assert value.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)


# --- factory -----------------------------------------------------------------------------------------

def test_make_loss_uses_config():
    cfg = DebiasConfig(lmh_entropy=0.5, lpf_gamma=3.0)
    prior = torch.rand(2, 3)
    assert isinstance(make_loss("bce", None, 8, cfg), BCELoss)
    lmh = make_loss("lmh", prior, 8, cfg)
    assert isinstance(lmh, LMHLoss) and lmh.entropy_weight == 0.5 and lmh.gate.in_features == 8
    lpf = make_loss("lpf", prior, 8, cfg)
    assert isinstance(lpf, LPFLoss) and lpf.gamma == 3.0
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("focal", prior, 8, cfg)
    with pytest.raises(ValueError, match="prior"):
        make_loss("lpf", None, 8, cfg)


def test_blind_baseline_trains_with_the_named_loss(tiny_data):
    """The question-only row beside an LMH or LPF row is trained with that loss: LPF's reweighting and LMH's
    prior ensemble give a blind model other predictions than BCE (same seed, data and schedule), and the
    same loss twice gives the same numbers."""
    from lxmert.core.config import BlindConfig
    from lxmert.modeling.losses import question_type_prior
    from lxmert.train.blind import train_blind

    train = tiny_data.train
    sp = train.split
    prior = question_type_prior(train.qtypes, (sp.label_ptr, sp.label_idx, sp.label_score),
                                len(tiny_data.qtype_index) + 1, tiny_data.num_answers)
    evals = {"minival": tiny_data.valid}
    vocab = len(tiny_data.tokenizer)
    runs = {loss: train_blind(train, evals, vocab, seed=0, settings=BlindConfig(epochs=2), loss=loss, prior=prior)
            for loss in ("bce", "lmh", "lpf")}
    assert runs["lpf"] == train_blind(train, evals, vocab, seed=0, settings=BlindConfig(epochs=2), loss="lpf", prior=prior)
    scores = {loss: r["minival"]["overall"] for loss, r in runs.items()}
    assert scores["lpf"] != scores["bce"] and scores["lmh"] != scores["bce"], scores
    with pytest.raises(ValueError, match="prior"):
        train_blind(train, evals, vocab, seed=0, settings=BlindConfig(epochs=1), loss="lpf", prior=None)
