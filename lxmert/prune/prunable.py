"""The prunable set: which weight tensors pruning and mask training act on, and the modality (language /
vision / cross / pooler / head) each belongs to. Study A's default set and study B's masked set are config
defaults (core.config PRUNABLE_DEFAULT, STUDY_B_PRUNABLE): glob patterns over parameter names."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from ..core.config import PRUNABLE_DEFAULT
from ..core.errors import InputError
from ..modeling.vqa import VQAModel

MODALITIES = ("language", "vision", "cross", "pooler", "head")


@dataclass(frozen=True)
class PrunableTensor:
    name: str
    modality: str
    padding_row: Optional[int] = None  # an embedding's padding row: zero by construction, never trained


def modality_of(family: str, name: str) -> Optional[str]:
    """Modality of a prunable weight by its parameter name (None: none of the model's modalities)."""
    if name.startswith("head."):
        return "head"
    if family == "lxmert":
        if name.startswith(("encoder.encoder.layer.", "encoder.embeddings.word_embeddings.")):
            return "language"
        if name.startswith(("encoder.encoder.r_layers.", "encoder.encoder.visn_fc.")):
            return "vision"
        if name.startswith("encoder.encoder.x_layers."):
            return "cross"
        if name.startswith("encoder.pooler."):
            return "pooler"
        return None
    if name.startswith("encoder.embeddings.word_embeddings."):
        return "language"
    if name.startswith("encoder.embeddings.visual_projection."):
        return "vision"
    if name.startswith("encoder.encoder.layer."):
        return "cross"
    if name.startswith("encoder.pooler."):
        return "pooler"
    return None


def prunable_tensors(model: VQAModel, patterns: Sequence[str] = PRUNABLE_DEFAULT,
                     all_parameters: bool = False) -> list[PrunableTensor]:
    """The prunable set: the weight matrices of Linear and Embedding modules whose parameter name matches
    one of the glob patterns (fnmatch), in model order; biases and LayerNorm weights are candidates only with
    `all_parameters` (the original study's state-dict rule prunes them too: lottery.prune_all_parameters).
    Each tensor's modality (language / vision / cross / pooler / head) comes from its name; a pattern
    that matches nothing is an error (a typo must not silently shrink the set), and so is a weight-normed weight
    (model.head=simple), which a mask cannot hold."""
    modules = {f"{name}.weight": module for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding))}
    if all_parameters:
        owners = dict(model.named_modules())
        modules = {name: owners[name.rpartition(".")[0]] for name, _ in model.named_parameters()}
    candidates = list(modules)
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(c, p) for c in candidates)]
    if unused:
        raise InputError(f"prunable pattern(s) {unused} match no {'parameter' if all_parameters else 'Linear or Embedding weight'} of this "
                         f"{model.family} model (names look like {candidates[0]}, {candidates[-1]})")
    chosen = [c for c in candidates if any(fnmatch.fnmatchcase(c, p) for p in patterns)]
    # a weight-normed weight (or, with all_parameters, one of its direction / gain tensors)
    normed = [c for c in chosen if (c.endswith(".weight") and _weight_normed(modules[c]))
              or (".parametrizations.weight.original" in c and any(isinstance(p, _WeightNorm) for p in modules[c]))]
    if normed:
        raise InputError(f"prunable pattern(s) {list(patterns)} match the weight-normed {', '.join(normed)} "
                         f"(model.head=simple): its weight is computed from a direction and a gain, so a mask "
                         f"on it is not kept by training; leave head.* out of the prunable set")
    return [PrunableTensor(c, modality_of(model.family, c) or "other",
                           getattr(modules[c], "padding_idx", None) if c.endswith(".weight") else None)
            for c in chosen]


def _weight_normed(module: nn.Module) -> bool:
    """Whether the module's weight is a weight-norm parametrization (Si et al.'s head, modeling.vqa.simple_head)."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, _WeightNorm) for p in module.parametrizations.weight)
