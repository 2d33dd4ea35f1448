"""Structured sparsity: attention heads, feed-forward neurons and N:M groups, as masks over the prunable set,
and the compact model they make (matrices physically shrunk).

A structured unit is a set of weights removed together:
  head h of an attention module      rows h*d .. (h+1)*d - 1 of its query, key and value weights and the same
                                     columns of the output projection that reads the heads' concatenation;
  neuron j of a feed-forward block   row j of its intermediate weight and column j of its output weight.
Zeroed output columns alone remove a unit's contribution whatever its biases are; its rows are zeroed too, so
the weights the compact model drops are exactly those the mask prunes, and sparsity measured from the weights
counts them. An N:M mask prunes the same number of weights, round(level * M), in each group of M consecutive
weights along the input dimension (2:4 is level 0.5), the pattern NVIDIA's sparse tensor cores run.

Importance of a unit (lottery.importance):
  magnitude  the root mean square of its weights;
  gradient   Michel et al. (2019, "Are Sixteen Heads Really Better than One?"): the absolute derivative of the
             loss by a gate multiplying the unit's output, per token, summed over training batches, then
             normalised by its L2 norm within each module, as their code does (gradient_importance).
The modes read them as the unstructured ones read |w|: low_magnitude removes the least important units,
high_magnitude the most important, random draws units with the per-module counts low_magnitude would prune.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from .masks import parameter
from .prunable import PrunableTensor

# the feed-forward blocks: (intermediate module, output module) by the last part of their names
FFN_PAIRS = (("intermediate", "output"), ("lang_inter", "lang_output"), ("visn_inter", "visn_output"))


@dataclass(frozen=True)
class Group:
    """One attention module (units = heads) or feed-forward block (units = neurons)."""

    kind: str  # "heads" or "neurons"
    module: str  # the attention module (query/key/value) or the intermediate module
    rows: tuple[str, ...]  # weights whose rows are cut per unit
    cols: tuple[str, ...]  # weights whose columns are cut per unit (the output projection)
    count: int  # units
    size: int  # rows / columns per unit (the head size; 1 for a neuron)
    modality: str

    def slices(self, unit: int) -> slice:
        return slice(unit * self.size, (unit + 1) * self.size)


def _attention_groups(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, output dense name) of every attention module: one with query, key and value Linear
    layers and a head size, whose heads' concatenation the sibling `output.dense` reads (LXMERT's self and
    cross attention, VisualBERT's self attention)."""
    modules = dict(model.named_modules())
    out = []
    for name, module in modules.items():
        if all(isinstance(getattr(module, k, None), nn.Linear) for k in ("query", "key", "value")) \
                and hasattr(module, "attention_head_size"):
            dense = f"{name.rpartition('.')[0]}.output.dense"
            if isinstance(modules.get(dense), nn.Linear):
                out.append((name, module, dense))
    return out


def _ffn_groups(model: nn.Module) -> list[tuple[str, str]]:
    """(intermediate dense, output dense) of every feed-forward block."""
    modules = dict(model.named_modules())
    out = []
    for name in modules:
        parent, _, last = name.rpartition(".")
        for inter, output in FFN_PAIRS:
            if last == inter and isinstance(modules.get(f"{name}.dense"), nn.Linear) \
                    and isinstance(modules.get(f"{parent}.{output}.dense"), nn.Linear):
                out.append((f"{name}.dense", f"{parent}.{output}.dense"))
    return out


def structure_groups(model: nn.Module, kind: str, prunable: list[PrunableTensor]) -> list[Group]:
    """The groups of `kind` whose weights are all in the prunable set, in model order; none is an error (the
    granularity would prune nothing)."""
    names = {t.name: t.modality for t in prunable}
    groups = []
    if kind == "heads":
        for name, module, dense in _attention_groups(model):
            rows = tuple(f"{name}.{k}.weight" for k in ("query", "key", "value"))
            cols = (f"{dense}.weight",)
            if all(w in names for w in rows + cols):
                groups.append(Group("heads", name, rows, cols, module.num_attention_heads,
                                    module.attention_head_size, names[rows[0]]))
    elif kind == "neurons":
        for inter, output in _ffn_groups(model):
            rows, cols = (f"{inter}.weight",), (f"{output}.weight",)
            if all(w in names for w in rows + cols):
                groups.append(Group("neurons", inter, rows, cols, parameter(model, rows[0]).shape[0], 1,
                                    names[rows[0]]))
    else:
        raise ValueError(f"no structured units of kind '{kind}'")
    if not groups:
        raise InputError(f"lottery.granularity {kind}: no {'attention module' if kind == 'heads' else 'feed-forward'}"
                         " block has all its weights in the prunable set (lottery.prunable)")
    return groups


# -- importance ------------------------------------------------------------------------------------------------

def alive_units(group: Group, mask: dict[str, torch.Tensor]) -> np.ndarray:
    """Units of a group still in the model: any of their output columns kept."""
    cols = mask[group.cols[0]].reshape(mask[group.cols[0]].shape[0], group.count, group.size)
    return cols.any(dim=2).any(dim=0).numpy()


def magnitude_importance(model: nn.Module, groups: list[Group]) -> list[np.ndarray]:
    """Root mean square of each unit's weights (its rows and columns)."""
    out = []
    with torch.no_grad():
        for g in groups:
            total = torch.zeros(g.count, dtype=torch.float64)
            for name in g.rows:
                w = parameter(model, name).detach().double().cpu()
                total += (w ** 2).reshape(g.count, g.size, -1).sum(dim=(1, 2))
            for name in g.cols:
                w = parameter(model, name).detach().double().cpu()
                total += (w ** 2).reshape(w.shape[0], g.count, g.size).sum(dim=(0, 2))
            per_unit = g.size * (sum(parameter(model, n).shape[1] for n in g.rows)
                                 + sum(parameter(model, n).shape[0] for n in g.cols))
            out.append(np.sqrt(total.numpy() / per_unit))
    return out


def gradient_importance(model: nn.Module, groups: list[Group], batches: Iterable[dict],
                        loss_of: Callable[[dict], torch.Tensor]) -> list[np.ndarray]:
    """Michel et al.'s importance as their code computes it (pmichel31415/pytorch-pretrained-BERT, branch paul,
    commit 18a86a7, examples/classifier_eval.py lines 236-252): for every token, |A_h(x)^T dL/dA_h(x)|, the
    absolute derivative of the loss by a gate on head h's output at that token, summed over tokens and
    examples, then each module's scores divided by their L2 norm. Here the gate multiplies the input of the
    output projection (the heads' concatenation; for neurons, the activated neurons), and the sums are divided
    by the number of examples (a scale the normalisation removes). A module used twice (LXMERT's cross
    attention, both directions) adds both uses."""
    modules = dict(model.named_modules())
    gates: dict[int, list[torch.Tensor]] = {}
    sums = [torch.zeros(g.count, dtype=torch.float64) for g in groups]
    handles = []

    def hook(index: int, group: Group):
        def pre(_module, args):
            x = args[0]
            gate = torch.ones(*x.shape[:-1], group.count, device=x.device, dtype=x.dtype, requires_grad=True)
            gates.setdefault(index, []).append(gate)
            scaled = x.reshape(*x.shape[:-1], group.count, group.size) * gate.unsqueeze(-1)
            return (scaled.reshape(x.shape),) + tuple(args[1:])
        return pre

    was_training = model.training
    model.eval()
    examples = 0
    try:
        for i, g in enumerate(groups):
            dense = g.cols[0].rpartition(".")[0]
            handles.append(modules[dense].register_forward_pre_hook(hook(i, g)))
        for batch in batches:
            gates.clear()
            loss = loss_of(batch)
            used = [(i, gate) for i in sorted(gates) for gate in gates[i]]
            grads = torch.autograd.grad(loss, [gate for _, gate in used], allow_unused=True)
            for (i, _), grad in zip(used, grads):
                if grad is not None:
                    sums[i] += grad.detach().abs().double().reshape(-1, groups[i].count).sum(dim=0).cpu()
            examples += next(iter(batch.values())).shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for s in sums:
        mean = (s / max(examples, 1)).numpy()
        norm = float(np.linalg.norm(mean))
        out.append(mean / norm if norm > 0 else mean)
    return out


# -- selection -------------------------------------------------------------------------------------------------

def unit_counts(groups: list[Group], level: float, scope: str) -> list[int] | int:
    """Units pruned at a level: one total (global scope) or one count per module (layer scope)."""
    if scope == "global":
        return int(round(level * sum(g.count for g in groups)))
    if scope == "layer":
        return [int(round(level * g.count)) for g in groups]
    raise InputError(f"lottery.scope {scope}: structured granularities rank units globally or per module "
                     "(global, layer)")


def select_units(mode: str, groups: list[Group], importance: list[np.ndarray], alive: list[np.ndarray],
                 counts: list[int] | int, seed: list[int]) -> list[np.ndarray]:
    """Boolean pruned units per group: the dead ones plus new ones up to `counts`, by importance (ties by
    position); random draws, per module, as many as low_magnitude would prune there."""
    if mode not in ("low_magnitude", "high_magnitude", "random"):
        raise InputError(f"lottery.modes {mode}: not defined for structured units (low_magnitude, random, "
                         "high_magnitude)")
    priority = []
    for imp, live in zip(importance, alive):
        p = np.asarray(imp, np.float64) * (-1.0 if mode == "high_magnitude" else 1.0)
        priority.append(np.where(live, p, -np.inf))
    if isinstance(counts, int):
        flat = np.concatenate(priority)
        if counts < int(np.isinf(flat).sum()):
            raise ValueError(f"{counts} units is below the {int(np.isinf(flat).sum())} already pruned")
        chosen = np.zeros(len(flat), bool)
        chosen[np.argsort(flat, kind="stable")[:counts]] = True
        offsets = np.cumsum([0] + [len(p) for p in priority])
        pruned = [chosen[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    else:
        pruned = []
        for p, k in zip(priority, counts):
            chosen = np.zeros(len(p), bool)
            chosen[np.argsort(p, kind="stable")[:max(k, int(np.isinf(p).sum()))]] = True
            pruned.append(chosen)
    if mode != "random":
        return pruned
    out = []
    for i, (p, live) in enumerate(zip(pruned, alive)):
        new = int(p.sum()) - int((~live).sum())
        drawn = ~live.copy()
        if new > 0:
            candidates = np.flatnonzero(live)
            keys = np.random.default_rng([*seed, i]).random(len(candidates))
            drawn[candidates[np.argsort(keys, kind="stable")[:new]]] = True
        out.append(drawn)
    return out


def unit_mask(groups: list[Group], pruned: list[np.ndarray], current: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """`current` with the rows and columns of every pruned unit set to False."""
    mask = {k: v.clone() for k, v in current.items()}
    for g, units in zip(groups, pruned):
        for u in np.flatnonzero(units):
            cut = g.slices(int(u))
            for name in g.rows:
                mask[name][cut] = False
            for name in g.cols:
                mask[name][:, cut] = False
    return mask


def prune_structured(mode: str, model: nn.Module, prunable: list[PrunableTensor], current: dict[str, torch.Tensor],
                     level: float, kind: str, scope: str, seed: int, salt: float,
                     importance: Optional[list[np.ndarray]] = None) -> dict[str, torch.Tensor]:
    """A new mask with `level` of the heads or neurons (a fraction of the units) pruned, containing every unit
    `current` pruned. `importance` (gradient importance, computed by the caller) replaces the magnitude."""
    groups = structure_groups(model, kind, prunable)
    scores = importance if importance is not None else magnitude_importance(model, groups)
    alive = [alive_units(g, current) for g in groups]
    pruned = select_units(mode, groups, scores, alive, unit_counts(groups, level, scope),
                          [seed, int(round(salt * 1_000_000))])
    return unit_mask(groups, pruned, current)


def prune_n_m(mode: str, model: nn.Module, prunable: list[PrunableTensor], current: dict[str, torch.Tensor],
              level: float, group: int, seed: int, salt: float) -> dict[str, torch.Tensor]:
    """N:M mask: in every group of `group` consecutive weights along a tensor's input (last) dimension exactly
    round(level * group) are pruned, those `current` pruned first, then by |w| (smallest: low_magnitude,
    largest: high_magnitude) or at random; ties by position."""
    k = n_m_count(level, group)
    if mode not in ("low_magnitude", "high_magnitude", "random"):
        raise InputError(f"lottery.modes {mode}: not defined for N:M masks (low_magnitude, random, high_magnitude)")
    out = {}
    rng = np.random.default_rng([seed, int(round(salt * 1_000_000))])
    for t in prunable:
        w = parameter(model, t.name).detach().float().cpu()
        if w.shape[-1] % group:
            raise InputError(f"lottery.granularity n_m: {t.name} has {w.shape[-1]} inputs, not a multiple of "
                             f"lottery.group ({group}); leave it out of lottery.prunable")
        scores = w.abs().numpy().reshape(-1, group).astype(np.float64)
        if mode == "high_magnitude":
            scores = -scores
        elif mode == "random":
            scores = rng.random(scores.shape)
        dead = ~current[t.name].numpy().reshape(-1, group)
        if (dead.sum(axis=1) > k).any():
            raise ValueError(f"{t.name}: the current mask prunes more than {k} of {group} in some group")
        scores[dead] = -np.inf
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        pruned = np.zeros_like(dead)
        np.put_along_axis(pruned, order, True, axis=1)
        out[t.name] = torch.from_numpy(~pruned).reshape(w.shape)
    return out


def check_granularity(model: nn.Module, prunable: list[PrunableTensor], granularity: str, group: int) -> None:
    """Before any work: the prunable set has the structure the granularity removes."""
    if granularity in ("heads", "neurons"):
        structure_groups(model, granularity, prunable)
    elif granularity == "n_m":
        for t in prunable:
            inputs = parameter(model, t.name).shape[-1]
            if inputs % group:
                raise InputError(f"lottery.granularity n_m: {t.name} has {inputs} inputs, not a multiple of "
                                 f"lottery.group ({group}); leave it out of lottery.prunable")


def n_m_count(level: float, group: int) -> int:
    """Weights pruned per group of M at a level; a level that is not a multiple of 1/M is refused."""
    k = int(round(level * group))
    if abs(k - level * group) > 1e-6:
        raise InputError(f"lottery.levels: {level} is not a multiple of 1/{group} (lottery.group): an N:M mask "
                         f"prunes a whole number of weights per group of {group}")
    return k


# -- the compact model -----------------------------------------------------------------------------------------

def kept_units(model: nn.Module, kind: str, prunable: list[PrunableTensor]) -> dict[str, list[int]]:
    """Per group (by module name), the units whose weights are not all zero in the model itself."""
    out = {}
    with torch.no_grad():
        for g in structure_groups(model, kind, prunable):
            cols = parameter(model, g.cols[0]).detach()
            nonzero = (cols != 0).reshape(cols.shape[0], g.count, g.size).any(dim=2).any(dim=0)
            for name in g.rows:
                rows = parameter(model, name).detach()
                nonzero |= (rows != 0).reshape(g.count, g.size, -1).any(dim=2).any(dim=1)
            out[g.module] = [int(u) for u in torch.nonzero(nonzero).flatten()]
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def shrink(model: nn.Module, structure: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Cut the model in place to the units `structure` keeps ({"heads": {attention module: kept heads},
    "neurons": {intermediate dense: kept neurons}}). An attention module keeps at least one head: with none,
    transformers' reshape of an empty projection fails, so its first head stays with zero output columns (it adds
    nothing, exactly as the masked model)."""
    from transformers.pytorch_utils import prune_linear_layer

    modules = dict(model.named_modules())
    attention = {name: (module, dense) for name, module, dense in _attention_groups(model)}
    for name, keep in structure.get("heads", {}).items():
        if name not in attention:
            raise InputError(f"compact structure: no attention module {name} in this model")
        module, dense = attention[name]
        size, silent = module.attention_head_size, not keep
        keep = keep or [0]
        index = torch.tensor([h * size + i for h in keep for i in range(size)], dtype=torch.long)
        for k in ("query", "key", "value"):
            setattr(module, k, prune_linear_layer(getattr(module, k), index, dim=0))
        _replace(model, dense, prune_linear_layer(modules[dense], index, dim=1))
        if silent:
            with torch.no_grad():
                model.get_submodule(dense).weight.zero_()
        module.num_attention_heads = len(keep)
        for attr in ("head_size", "all_head_size"):
            if hasattr(module, attr):
                setattr(module, attr, len(keep) * size)
    pairs = dict(_ffn_groups(model))
    for name, keep in structure.get("neurons", {}).items():
        if name not in pairs:
            raise InputError(f"compact structure: no feed-forward block {name} in this model")
        index = torch.tensor(keep, dtype=torch.long)
        _replace(model, name, prune_linear_layer(modules[name], index, dim=0))
        _replace(model, pairs[name], prune_linear_layer(modules[pairs[name]], index, dim=1))
    return model


def compact_structure(model: nn.Module, prunable: list[PrunableTensor]) -> dict[str, dict[str, list[int]]]:
    """The heads and neurons the model's own weights keep (each kind where the prunable set covers it)."""
    out = {}
    for kind in ("heads", "neurons"):
        try:
            out[kind] = kept_units(model, kind, prunable)
        except InputError:
            continue
    return out
