"""The low-budget criterion (TypiClust): k-means, typicality and the least-covered-cluster rule against cases
whose answer is known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.report.typical import kmeans, select_typical, typicality


def blobs(rng: np.random.Generator, centres: list[list[float]], n: int, spread: float = 0.05) -> np.ndarray:
    return np.concatenate([np.asarray(c) + spread * rng.standard_normal((n, len(c))) for c in centres])


def test_kmeans_finds_well_separated_blobs():
    rng = np.random.default_rng(0)
    x = blobs(rng, [[0, 0], [5, 5], [0, 5]], 20)
    assign = kmeans(x, 3, np.random.default_rng(1))
    groups = [set(assign[i * 20:(i + 1) * 20]) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3


def test_typicality_by_hand():
    x = np.array([[0.0], [1.0], [2.0], [10.0]])
    t = typicality(x, neighbours=2)
    # mean distance to the 2 nearest: 1.5, 1, 1.5, 8.5
    assert t == pytest.approx([1 / 1.5, 1.0, 1 / 1.5, 1 / 8.5])
    assert typicality(np.zeros((1, 3))).tolist() == [np.inf]


def ring(centre: list[float], n: int = 8, radius: float = 0.1) -> np.ndarray:
    """A centre and ``n`` points evenly on a circle around it: the centre is the most typical by construction."""
    angles = 2 * np.pi * np.arange(n) / n
    return np.concatenate([[centre], np.asarray(centre) + radius * np.stack([np.cos(angles), np.sin(angles)], 1)])


def test_select_typical_takes_the_centre_of_each_uncovered_cluster_first():
    unlabeled = np.concatenate([ring([0, 0]), ring([5, 5])])  # centres at 0 and 9
    labeled = np.array([[0.05, 0.0]])  # a mask already covers the first blob
    assert select_typical(unlabeled, labeled, 1) == [9]  # the second blob's centre
    assert sorted(select_typical(unlabeled, np.zeros((0, 2)), 2)) == [0, 9]  # both centres, nothing covered
    picks = select_typical(unlabeled, labeled, 5)
    assert len(set(picks)) == 5 and all(0 <= i < 18 for i in picks)  # five distinct unlabeled images
