"""The question-only ("blind") model: what can be answered without looking at the image.

A bag-of-words classifier (mean of learned word embeddings -> MLP -> answers). It is trained on the
training questions with the loss of the rows it is reported beside (train.blind), with the MLP's hidden
layer as the pooled representation LMH's gate reads. Reported beside every accuracy: a model that does
not beat it by a wide margin has learned the language prior, not the image; and on a shifted test a
debiasing loss's gain must be compared with what that loss gives a blind model.
"""
from __future__ import annotations

import torch
from torch import nn


class BagOfWords(nn.Module):
    def __init__(self, vocab_size: int, num_answers: int, dim: int = 128):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, num_answers))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer logits and the hidden layer (the 'pooled' input of LMH's gate)."""
        hidden = self.mlp[1](self.mlp[0](self.embed(input_ids)))
        return self.mlp[2](hidden), hidden

    @property
    def hidden_size(self) -> int:
        return 2 * self.embed.embedding_dim
