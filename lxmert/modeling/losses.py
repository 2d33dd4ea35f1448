"""VQA training losses: plain BCE and the two debiasing losses of study B (LMH and LPF).

All losses share one call signature, forward(logits, target, pooled, qtype) -> scalar, so the trainer
never branches on the loss. Their learnable parts (the LMH gate and smoothing) are parameters of the
loss module: the trainer must put `loss.parameters()` into its optimizer (the original code left them
out, so they were never trained). At test time only the logits are used; no loss is involved.

The debiasing losses need the question-type answer prior b (see `question_type_prior`), computed from
the training split only.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DebiasConfig

LOSSES = ("bce", "lmh", "lpf")


class SparseTargets(NamedTuple):
    """Soft answer scores of N questions as CSR arrays: question i owns entries ptr[i]:ptr[i+1].

    Dense [N, 3129] targets for 600k questions would take 7.5 GB; the CSR form is what data.Split holds.
    """

    ptr: torch.Tensor | np.ndarray
    idx: torch.Tensor | np.ndarray
    score: torch.Tensor | np.ndarray


def question_type_prior(qtype_index: torch.Tensor | np.ndarray, targets: SparseTargets | tuple,
                        num_types: int, num_answers: int) -> torch.Tensor:
    """b[t, a] = (sum of the soft scores of answer a over training questions of type t) / (their count).

    Not normalised over answers. Questions without any in-vocabulary answer (empty CSR rows) still count
    in the denominator, since they are part of the type's questions. A type with no training question
    (e.g. the 'unknown' type that the datasets give to types unseen in training) gets an all-zero row.
    Accumulated in float64 so that 600k questions do not lose precision; returned as float32.
    """
    qtype = torch.as_tensor(np.asarray(qtype_index), dtype=torch.long)
    ptr, idx, score = (torch.as_tensor(np.asarray(x)) for x in targets)
    ptr, idx, score = ptr.long(), idx.long(), score.double()
    _check_csr(qtype, ptr, idx, score, num_types, num_answers)
    row_of_entry = torch.repeat_interleave(torch.arange(len(qtype)), ptr[1:] - ptr[:-1])
    flat = qtype[row_of_entry] * num_answers + idx
    sums = torch.zeros(num_types * num_answers, dtype=torch.float64).index_add_(0, flat, score)
    counts = torch.bincount(qtype, minlength=num_types).double().clamp(min=1)
    return (sums.view(num_types, num_answers) / counts[:, None]).float()


def _check_csr(qtype: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, score: torch.Tensor,
               num_types: int, num_answers: int) -> None:
    """Fail loudly on inconsistent inputs instead of silently building a wrong prior."""
    n = len(qtype)
    if ptr.shape != (n + 1,) or int(ptr[0]) != 0 or int(ptr[-1]) != len(idx) or len(idx) != len(score):
        raise ValueError(f"targets are not a CSR layout for {n} questions: ptr has shape {tuple(ptr.shape)}, "
                         f"{len(idx)} indices, {len(score)} scores")
    if bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError("targets: ptr must be non-decreasing")
    if n and (int(qtype.min()) < 0 or int(qtype.max()) >= num_types):
        raise ValueError(f"question type index out of range [0, {num_types})")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= num_answers):
        raise ValueError(f"answer index out of range [0, {num_answers})")


class BCELoss(nn.Module):
    """Binary cross-entropy with logits, summed over answers and averaged over the batch.

    Equals the LXMERT recipe 'mean BCE x number of answers'.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor, pooled: Optional[torch.Tensor] = None,
                qtype: Optional[torch.Tensor] = None) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
        return bce.sum(1).mean()


class LMHLoss(nn.Module):
    """Learned-mixin + H (Clark et al., 2019), binary (per-answer) form used for VQA.

    For every answer the model's pair (log sigma(z), log(1 - sigma(z))) is added to the bias pair
    g * (log(b + s), log(1 - b + s)) and renormalised over the two (a two-way log-softmax); the result is
    scored with BCE against the soft target. The gate g = softplus(w.h + c) >= 0 lets the model learn how
    much to trust the question-type prior b for each question; the smoothing s = sigmoid(a) keeps log(b + s)
    finite where b = 0. The entropy term penalises a bias pair that the gate flattens into uselessness
    (g -> 0), which is the degenerate solution without it.

    Reduction: the BCE part is summed over answers and averaged over the batch, the entropy part is
    averaged over batch x answers (A times weaker than a sum over answers):
        loss = mean_i sum_a -(y log p1 + (1 - y) log p0) + entropy_weight * mean_{i,a} H(q_ia),
    with H(q) = -(q1 log q1 + q0 log q0) the entropy of the renormalised bias pair q = softmax(bias pair).
    Both reductions as in Clark et al.'s LearnedMixin.forward (chrisc36/bottom-up-attention-vqa,
    vqa_debias_loss_functions.py line 173 `.sum(1).mean(0)` and line 180 `.sum(2).mean()`) and in Si et al.'s
    copy (PhoebusSi/Compress-Robust-VQA, hg_transformers/vqa_debias_loss_functions.py lines 181-184 and 194;
    theirs also zeroes NaN rows of the BCE sum, which a finite loss never has).
    """

    def __init__(self, prior: torch.Tensor, hidden: int, entropy_weight: float = 0.36):
        super().__init__()
        _check_prior(prior)
        self.register_buffer("prior", prior.detach().float().clamp(0.0, 1.0), persistent=False)
        self.gate = nn.Linear(hidden, 1)
        self.smooth_logit = nn.Parameter(torch.tensor(-1.0))
        self.entropy_weight = float(entropy_weight)

    def bias_pair(self, pooled: torch.Tensor, qtype: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated bias log-scores g*log(b+s), g*log(1-b+s), each [B, A].

        The gate runs in fp32 even under autocast: bf16 would coarsen g, which scales every log term.
        The pooled output is not detached, so the encoder also learns to drive the gate (as in LMH).
        """
        with torch.autocast(pooled.device.type, enabled=False):
            g = F.softplus(self.gate(pooled.float()))
        s = torch.sigmoid(self.smooth_logit)
        b = self.prior[qtype]
        return g * torch.log(b + s), g * torch.log(1.0 - b + s)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, pooled: torch.Tensor,
                qtype: torch.Tensor) -> torch.Tensor:
        z, y = logits.float(), target.float()
        bias1, bias0 = self.bias_pair(pooled, qtype)
        logp1, logp0 = _log_softmax_pair(F.logsigmoid(z) + bias1, F.logsigmoid(-z) + bias0)
        bce = -(y * logp1 + (1.0 - y) * logp0).sum(1).mean()
        q1, q0 = _log_softmax_pair(bias1, bias0)
        entropy = -(q1.exp() * q1 + q0.exp() * q0).mean()  # mean over batch x answers, not a sum over answers
        return bce + self.entropy_weight * entropy


def _log_softmax_pair(m1: torch.Tensor, m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise log-softmax over the two-way pair (m1, m0)."""
    norm = torch.logaddexp(m1, m0)
    return m1 - norm, m0 - norm


class LPFLoss(nn.Module):
    """Language-prior feedback: cross-entropy on the best answer, down-weighted by (1 - b[a*])^gamma.

    Questions whose answer the question type alone predicts well (large prior b[a*]) contribute little,
    so the model must learn from the rest. a* is the argmax of the soft target (ties: lowest answer index,
    torch.argmax's documented rule). The focal weight is computed without gradient.

    Questions with an all-zero target (no in-vocabulary answer) have no a*: they are excluded, and the loss
    is the mean over the remaining questions of the batch (0, still attached to the graph, if none remain).
    The original code drew a random label for them, which made the loss non-deterministic.
    """

    def __init__(self, prior: torch.Tensor, gamma: float = 5.0):
        super().__init__()
        _check_prior(prior)
        self.register_buffer("prior", prior.detach().float().clamp(0.0, 1.0), persistent=False)
        self.gamma = float(gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, pooled: Optional[torch.Tensor] = None,
                qtype: Optional[torch.Tensor] = None) -> torch.Tensor:
        if qtype is None:
            raise ValueError("LPFLoss needs the question types (qtype) of the batch")
        z = logits.float()
        best = target.argmax(1)
        valid = target.amax(1) > 0
        nll = -F.log_softmax(z, 1).gather(1, best[:, None]).squeeze(1)
        with torch.no_grad():
            weight = (1.0 - self.prior[qtype, best]).pow(self.gamma)
        per_question = torch.where(valid, weight * nll, torch.zeros_like(nll))
        return per_question.sum() / valid.sum().clamp(min=1)


def _check_prior(prior: torch.Tensor) -> None:
    if prior.dim() != 2:
        raise ValueError(f"the question-type prior must be [types, answers], got shape {tuple(prior.shape)}")
    if not bool(torch.isfinite(prior).all()):
        raise ValueError("the question-type prior has non-finite values")


def make_loss(name: str, prior: Optional[torch.Tensor], hidden: int, cfg: DebiasConfig) -> nn.Module:
    """The loss named in the config ('bce', 'lmh' or 'lpf'); `prior` may be None for 'bce'."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}' (known: {', '.join(LOSSES)})")
    if name == "bce":
        return BCELoss()
    if prior is None:
        raise ValueError(f"loss '{name}' needs the question-type prior of the training split")
    if name == "lmh":
        return LMHLoss(prior, hidden, cfg.lmh_entropy)
    return LPFLoss(prior, cfg.lpf_gamma)
