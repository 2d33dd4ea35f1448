"""The question-only ("blind") baseline: what can be answered without looking at the image.

A bag-of-words classifier (mean of learned word embeddings -> MLP -> answers) trained with the same
soft-score BCE on the training questions. Reported beside every accuracy: a model that does not beat it
by a wide margin has learned the language prior, not the image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import VQADataset
from .evaluation import accuracy


class BagOfWords(nn.Module):
    def __init__(self, vocab_size: int, num_answers: int, dim: int = 128):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, num_answers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(input_ids))


def _targets(ds: VQADataset, index: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(ds.split.dense_targets(index, ds.num_answers))


def train_blind(train: VQADataset, evals: dict[str, VQADataset], vocab_size: int, seed: int,
                epochs: int = 8, batch_size: int = 256, lr: float = 2e-3) -> dict[str, dict]:
    """Train on `train` with a fixed seed, return the accuracy on every split in `evals`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BagOfWords(vocab_size, train.num_answers)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ids = torch.from_numpy(train.split.input_ids)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=gen).split(batch_size):
            logits = model(ids[batch])
            loss = nn.functional.binary_cross_entropy_with_logits(
                logits, _targets(train, batch.numpy()), reduction="sum") / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = {}
    with torch.no_grad():
        for name, ds in evals.items():
            # in chunks: all logits of a real split at once would be questions x answers floats (GBs)
            chunks = torch.from_numpy(ds.split.input_ids).split(4096)
            preds = torch.cat([model(c).argmax(1) for c in chunks]).numpy()
            out[name] = accuracy(ds, preds)
    return out
