"""Training and evaluating the question-only model (modeling.blind) with the loss of the rows it is reported
beside; epochs, learning rate and batch size come from the config's `blind` section."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..core.config import BlindConfig, DebiasConfig
from ..data.datasets import VQADataset
from ..modeling.blind import BagOfWords
from ..modeling.losses import make_loss
from .evaluation import accuracy


def _targets(ds: VQADataset, index: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(ds.split.dense_targets(index, ds.num_answers))


def train_blind(train: VQADataset, evals: dict[str, VQADataset], vocab_size: int, seed: int, settings: BlindConfig,
                loss: str = "bce", prior: Optional[torch.Tensor] = None,
                debias: Optional[DebiasConfig] = None) -> dict[str, dict]:
    """Train on `train` with a fixed seed and the named loss (`prior`: the question-type answer prior the
    debiasing losses need; Adam at a constant learning rate), return the accuracy on every split in `evals`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BagOfWords(vocab_size, train.num_answers)
        criterion = make_loss(loss, prior, model.hidden_size, debias or DebiasConfig())
    opt = torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), lr=settings.lr)
    ids = torch.from_numpy(train.split.input_ids)
    qtypes = torch.from_numpy(train.qtypes)
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(train), generator=gen).split(settings.batch_size):
            logits, hidden = model(ids[batch])
            loss_value = criterion(logits, _targets(train, batch.numpy()), hidden, qtypes[batch])
            opt.zero_grad()
            loss_value.backward()
            opt.step()
    out = {}
    with torch.no_grad():
        for name, ds in evals.items():
            # in chunks: all logits of a real split at once would be questions x answers floats (GBs)
            chunks = torch.from_numpy(ds.split.input_ids).split(4096)
            preds = torch.cat([model(c)[0].argmax(1) for c in chunks]).numpy()
            out[name] = accuracy(ds, preds)
    return out
