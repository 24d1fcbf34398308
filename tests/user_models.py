"""Small user models for tests: shapes of real models that the generated ones do not have."""
from __future__ import annotations

import torch


class SparseNet(torch.nn.Module):
    """An embedding with sparse gradients: Rprop, Adam and the others cannot step it, SGD can."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def sparse():
    """A factory: the model and one batch of token ids."""
    return SparseNet(), (torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(0)),)
