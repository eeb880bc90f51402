"""The low-budget active-learning criterion: the most *typical* image of each uncovered cluster (TypiClust:
Hacohen, Dekel & Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High and Low Budgets",
ICML 2022).

With few labels, uncertainty sampling picks outliers the model cannot yet use; typical images of regions no mask
covers pay more. The images (labeled and unlabeled) are embedded, clustered by k-means into ``labeled + K``
clusters, and K times the least covered cluster (fewest labeled or already chosen images; the largest on ties)
gives up its most typical unlabeled image: the one with the smallest mean distance to its nearest neighbours in
the cluster (typicality = the inverse, the paper's Eq. 4 with k = 20). Embedding: the run's own encoder, its
deepest feature map averaged over space (the paper uses a self-supervised encoder; the run's ImageNet-initialised
and fine-tuned one is what this toolkit has), unit length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

NEIGHBOURS = 20  # the paper's k for typicality
KMEANS_ITERATIONS = 100


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Cluster index of every row of ``x`` (Lloyd's algorithm, k-means++ seeding, ``rng`` drawn)."""
    n = len(x)
    k = min(k, n)
    centres = [x[int(rng.integers(n))]]
    closest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = closest.sum()
        pick = int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[pick])
        closest = np.minimum(closest, ((x - x[pick]) ** 2).sum(1))
    c = np.stack(centres)
    assign = np.full(n, -1)
    for _ in range(iterations):
        d = (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None, :]
        new = d.argmin(1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return assign


def typicality(x: np.ndarray, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Per row: 1 / mean Euclidean distance to its ``neighbours`` nearest other rows (inf for a lone row)."""
    if len(x) < 2:
        return np.full(len(x), np.inf)
    d = np.sqrt(np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ x.T + (x ** 2).sum(1)[None, :], 0))
    np.fill_diagonal(d, np.inf)
    k = min(neighbours, len(x) - 1)
    nearest = np.sort(d, axis=1)[:, :k]
    return 1.0 / np.maximum(nearest.mean(1), 1e-12)


def select_typical(unlabeled: np.ndarray, labeled: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """TypiClust: ``n`` indices into ``unlabeled`` (best first), one per least covered cluster of both sets."""
    everything = np.concatenate([labeled, unlabeled]) if len(labeled) else unlabeled
    n_lab = len(labeled)
    assign = kmeans(everything, n_lab + n, np.random.default_rng(seed))
    clusters = np.unique(assign)
    covered = {int(c): int((assign[:n_lab] == c).sum()) for c in clusters}
    size = {int(c): int((assign == c).sum()) for c in clusters}
    typ = np.zeros(len(everything))
    for c in clusters:
        members = np.flatnonzero(assign == c)
        typ[members] = typicality(everything[members])
    chosen: list[int] = []
    free = set(range(n_lab, len(everything)))
    while len(chosen) < n and free:
        open_clusters = {int(assign[i]) for i in free}
        c = min(open_clusters, key=lambda c: (covered[c], -size[c], c))
        candidates = [i for i in free if assign[i] == c]
        best = max(candidates, key=lambda i: (typ[i], -i))
        chosen.append(best - n_lab)
        free.discard(best)
        covered[c] += 1
    return chosen


@torch.no_grad()
def encoder_embedding(model: nn.Module, images: Any, indices: Sequence[int], *, device: torch.device,
                      batch_size: int = 8) -> np.ndarray:
    """Unit-length, space-averaged deepest encoder features of ``images[indices]`` (uint8 RGB), through the whole
    model's forward so that its input normalisation applies; a model without ``.encoder`` is embedded by its
    logits averaged over space."""
    from semiseg.data.normalization import pad_with_mean
    from semiseg.data.transforms import to_input
    from semiseg.models.factory import unwrap
    from semiseg.pipeline.labeling import SIZE_DIVISOR

    net = unwrap(model)
    captured: list[torch.Tensor] = []
    encoder = getattr(net, "encoder", None)
    handle = None
    if encoder is not None:
        handle = encoder.register_forward_hook(
            lambda _m, _i, out: captured.append(out[-1] if isinstance(out, list | tuple) else out))
    was_training = net.training
    net.eval()
    rows = []
    try:
        for start in range(0, len(indices), batch_size):
            chunk = [np.asarray(images[i]) for i in indices[start:start + batch_size]]
            x = to_input(np.stack(chunk)).to(device)
            h, w = x.shape[-2:]
            x = pad_with_mean(net, x, (0, (-w) % SIZE_DIVISOR, 0, (-h) % SIZE_DIVISOR))  # as the labeler feeds it
            out = net(x)
            feats = captured.pop() if captured else out
            rows.append(feats.float().mean(dim=(2, 3)).cpu().numpy())
    finally:
        if handle is not None:
            handle.remove()
        net.train(was_training)
    x = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
