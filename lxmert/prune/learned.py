"""Stage 2 of study B: learn a binary mask per prunable weight while the weights stay frozen.

Every prunable weight W (see modeling.prunable_tensors) gets a real score S of its shape. The forward
pass uses W * M with M = 1[S > 0.01]; the backward pass is straight-through, dL/dS = dL/dM = dL/dW_eff * W.
The masking is a torch parametrization on the module's `weight`, so the transformers model runs
unchanged and sees the masked weight wherever it reads `module.weight`.

Sparsity is set per modality (language, vision, cross, pooler). Each tensor keeps exactly
keep = round((1 - s) * numel) weights: at initialisation (by magnitude) and after every
`reset_thresholds()`, which the trainer calls every `reset_every` steps and before saving. Between
resets the count may drift, as in the original method.

`remove()` bakes the mask into the weights and returns it, so stage 3 can fine-tune the pruned model
with the mask enforced by the trainer.

Trainer notes: optimise `LearnedMasks.scores()` (with the QA head, per the paper) and give the scores no
weight decay (they are 2-D, so a rule "decay every matrix" would catch them), or AdamW pulls kept scores
under the threshold regardless of the loss. While attached, the scores and frozen weights appear in
`model.state_dict()` under '<module>.parametrizations.weight.{original,0.scores}', so a stage-2 checkpoint
loads back into a model that has the same masks attached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.config import STUDY_B_PRUNABLE
from ..core.errors import InputError
from .masks import measure_mask
from .prunable import modality_of, prunable_tensors

MASKED_MODALITIES = ("language", "vision", "cross", "pooler")
THRESHOLD = 0.01
INIT_SCORE = 0.02


def keep_count(numel: int, sparsity: float) -> int:
    """Weights a tensor keeps at a sparsity: round((1 - s) * numel), Python rounding (half to even)."""
    return int(round((1.0 - sparsity) * numel))


def top_k_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of exactly `keep` largest entries; ties at the cut go to the lowest flat indices.

    Uses kthvalue (one selection, O(n)) rather than a full sort: the word embeddings alone hold 23 M values.
    """
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if keep <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if keep >= n:
        return torch.ones_like(values, dtype=torch.bool)
    cut = torch.kthvalue(flat, n - keep + 1).values
    above = flat > cut
    tied = flat == cut
    chosen = tied & (torch.cumsum(tied, 0) <= keep - above.sum())
    return (above | chosen).view(values.shape)


def resolve_sparsity(sparsity: float | Sequence[float] | Mapping[str, float], present: set[str]
                     ) -> dict[str, float]:
    """Per-modality sparsity from a float (all four), a [language, vision, cross, pooler] list or a dict.

    Unknown modality names and values outside [0, 1) are errors; modalities the model lacks (VisualBERT
    has no separate language stream) are dropped; a modality the model has but the dict omits is an error,
    so no tensor is silently left unmasked.
    """
    if isinstance(sparsity, Mapping):
        table = dict(sparsity)
    elif isinstance(sparsity, Sequence) and not isinstance(sparsity, str):
        if len(sparsity) != len(MASKED_MODALITIES):
            raise ValueError(f"a sparsity list needs {len(MASKED_MODALITIES)} values "
                             f"({', '.join(MASKED_MODALITIES)}), got {list(sparsity)}")
        table = dict(zip(MASKED_MODALITIES, sparsity))
    else:
        table = {m: sparsity for m in MASKED_MODALITIES}
    for name, value in table.items():
        if name not in MASKED_MODALITIES:
            raise ValueError(f"unknown modality '{name}' (known: {', '.join(MASKED_MODALITIES)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity of modality '{name}' must be a number in [0, 1), got {value!r}")
    missing = sorted(present - set(table))
    if missing:
        raise ValueError(f"no sparsity given for modality {', '.join(missing)}, which has prunable tensors")
    return {m: float(v) for m, v in table.items() if m in present}


def check_target(sizes: dict[str, list[int]], sparsity: float | Mapping[str, float], key: str) -> None:
    """Refuse, before any work, a target whose masks would keep no weight at all (`sizes`: the prunable
    tensors' sizes per modality)."""
    table = resolve_sparsity(sparsity, set(sizes)) if not isinstance(sparsity, Mapping) else \
        {m: float(v) for m, v in sparsity.items() if m in sizes}
    if sum(keep_count(n, table[m]) for m, ns in sizes.items() for n in ns) == 0:
        raise InputError(f"{key}: {sparsity} keeps none of the {sum(map(sum, sizes.values())):,} prunable weights "
                         "of this model; lower it")


class _StraightThroughStep(torch.autograd.Function):
    """M = 1[S > threshold] forward; identity gradient backward (dL/dS = dL/dM)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ScoreMask(nn.Module):
    """Parametrization W -> W * 1[S > threshold]; owns the trainable scores S."""

    def __init__(self, scores: torch.Tensor, threshold: float = THRESHOLD):
        super().__init__()
        self.scores = nn.Parameter(scores)
        self.threshold = threshold

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * _StraightThroughStep.apply(self.scores, self.threshold)

    def mask(self) -> torch.Tensor:
        return self.scores.detach() > self.threshold


@dataclass
class _Entry:
    name: str
    modality: str
    module: nn.Module
    keep: int
    requires_grad: bool

    @property
    def parametrization(self) -> ScoreMask:
        return self.module.parametrizations.weight[0]


class LearnedMasks:
    """Attach score masks to a model's prunable weights; reset, read and finally bake them.

    The original weights are frozen (requires_grad False) while masked; `remove()` restores their
    previous requires_grad flag.
    """

    def __init__(self, model: nn.Module, sparsity: float | Sequence[float] | Mapping[str, float],
                 patterns: Sequence[str] = STUDY_B_PRUNABLE, threshold: float = THRESHOLD,
                 init_score: float = INIT_SCORE):
        if not 0.0 <= threshold < init_score:
            raise ValueError(f"need 0 <= threshold < init_score, got {threshold} and {init_score}")
        tensors = prunable_tensors(model, patterns)
        self.sparsity = resolve_sparsity(sparsity, {t.modality for t in tensors})
        taken = [t.name for t in tensors if parametrize.is_parametrized(_owner(model, t.name), "weight")]
        if taken:
            raise RuntimeError(f"{taken[0]} is already parametrized (masks attached twice?)")
        self.threshold = threshold
        self.entries = [self._attach(model, t.name, t.modality, init_score) for t in tensors]
        self.removed = False

    def _attach(self, model: nn.Module, name: str, modality: str, init_score: float) -> _Entry:
        """Register the parametrization, scores from magnitude: init_score on the top-keep |W|, else 0."""
        module = _owner(model, name)
        weight = module.weight
        keep = keep_count(weight.numel(), self.sparsity[modality])
        top = top_k_mask(weight.detach().abs(), keep)
        scores = torch.where(top, init_score, 0.0).to(weight.dtype)
        entry = _Entry(name, modality, module, keep, weight.requires_grad)
        parametrize.register_parametrization(module, "weight", ScoreMask(scores, self.threshold))
        module.parametrizations.weight.original.requires_grad_(False)
        return entry

    def _check_active(self) -> None:
        if self.removed:
            raise RuntimeError("the masks were already removed from the model")

    def scores(self) -> list[nn.Parameter]:
        """The trainable score tensors, in prunable-tensor order (give them to the optimizer)."""
        self._check_active()
        return [e.parametrization.scores for e in self.entries]

    @torch.no_grad()
    def reset_thresholds(self) -> None:
        """Make each tensor keep exactly its top-`keep` scores.

        The scores are shifted by one constant per tensor so that the midpoint between the keep-th and
        (keep+1)-th largest score lands on the threshold; the order and spacing of all scores (and the
        optimizer's state) are preserved. A final clamp handles ties and rounding: the top-keep set
        (ties broken by lowest index) is raised to at least the next float above the threshold, every
        other score is lowered to at most the threshold. So the kept set is exactly the top-k of the
        scores before the reset, and its size is exactly keep.
        """
        self._check_active()
        for e in self.entries:
            _reset_scores(e.parametrization.scores.data, e.keep, self.threshold)

    def current_masks(self) -> dict[str, torch.Tensor]:
        """Binary masks (True = kept), by prunable-tensor name."""
        self._check_active()
        return {e.name: e.parametrization.mask() for e in self.entries}

    @torch.no_grad()
    def remove(self) -> dict[str, torch.Tensor]:
        """Bake W * M into each weight, drop the parametrizations (and scores) and return the masks.

        Call reset_thresholds() first when the masks must meet their exact counts. Afterwards the model
        is a plain transformers model whose pruned weights are exactly zero.
        """
        masks = self.current_masks()
        for e in self.entries:
            parametrize.remove_parametrizations(e.module, "weight", leave_parametrized=False)
            e.module.weight.mul_(masks[e.name].to(e.module.weight.dtype))
            e.module.weight.requires_grad_(e.requires_grad)
        self.removed = True
        return masks


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The module holding a weight named like 'encoder.pooler.dense.weight'."""
    return model.get_submodule(name.rsplit(".", 1)[0])


def _reset_scores(scores: torch.Tensor, keep: int, threshold: float) -> None:
    """In place: shift, then clamp, so exactly the top-`keep` scores exceed the threshold."""
    flat = scores.view(-1)
    top = top_k_mask(flat, keep)
    if 0 < keep < flat.numel():
        midpoint = (flat[top].min() + flat[~top].max()) / 2
        flat.add_(threshold - midpoint)
    limit = torch.tensor(threshold, dtype=flat.dtype, device=flat.device)
    above = torch.nextafter(limit, torch.tensor(float("inf"), dtype=flat.dtype, device=flat.device))
    flat.copy_(torch.where(top, torch.maximum(flat, above), torch.minimum(flat, limit)))


def sparsity_report(masks: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Measured sparsity of the masks (percent of False): overall, per modality and per tensor.

    Same format as every other mask report of the project (masks.measure_mask); modalities come from the names
    (prunable.modality_of), 'other' for a name outside every modality.
    """
    return measure_mask(dict(masks), {name: modality_of(model.family, name) or "other" for name in masks})
