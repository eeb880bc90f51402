"""Several segmentation networks as one teacher: the mean of their softmax probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# the log's floor: a class every member gives probability 0 stays far below any other (softmax ~ 0)
_FLOOR = 1e-12


class MeanProbabilities(nn.Module):
    """Networks of one task averaged in probability. The output is the log of the mean softmax, so anything that
    softmaxes a network's logits (the labeler, evaluation) gets exactly the ensemble's mean probabilities, and its
    argmax is the ensemble's vote weighted by confidence."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        mean = torch.stack([m(x).float().softmax(dim=1) for m in self.members]).mean(dim=0)
        return mean.clamp_min(_FLOOR).log()
