"""The optimizers a run trains with: torch's AdamW (the default) and BertAdam, the optimizer of the original
LXMERT code, written here from its description (airsplay/lxmert src/lxrt/optimization.py, which Hashemi et al.
copy unchanged): Adam moments without bias correction, eps 1e-6, decoupled weight decay on every parameter
(one parameter group: their vqa.py lines 77-80). Its warmup-linear schedule is the same as the trainer's
(linear warmup, then linear decay to 0, the first step at learning rate 0), and it clips outside (vqa.py line
112: clip_grad_norm_ 5.0), as the trainer does.
"""
from __future__ import annotations

import torch
from torch import nn


def decays(name: str, p: nn.Parameter) -> bool:
    """AdamW's weight decay on matrices only: not biases, LayerNorms, or mask scores (decay would pull kept
    scores under the mask threshold regardless of the loss)."""
    return p.ndim >= 2 and not any(k in name for k in ("LayerNorm", "layer_norm", "scores"))


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in named if decays(n, p)]
    other = [p for n, p in named if not decays(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def adamw(params, lr: float, device: torch.device, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel on CPU and CUDA: one kernel for all tensors instead of a Python loop
    over them (the embedded model has ~170 tensors; the unfused loop makes bench/training.py's tiny step
    13 % slower on one CPU thread, docs/PERFORMANCE.md). Same update rule, other rounding."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


class BertAdam(torch.optim.Optimizer):
    """p <- p - lr * (m / (sqrt(v) + eps) + weight_decay * p), with m and v the raw exponential averages of the
    gradient and its square (no bias correction: the first steps move by m / sqrt(v) of barely started
    averages, which the warmup keeps small)."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return None


def optimizer(kind: str, named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
              device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer over the named parameters it trains (train.optimizer)."""
    if kind == "bertadam":
        return BertAdam([p for _, p in named], lr=lr, weight_decay=weight_decay)
    return adamw(param_groups(named, weight_decay), lr, device)
