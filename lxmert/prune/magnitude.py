"""Pruning strategies behind one signature:

    prune(mode, model, prunable, current, sparsity, scope, seed) -> new mask

`sparsity` is a fraction of the whole prunable set (global scope) or of each tensor (layer scope) and
is hit exactly: exactly round(sparsity * count) weights end up pruned, ties broken by position. The
'survivors' scope reproduces the original study's rounds of 10 % of each tensor's survivors, which
overshoot the level (see survivor_counts).
Weights already pruned stay pruned (masks only shrink along an iterative schedule).

Modes:
  low_magnitude   removes the smallest |w| among the surviving weights;
  high_magnitude  removes the largest |w| (true high-magnitude pruning);
  random          removes surviving weights uniformly at random, with the same per-tensor counts as
                  the low-magnitude mask of that level would have;
  original_high   what the original code calls "high magnitude": per tensor, as many weights as the
                  low-magnitude mask keeps: all those it prunes plus random others below 50 %, a random
                  subset of them from 50 % on (_original_high).

Global selection uses one float32 buffer of all prunable scores and an in-place numpy partition
(exact k-th value), i.e. at most one extra copy of the prunable weights in memory.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from .masks import parameter
from .prunable import PrunableTensor

MODES = ("low_magnitude", "high_magnitude", "random", "original_high")


def _scores(w: torch.Tensor, keep: torch.Tensor, mode: str, out: np.ndarray | None = None) -> np.ndarray:
    """Pruning priority (smallest pruned first); already pruned weights get -inf. Written into `out`
    (a view of the global buffer) when given, so no per-tensor temporary is made."""
    s = np.abs(w.detach().float().cpu().numpy().ravel(), out=out)
    if mode == "high_magnitude":
        np.negative(s, out=s)
    pruned = ~keep.numpy().ravel()
    if pruned.any():
        np.copyto(s, -np.inf, where=pruned)
    return s


def _select(scores: np.ndarray, k: int, threshold: float, ties: int) -> tuple[np.ndarray, int]:
    """Prune mask of one tensor given the global k-th score; uses up to `ties` equal scores."""
    pruned = scores < threshold
    if ties > 0:
        eq = np.flatnonzero(scores == threshold)[:ties]
        pruned[eq] = True
        ties -= len(eq)
    return pruned, ties


def _kth(buffer: np.ndarray, k: int) -> float:
    """k-th smallest value (1-based), partitioning the buffer in place (no copy)."""
    buffer.partition(k - 1)
    return float(buffer[k - 1])


def _magnitude_mask(tensors: list[torch.Tensor], keeps: list[torch.Tensor], counts: list[int] | int,
                    mode: str) -> list[np.ndarray]:
    """Boolean prune masks with exactly `counts` pruned: one int for global scope, one per tensor."""
    if isinstance(counts, int):
        total = sum(t.numel() for t in tensors)
        if counts == 0:
            return [np.zeros(t.numel(), bool) for t in tensors]
        buffer = np.empty(total, np.float32)
        offset = 0
        for w, keep in zip(tensors, keeps):
            _scores(w, keep, mode, out=buffer[offset:offset + w.numel()])
            offset += w.numel()
        threshold = _kth(buffer, counts)
        del buffer
        scored = [_scores(w, keep, mode) for w, keep in zip(tensors, keeps)]
        ties = counts - sum(int((s < threshold).sum()) for s in scored)
        out = []
        for s in scored:
            pruned, ties = _select(s, counts, threshold, ties)
            out.append(pruned)
        return out
    out = []
    for w, keep, k in zip(tensors, keeps, counts):
        s = _scores(w, keep, mode)
        if k == 0:
            out.append(np.zeros(len(s), bool))
            continue
        threshold = _kth(s.copy(), k)
        out.append(_select(s, k, threshold, k - int((s < threshold).sum()))[0])
    return out


def _random_mask(keeps: list[torch.Tensor], counts: list[int], seed: list[int]) -> list[np.ndarray]:
    out = []
    for i, (keep, k) in enumerate(zip(keeps, counts)):
        alive = keep.numpy().ravel()
        pruned = ~alive
        extra = k - int(pruned.sum())
        if extra > 0:
            # `extra` survivors uniformly at random: the smallest of i.i.d. uniform keys (argpartition is
            # O(n) and ~3x faster than Generator.choice without replacement at base size)
            rng = np.random.default_rng([*seed, i])
            candidates = np.flatnonzero(alive)
            keys = rng.random(len(candidates), dtype=np.float32)
            pruned[candidates[np.argpartition(keys, extra - 1)[:extra]]] = True
        out.append(pruned)
    return out


# Hashemi et al. prune in rounds of 10 % of each tensor's surviving weights, with no training in between,
# until the prunable set reaches the level (ghazaleh-mahmoodi/lxmert_compression,
# lxmert/src/tasks/lottery_ticket_hypothesis.py: weight_prune_layer(..., 0.1, mask) in low_magnitude_pruning's
# loop, stopped by `pruned / total * 100 >= sparcity`): each tensor ends at 1 - 0.9^k, e.g. 27.1 % for a 20 % level.
SURVIVOR_ROUND = 0.1


def survivor_counts(sizes: list[int], pruned: list[int], sparsity: float) -> list[int]:
    """Per-tensor pruned counts after the original's rounds (see SURVIVOR_ROUND), starting from `pruned`. The
    weights do not change between rounds, so the rounds remove each tensor's smallest weights up to these
    counts. A round removes round(0.1 x survivors) + 1 weights of a tensor: the original's cutoff is the
    survivor at index round(0.1 x survivors) of the sorted magnitudes and `<=` prunes it too (np.round, like
    Python's round, rounds halves to even). Ties at the cutoff, which `<=` would also remove, have
    probability zero for trained float weights and are not reproduced."""
    counts, total = list(pruned), sum(sizes)
    while sum(counts) < sparsity * total:
        step = [min(n - c, int(round(SURVIVOR_ROUND * (n - c))) + 1) if n > c else 0
                for n, c in zip(sizes, counts)]
        if not any(step):
            break
        counts = [c + k for c, k in zip(counts, step)]
    return counts


def first_counts(sizes: list[int], sparsity: float, scope: str) -> list[int]:
    """Per-tensor pruned counts of a first level (from a full mask) at `sparsity` (global scope: the total
    spread over tensors as the threshold would; only the total matters to the callers)."""
    if scope == "global":
        return [int(round(sparsity * sum(sizes)))]
    if scope == "survivors":
        return survivor_counts(sizes, [0] * len(sizes), sparsity)
    return [int(round(sparsity * n)) for n in sizes]


def check_level(sizes: list[int], sparsity: float, scope: str, key: str) -> None:
    """Refuse, before any work, a level whose mask would prune every weight of the prunable set (saving
    such a mask is refused; a tiny model reaches it long before a base one)."""
    if sum(first_counts(sizes, sparsity, scope)) >= sum(sizes):
        raise InputError(f"{key}: sparsity {sparsity} prunes all {sum(sizes):,} prunable weights of this model "
                         f"({scope} scope); lower it")


def _original_high(low: list[np.ndarray], seed: list[int]) -> list[np.ndarray]:
    """The original code's "high magnitude" (ghazaleh-mahmoodi/lxmert_compression, commit b93d9d2,
    lxmert/src/tasks/lottery_ticket_hypothesis.py lines 104-124, applied by vqa.py lines 228-233): in each tensor
    it prunes as many weights as the low-magnitude mask `low` KEEPS: when that is more than the low-magnitude
    mask prunes (below 50 %), all of those plus others drawn at random among the kept ones; otherwise a random
    subset of the low-magnitude-pruned ones. So it never removes a weight for being large. The draws are
    uniform without replacement (theirs: Python's random.sample, seeded by param.py), here from (seed, tensor)."""
    out = []
    for i, pruned in enumerate(low):
        rng = np.random.default_rng([*seed, i])
        kept = int((~pruned).sum())
        new = np.zeros_like(pruned)
        if kept > int(pruned.sum()):
            new[pruned] = True
            others = np.flatnonzero(~pruned)
            new[others[rng.permutation(len(others))[:kept - int(pruned.sum())]]] = True
        else:
            candidates = np.flatnonzero(pruned)
            new[candidates[rng.permutation(len(candidates))[:kept]]] = True
        out.append(new)
    return out


def prune(mode: str, model: nn.Module, prunable: list[PrunableTensor], current: dict[str, torch.Tensor],
          sparsity: float, scope: str = "global", seed: int = 0, salt: float = 0.0,
          mirrored: bool = False) -> dict[str, torch.Tensor]:
    """A new mask (True = kept) at `sparsity`, containing every weight `current` already pruned. The random
    modes draw from (seed, salt): the study passes the level itself as salt, so a level's random mask does
    not change when other levels are added to the grid. original_high starts from the low-magnitude mask at
    `sparsity` (or at 1 - sparsity when `mirrored`, as the original's published runs did) and a full mask."""
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode '{mode}' (known: {', '.join(MODES)})")
    if mode == "original_high":
        low = prune("low_magnitude", model, prunable, current, 1 - sparsity if mirrored else sparsity, scope)
        drawn = _original_high([~low[t.name].numpy().ravel() for t in prunable], [seed, int(round(salt * 1e6))])
        return {t.name: torch.from_numpy(~p).reshape(low[t.name].shape) for t, p in zip(prunable, drawn)}
    tensors = [parameter(model, t.name) for t in prunable]
    keeps = [current[t.name].cpu() for t in prunable]
    sizes = [w.numel() for w in tensors]
    already = sum(int((~k).sum()) for k in keeps)
    counts: list[int] | int
    if scope == "global":
        counts = int(round(sparsity * sum(sizes)))
        if counts < already:
            raise ValueError(f"target sparsity {sparsity} is below the current mask's {already / sum(sizes):.4f}")
    elif scope == "survivors":
        counts = survivor_counts(sizes, [int((~k).sum()) for k in keeps], sparsity)
    else:
        counts = [int(round(sparsity * n)) for n in sizes]
    with torch.no_grad():
        if mode == "random":
            low = _magnitude_mask(tensors, keeps, counts, "low_magnitude")
            pruned = _random_mask(keeps, [int(p.sum()) for p in low], [seed, int(round(salt * 1_000_000))])
        else:
            pruned = _magnitude_mask(tensors, keeps, counts, mode)
    return {t.name: torch.from_numpy(~p).reshape(w.shape) for t, p, w in zip(prunable, pruned, tensors)}
