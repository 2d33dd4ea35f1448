"""A lottery ticket, made and retrained the one way both studies use it: prune the trained weights to a mask,
rewind the surviving weights to the rewind point, retrain with the mask enforced after every step.

    folder/level.json          what the mask was pruned from (study A's levels)
    folder/mask.safetensors    the mask, bit-packed (made once; a rerun reads it back)
    folder/run/                the retraining run
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core import distributed as dist
from ..core import paths
from ..core.files import write_json
from ..core.paths import Run
from ..modeling.vqa import VQAModel
from ..prune.masks import apply_mask, load_mask_for, save_mask
from ..prune.prunable import PrunableTensor
from ..train.checkpoints import load_weights
from ..train.trainer import RunSpec, Schedule
from .context import Context

Mask = dict[str, torch.Tensor]


def rewind_point(ctx: Context, seed: int, dense_run: Run) -> Path:
    """The weights a ticket is rewound to: the seed's initial weights (lottery.rewind_steps 0) or the dense
    run's weights after that many steps (captured by that run)."""
    return ctx.init_weights(seed) if ctx.cfg.lottery.rewind_steps == 0 else dense_run.rewind


@dataclass
class Ticket:
    mask: Mask
    accuracy_pruned: float  # validation accuracy of the trained weights with the mask applied
    accuracy_rewound: float  # ... of the rewound weights with the mask applied, before retraining
    summary: dict  # the retraining run's summary


def retrain_ticket(ctx: Context, model: VQAModel, seed: int, folder: Path, prunable: list[PrunableTensor],
                   trained: Path, prune: Callable[[VQAModel], Mask], rewind: Path, loss: str, tag: str,
                   record: Optional[dict] = None, enforce: bool = True) -> Ticket:
    """Make (or read back) the mask `prune` builds from the `trained` weights, rewind to `rewind`, retrain
    with the mask enforced (the train section's schedule and the given loss; `enforce` false: applied once at
    the rewind point only, as the original study). Leaves the model at the retrained final weights. `record`
    is written to level.json before the mask is made."""
    load_weights(model, trained)
    mask_path = folder / paths.MASK
    if mask_path.exists():
        mask = load_mask_for(mask_path, model, [t.name for t in prunable])
    else:
        if dist.is_main() and record is not None:
            write_json(folder / paths.LEVEL, record)
        mask = dist.broadcast(prune(model) if dist.is_main() else None)
        if dist.is_main():
            save_mask(mask_path, mask, {t.name: t.modality for t in prunable})
    apply_mask(model, mask)
    accuracy_pruned = ctx.valid_accuracy(model)
    load_weights(model, rewind)
    apply_mask(model, mask)
    accuracy_rewound = ctx.valid_accuracy(model)
    spec = RunSpec(run=Run(folder / paths.RUN), seed=seed, tag=tag, loss=ctx.loss(loss, model, seed),
                   schedule=Schedule.of(ctx.cfg), masks=mask if enforce else None)
    return Ticket(mask, accuracy_pruned, accuracy_rewound, ctx.train(model, spec))
