"""The question-only ("blind") baseline: what can be answered without looking at the image.

A bag-of-words classifier (mean of learned word embeddings -> MLP -> answers) trained on the training
questions with the loss of the rows it is reported beside (BCE, LMH or LPF: lxmert/losses.py, with the
MLP's hidden layer as the pooled representation LMH's gate reads). Reported beside every accuracy: a
model that does not beat it by a wide margin has learned the language prior, not the image; and on a
shifted test a debiasing loss's gain must be compared with what that loss gives a blind model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .config import DebiasConfig
from .data import VQADataset
from .evaluation import accuracy
from .losses import make_loss


class BagOfWords(nn.Module):
    def __init__(self, vocab_size: int, num_answers: int, dim: int = 128):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, num_answers))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer logits and the hidden layer (the 'pooled' input of LMH's gate)."""
        hidden = self.mlp[1](self.mlp[0](self.embed(input_ids)))
        return self.mlp[2](hidden), hidden


def _targets(ds: VQADataset, index: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(ds.split.dense_targets(index, ds.num_answers))


def train_blind(train: VQADataset, evals: dict[str, VQADataset], vocab_size: int, seed: int,
                epochs: int = 8, batch_size: int = 256, lr: float = 2e-3, loss: str = "bce",
                prior: Optional[torch.Tensor] = None, debias: Optional[DebiasConfig] = None) -> dict[str, dict]:
    """Train on `train` with a fixed seed and the named loss (`prior`: the question-type answer prior the
    debiasing losses need), return the accuracy on every split in `evals`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BagOfWords(vocab_size, train.num_answers)
        criterion = make_loss(loss, prior, 2 * model.embed.embedding_dim, debias or DebiasConfig())
    opt = torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), lr=lr)
    ids = torch.from_numpy(train.split.input_ids)
    qtypes = torch.from_numpy(train.qtypes)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=gen).split(batch_size):
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
