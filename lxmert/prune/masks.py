"""Masks over the prunable set: measuring sparsity, compact files, and enforcement during training.

A mask is a dict tensor-name -> bool tensor (True = weight kept). On disk it is a safetensors file of
bit-packed uint8 arrays (numpy.packbits, 1 bit per weight) with shapes and modalities in its metadata:
safe to load, 32x smaller than float.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from ..core.files import load_tensors, save_tensors
from .prunable import PrunableTensor


def parameter(model: nn.Module, name: str) -> nn.Parameter:
    return model.get_parameter(name)


def sparsity_report(zeros: dict[str, int], sizes: dict[str, int], modalities: dict[str, str]) -> dict:
    """Overall, per-modality and per-tensor sparsity (fraction of zero weights) in percent."""
    by_mod_z: dict[str, int] = defaultdict(int)
    by_mod_n: dict[str, int] = defaultdict(int)
    for name, n in sizes.items():
        by_mod_z[modalities[name]] += zeros[name]
        by_mod_n[modalities[name]] += n
    total = sum(sizes.values())
    pct = lambda z, n: round(100.0 * z / n, 4) if n else 0.0  # noqa: E731
    return {
        "overall": pct(sum(zeros.values()), total), "prunable": total, "zeros": sum(zeros.values()),
        "by_modality": {m: pct(by_mod_z[m], by_mod_n[m]) for m in sorted(by_mod_n)},
        "prunable_by_modality": {m: by_mod_n[m] for m in sorted(by_mod_n)},
        "by_tensor": {name: pct(zeros[name], sizes[name]) for name in sizes},
    }


def measure_weights(model: nn.Module, prunable: list[PrunableTensor]) -> dict:
    """Sparsity measured from the weights themselves (exact zeros), never assumed from a mask. An embedding's
    padding row is left out: it is zero in every model, pruned or not (a dense model would otherwise measure
    a sparsity of 1 / vocabulary size in its word embeddings)."""
    zeros, sizes = {}, {}
    for t in prunable:
        w = parameter(model, t.name).detach()
        if t.padding_row is not None:
            w = torch.cat([w[:t.padding_row], w[t.padding_row + 1:]])
        zeros[t.name], sizes[t.name] = int((w == 0).sum()), w.numel()
    return sparsity_report(zeros, sizes, {t.name: t.modality for t in prunable})


def fractions(report: dict) -> dict[str, float]:
    """A sparsity report (percent) as fractions: overall and per modality, the form result rows use."""
    return {"overall": round(report["overall"] / 100, 6),
            **{m: round(v / 100, 6) for m, v in report["by_modality"].items()}}


def measure_mask(mask: dict[str, torch.Tensor], modalities: dict[str, str]) -> dict:
    zeros = {k: int((~v).sum()) for k, v in mask.items()}
    return sparsity_report(zeros, {k: v.numel() for k, v in mask.items()}, modalities)


def full_mask(model: nn.Module, prunable: list[PrunableTensor]) -> dict[str, torch.Tensor]:
    return {t.name: torch.ones_like(parameter(model, t.name), dtype=torch.bool, device="cpu") for t in prunable}


MASK_FORMAT = "packbits-v1"


def save_mask(path: str | Path, mask: dict[str, torch.Tensor], modalities: dict[str, str]) -> None:
    """Bit-packed mask file. Its metadata is one JSON entry: safetensors writes several entries in a random
    order per process, which would make two identical masks differ byte for byte."""
    total = sum(int(v.sum()) for v in mask.values())
    if mask and total == 0:
        raise ValueError(f"refusing to save a mask that prunes every weight: {path}")
    packed = {k: torch.from_numpy(np.packbits(v.cpu().numpy().ravel())) for k, v in mask.items()}
    meta = {"format": MASK_FORMAT, "shapes": {k: list(v.shape) for k, v in mask.items()},
            "modalities": {k: modalities[k] for k in mask}}
    save_tensors(path, packed, {"lxmert_mask": json.dumps(meta)})


def load_mask(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    packed = load_tensors(path)
    with safe_open(str(path), "pt") as fh:
        raw = fh.metadata() or {}
    try:
        meta = json.loads(raw["lxmert_mask"])
        shapes, modalities = meta["shapes"], meta["modalities"]
        if meta["format"] != MASK_FORMAT:
            raise ValueError(meta["format"])
        mask = {}
        for k, shape in shapes.items():
            n = int(np.prod(shape))
            bits = np.unpackbits(packed[k].numpy(), count=n).astype(bool)
            mask[k] = torch.from_numpy(bits.reshape(shape))
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a mask file of this project ({type(e).__name__}: {e}); remove it to "
                         f"recompute the level") from None
    if mask and not any(bool(v.any()) for v in mask.values()):
        raise InputError(f"{path}: the mask prunes every weight (all bits zero); remove it to recompute the level")
    return mask, modalities


def load_mask_for(path: str | Path, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A saved mask, refused with what differs when it was made for another prunable set or shapes
    (a level folder from an earlier config must not be silently reused)."""
    mask, _ = load_mask(path)
    if set(mask) != set(names):
        extra, missing = sorted(set(mask) - set(names)), sorted(set(names) - set(mask))
        raise InputError(f"{path}: mask made for another prunable set (only in the file: {extra[:3]}, "
                         f"only in this config: {missing[:3]}); remove the folder or restore the config")
    wrong = {k: (tuple(v.shape), tuple(parameter(model, k).shape)) for k, v in mask.items()
             if v.shape != parameter(model, k).shape}
    if wrong:
        raise InputError(f"{path}: mask shapes differ from the model (file vs model): {dict(list(wrong.items())[:3])}")
    return mask


def apply_mask(model: nn.Module, mask: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, keep in mask.items():
            w = parameter(model, name)
            w.mul_(keep.to(w.device))


class MaskEnforcer:
    """Keeps pruned weights exactly zero while training: their gradients are zeroed before clipping
    (so the clip norm is that of the sparse network) and the weights are zeroed after every optimizer
    step (AdamW's momentum and weight decay would otherwise regrow them).

    Multiplying by the bool mask is ~7x faster than masked_fill_ on CPU (bench/training.py); it would
    keep a NaN weight NaN, but a NaN anywhere already stops training (TrainingDiverged)."""

    def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor]):
        self.pairs = [(parameter(model, name), keep.to(parameter(model, name).device)) for name, keep in mask.items()]

    @torch.no_grad()
    def apply(self) -> None:
        for w, keep in self.pairs:
            w.mul_(keep)

    @torch.no_grad()
    def zero_grads(self) -> None:
        for w, keep in self.pairs:
            if w.grad is not None:
                w.grad.mul_(keep)
